"""Method (c) of benchmark_exclusion: NNCF's ``quantize_with_accuracy_control`` on the ONNX model.

NNCF is not a project dependency; :func:`run_nncf` reports why it could not run instead of
raising. It is given the same FP32 ONNX file, the same calibration samples
(``task.calibration_batches``) and the task's evaluation split; its ``validation_fn`` computes the
task's metric with ONNX Runtime at the benchmark's thread count and counts its calls.

Units: NNCF compares metrics where higher is better and, for accuracy, takes fractions (0.97, not
97 %). A metric named ``*_pct`` is divided by 100 (and the budget with it); a lower-is-better
metric is negated. The drop reported in the table is measured afterwards by the benchmark itself,
against the PyTorch FP32 metric like every other row.

Settings chosen to match ONNX Runtime's static INT8 of methods (a) and (b): the ``mixed`` preset
(asymmetric activations, symmetric per-channel weights), global min/max activation ranges
(``RangeEstimatorParametersSet.MINMAX``, what ORT's ``minmax`` calibration computes),
``subset_size`` = the calibration sample count, target device CPU. Everything else is NNCF's
default (fast bias correction on, no hyperparameter tuning, ranking subset = ``subset_size``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# NNCF reads this once at import: it swaps its telemetry sender for a stub (this machine has no
# network, and a benchmark has nothing to report).
os.environ.setdefault("NNCF_CI", "1")


@dataclass
class NncfOutcome:
    """What NNCF produced, or why it did not."""

    model_path: Path | None = None
    wall_time_s: float | None = None
    validation_sizes: list[int] = field(default_factory=list)  # samples per validation_fn call
    eval_samples: int = 0
    reverted: list[str] = field(default_factory=list)
    version: str = ""
    log: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def validation_calls(self) -> int:
        return len(self.validation_sizes)

    def describe_calls(self) -> str:
        """E.g. ``8 validation_fn calls: 3 x 660 samples, 4 x 128, 1 x 1 (NNCF's mode probe)``."""
        counts: dict[int, int] = {}
        for n in self.validation_sizes:
            counts[n] = counts.get(n, 0) + 1
        parts = [
            f"{c} x {n}" + (" (full split)" if n == self.eval_samples else " (NNCF's mode probe)" if n == 1 else "")
            for n, c in sorted(counts.items(), reverse=True)
        ]
        return f"{self.validation_calls} validation_fn calls: {', '.join(parts)} samples"


def run_nncf(
    fp32_onnx: Path, task: Any, *, budget: float, calibration_samples: int, num_threads: int, out: Path,
    keep: np.ndarray | None = None,
) -> NncfOutcome:  # fmt: skip
    """Quantize ``fp32_onnx`` with NNCF's accuracy control; never raises. Its validation set is
    the evaluation samples ``keep`` lists (the trial part a sweep scores on), or all of them."""
    outcome = NncfOutcome()
    try:
        import nncf
        import onnx
    except ImportError as exc:
        outcome.error = f"nncf is not installed here ({exc}); `pip install nncf` to add this row"
        return outcome
    outcome.version = nncf.__version__
    try:
        _quantize(nncf, onnx, fp32_onnx, task, budget, calibration_samples, num_threads, out, outcome, keep)
    except Exception as exc:  # the row records why NNCF failed; the other methods stand
        outcome.error = f"nncf {outcome.version} failed: {type(exc).__name__}: {exc}"[:600]
        outcome.model_path = None
    return outcome


def _quantize(
    nncf: Any, onnx: Any, fp32_onnx: Path, task: Any, budget: float, calibration_samples: int,
    num_threads: int, out: Path, outcome: NncfOutcome, keep: np.ndarray | None,
) -> None:  # fmt: skip
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from sweeper.holdout import select_batches

    scale = 100.0 if task.metric_name.endswith("_pct") else 1.0
    sign = 1.0 if task.higher_is_better else -1.0
    calibration = [_split(batch) for batch in task.calibration_batches(calibration_samples)]
    batches = task.eval_batches(256) if keep is None else select_batches(task.eval_batches(256), keep)
    validation = [(x, y) for batch, labels in batches for x, y in zip(_split(batch), labels, strict=True)]
    outcome.eval_samples = len(validation)
    calibration = [x for batch in calibration for x in batch]

    def validation_fn(model: Any, items: Any) -> tuple[float, list[float]]:
        items = list(items)
        outcome.validation_sizes.append(len(items))
        session = _session(model.SerializeToString(), num_threads)
        feeds = {name: np.concatenate([x[name] for x, _ in items]) for name in items[0][0]}
        labels = np.asarray([y for _, y in items])
        outputs = np.concatenate([
            session.run(None, {k: v[i : i + 256] for k, v in feeds.items()})[0] for i in range(0, len(labels), 256)
        ])  # fmt: skip
        per_item = [sign * task.metric(outputs[i : i + 1], labels[i : i + 1]) / scale for i in range(len(labels))]
        return sign * task.metric(outputs, labels) / scale, per_item

    model = onnx.load(str(fp32_onnx))
    started = time.perf_counter()
    with _captured_nncf_output(outcome.log):
        quantized = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(calibration),
            nncf.Dataset(validation, lambda item: item[0]),
            validation_fn,
            max_drop=budget / scale,
            drop_type=nncf.DropType.ABSOLUTE,
            preset=nncf.QuantizationPreset.MIXED,
            target_device=nncf.TargetDevice.CPU,
            subset_size=calibration_samples,
            advanced_quantization_parameters=AdvancedQuantizationParameters(
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
            ),
        )
    outcome.wall_time_s = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    outcome.model_path = out / "nncf_accuracy_control.onnx"
    onnx.save(quantized, str(outcome.model_path))
    outcome.reverted = _reverted(outcome.log)


def _split(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One NNCF data item per sample (NNCF collects statistics per item)."""
    n = len(next(iter(batch.values())))
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]


def _session(model_bytes: bytes, num_threads: int) -> Any:
    """A session opened as sweeper opens every ONNX model, so that NNCF's validation sees the
    figures the benchmark measures afterwards (see ``DISABLED_OPTIMIZERS``: ORT would otherwise
    quantize the float weights of a layer NNCF reverted, whenever a DequantizeLinear feeds it)."""
    import onnxruntime as ort

    from sweeper.backends.onnx.runtime import DISABLED_OPTIMIZERS

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )


@contextlib.contextmanager
def _captured_nncf_output(lines: list[str]) -> Any:
    """Collect NNCF's log lines; send its progress bars to stderr, away from the table."""

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("nncf")
    saved = logger.handlers[:]
    logger.handlers = [Collect()]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.handlers = saved


def _reverted(log: list[str]) -> list[str]:
    """The operations NNCF's final report says it reverted to float."""
    for line in reversed(log):
        if "were reverted back to the floating-point precision" in line:
            return [part.strip() for part in line.splitlines()[1:] if part.strip()]
    return []
