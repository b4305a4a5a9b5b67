"""What runs inside a Ray task: the FP32 baseline, build contexts, evaluation, and one trial.

Nothing here talks to Optuna. The FP32 model, its evaluation outputs and the evaluation data are
prepared once per worker process and reused by every trial (and sensitivity task) it runs.
:func:`run_trial` builds one candidate with its backend, evaluates it against the FP32 outputs and
times it interleaved with the FP32 model (:mod:`sweeper.measure`); its :class:`TrialResult` goes
back to the driver, which writes the row.
"""

from __future__ import annotations

import dataclasses
import io
import platform
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.backends import BuildContext, Candidate, get_backend
from sweeper.backends.onnx.tf2onnx import KerasCandidate, is_keras_model, keras_weights_bytes
from sweeper.backends.torch.eager import TorchCandidate
from sweeper.holdout import HeldOut, held_out, select_batches, trial_indices
from sweeper.location import cache_dir, ship_artifact
from sweeper.measure import DropCounts, accuracy_drop, agreement_pct, exclusive_timing, max_abs_error, time_interleaved
from sweeper.spec import (
    VERSIONED_PACKAGES,
    Environment,
    FP32Baseline,
    MeasureSettings,
    Outcome,
    TaskRef,
    TrialResult,
    TrialSpec,
)
from sweeper.task import LabeledBatch, Task, load_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Baseline:
    """The FP32 model of a task and what it gives on the trial part of the evaluation split.

    ``runtime`` says what runs it: ``"pytorch"`` (eager) for a torch model, ``"keras"`` for a
    Keras one (a task whose ONNX backends export it with tf2onnx). ``keep`` lists the samples of
    the evaluation split (in ``eval_batches`` order) that trials are scored on, ``None`` all of
    them; the rest is held out for the finalists' confirmation (:func:`held_out_reference`).
    """

    task: Task
    model: torch.nn.Module
    outputs: np.ndarray
    labels: np.ndarray
    metric: float
    size_bytes: int
    runtime: str = "pytorch"
    keep: np.ndarray | None = None


def fp32_candidate(model: Any, task: Task, num_threads: int) -> Candidate:
    """The FP32 model as a candidate in its own framework: PyTorch eager, or Keras."""
    if is_keras_model(model):
        return KerasCandidate(model, task)
    return TorchCandidate(model, task.input_names, num_threads)


def _state_bytes(model: Any) -> int:
    """Bytes of the FP32 weights: the torch state dict as saved, or the Keras weights."""
    if is_keras_model(model):
        return keras_weights_bytes(model)
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def build_context(
    model: Any, task: Task, workdir: Path, num_threads: int, device: str = "cpu", models_cache: Path | None = None
) -> BuildContext:
    """What a backend gets to build one candidate: the FP32 model, the task, a private ``workdir``
    and the machine's model cache (``models_cache``, by default the user's cache folder)."""
    return BuildContext(
        model=model, task=task, workdir=Path(workdir), cache_dir=models_cache or cache_dir("models"),
        num_threads=num_threads, device=device,
    )


def evaluate(
    predict: Any, task: Task, batch_size: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict`` over the task's evaluation split (only the samples ``keep`` lists, when
    given); return (outputs, labels)."""
    outputs, labels = [], []
    batches = task.eval_batches(batch_size)
    for batch, y in batches if keep is None else select_batches(batches, keep):
        outputs.append(np.asarray(predict(batch), dtype=np.float32))
        labels.append(y)
    return np.concatenate(outputs), np.concatenate(labels)


@cache
def prepare_baseline(task_ref: TaskRef, eval_batch_size: int) -> Baseline:
    """Load the task and evaluate its FP32 model (once per process and task)."""
    import torch

    task = load_task(task_ref.path, task_ref.attr)
    model = task.build_model()
    if not is_keras_model(model):
        model = model.eval()
    fp32 = fp32_candidate(model, task, torch.get_num_threads())
    outputs, labels = evaluate(fp32.predict, task, eval_batch_size)
    keep = trial_indices(task, labels)
    outputs, labels = (outputs, labels) if keep is None else (outputs[keep], labels[keep])
    return Baseline(
        task=task,
        model=model,
        outputs=outputs,
        labels=labels,
        metric=task.metric(outputs, labels),
        size_bytes=_state_bytes(model),
        runtime="keras" if is_keras_model(model) else "pytorch",
        keep=keep,
    )


def trial_batches(baseline: Baseline, batch_size: int) -> Iterator[LabeledBatch]:
    """The trial part of the evaluation split, in the order of ``baseline.labels``."""
    batches = baseline.task.eval_batches(batch_size)
    return batches if baseline.keep is None else select_batches(batches, baseline.keep)


@cache
def held_out_reference(task_ref: TaskRef, eval_batch_size: int) -> HeldOut:
    """The FP32 outputs on the split the finalists are confirmed on (once per process and task)."""
    import torch

    baseline = prepare_baseline(task_ref, eval_batch_size)
    fp32 = fp32_candidate(baseline.model, baseline.task, torch.get_num_threads())
    return held_out(baseline.task, baseline.keep, fp32.predict, eval_batch_size)


def baseline_summary(
    task_ref: TaskRef,
    measure: MeasureSettings,
    num_threads: int,
    preflight: list[tuple[str, dict[str, Any]]] | tuple[()] = (),
) -> FP32Baseline:
    """The FP32 figures a study needs once, after the backends' preflight checks.

    Returns the FP32 metric, its direction and the state dict's size. ``preflight`` lists
    (backend, params) pairs whose :meth:`~sweeper.backends.Backend.preflight` must pass.
    """
    set_threads(num_threads)
    baseline = prepare_baseline(task_ref, measure.eval_batch_size)
    with tempfile.TemporaryDirectory(prefix="sweeper-preflight-") as workdir:
        ctx = build_context(baseline.model, baseline.task, Path(workdir), num_threads)
        for backend, params in preflight:
            get_backend(backend).preflight(ctx, get_backend(backend).config(params))
    held = held_out_reference(task_ref, measure.eval_batch_size)
    return FP32Baseline(
        metric=baseline.metric,
        metric_name=baseline.task.metric_name,
        higher_is_better=baseline.task.higher_is_better,
        runtime=baseline.runtime,
        size_bytes=baseline.size_bytes,
        calibration_size=baseline.task.calibration_size,
        eval_samples=int(baseline.labels.shape[0]),
        environment=environment(),
        confirm_split=held.split,
        confirm_samples=int(held.labels.shape[0]),
        confirm_metric=held.metric,
    )


def set_threads(num_threads: int) -> None:
    """Let this process's PyTorch use the cores its Ray task reserved."""
    import torch

    torch.set_num_threads(num_threads)


@cache
def environment() -> Environment:
    """Describe this process's node, hardware and library versions."""
    versions = {}
    for dist in VERSIONED_PACKAGES:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = ""
    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker the node id stays empty
        node_id = ""
    return Environment(
        node_id=node_id,
        hostname=socket.gethostname(),
        cpu_model=cpu_model(),
        device="cpu",
        versions=versions,
    )


def cpu_model() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_trial_with_ledger(spec: TrialSpec, ledger: Any) -> TrialResult:
    """The Ray task body: note the attempt, run the trial, and return the result with it."""
    import ray

    key = f"{spec.study}/{spec.trial_number}"
    try:
        attempt = ray.get(ledger.begin.remote(key, ray.get_runtime_context().get_node_id()), timeout=60)
    except (ray.exceptions.RayError, TimeoutError):  # the count is lost, the trial is not
        attempt = None
    return dataclasses.replace(run_trial(spec), attempt=attempt)


def run_trial(spec: TrialSpec) -> TrialResult:
    """Build and measure one candidate. Never raises: a failure is a ``failed`` result."""
    started = time.time()
    measured: dict[str, Any] = {"num_threads": spec.num_threads, "batch_size": spec.measure.batch_size}
    try:
        set_threads(spec.num_threads)
        measured["environment"] = dataclasses.replace(environment(), device=spec.device)
        state = _build_and_measure(spec, measured)
    except Exception as exc:  # the trial failed; the sweep goes on and the row records why
        tb = traceback.format_exc(limit=-6)
        return TrialResult(
            state="failed",
            started_at=started,
            finished_at=time.time(),
            error=f"{type(exc).__name__}: {exc}\n{tb}",
            **measured,
        )
    return TrialResult(state=state, started_at=started, finished_at=time.time(), **measured)


def _build_and_measure(spec: TrialSpec, measured: dict[str, Any]) -> Outcome:
    """Build, evaluate (cheap-first when asked) and time the candidate; return the trial's state."""
    baseline = prepare_baseline(spec.task, spec.measure.eval_batch_size)
    task = baseline.task
    measured["baseline_size_bytes"] = baseline.size_bytes
    backend = get_backend(spec.backend)
    config = backend.config(spec.params)
    with tempfile.TemporaryDirectory(prefix=f"sweeper-trial-{spec.trial_number}-") as workdir:
        ctx = build_context(baseline.model, task, Path(workdir), spec.num_threads, spec.device)
        candidate = backend.build(ctx, config)
        measured["environment"] = dataclasses.replace(measured["environment"], device=candidate.device)
        artifact = candidate.save(Path(workdir) / "artifact")
        measured["size_bytes"] = candidate.size_bytes()
        measured |= ship_artifact(artifact, spec.artifact_dir)

        outputs = _evaluate_cheap_first(candidate, baseline, spec, measured)
        if outputs is None:
            return "pruned"
        measured["accuracy"] = task.metric(outputs, baseline.labels)
        measured["agreement"] = agreement_pct(baseline.outputs, outputs)
        measured["output_max_abs_error"] = max_abs_error(baseline.outputs, outputs)
        measured |= _drop_counts(task, baseline, outputs)

        example = task.example_inputs(spec.measure.batch_size)
        fp32 = fp32_candidate(baseline.model, task, spec.num_threads)
        measured["baseline_runtime"] = baseline.runtime
        # Builds and evaluations of other trials on this machine may overlap; timed phases may not.
        with exclusive_timing() as phase:
            base_stats, cand_stats = time_interleaved(
                lambda: fp32.predict(example),
                lambda: candidate.predict(example),
                spec.measure,
            )
        measured |= {"timing_wait_s": phase.wait_s, "concurrent_timings": phase.concurrent}
        measured["latency"] = cand_stats
        measured["baseline_latency"] = base_stats
    return "complete"


def _drop_counts(task: Any, baseline: Baseline, outputs: np.ndarray) -> dict[str, Any]:
    """The evaluation size and, for a top-1 task, the discordant counts the drop rests on."""
    counts: dict[str, Any] = {"eval_samples": int(len(baseline.labels))}
    fp32_correct = task.correct(baseline.outputs, baseline.labels)
    if fp32_correct is not None:
        paired = DropCounts.from_predictions(fp32_correct, task.correct(outputs, baseline.labels))
        counts |= {"discordant_worse": paired.worse, "discordant_better": paired.better}
    return counts


def _evaluate_cheap_first(
    candidate: Any, baseline: Baseline, spec: TrialSpec, measured: dict[str, Any]
) -> np.ndarray | None:
    """Evaluate on the whole split; with early stopping, score the first share before the rest.

    Returns ``None`` (and records the subset's figures) when the subset's drop already exceeds
    ``spec.prune_above_drop``.
    """
    task, labels = baseline.task, baseline.labels
    fraction = spec.early_stop_fraction
    n_subset = max(1, int(len(labels) * fraction)) if fraction else None
    outputs: list[np.ndarray] = []
    seen = 0
    for batch, _ in trial_batches(baseline, spec.measure.eval_batch_size):
        outputs.append(np.asarray(candidate.predict(batch), dtype=np.float32))
        seen += len(outputs[-1])
        if n_subset is not None and seen >= n_subset:
            subset = np.concatenate(outputs)[:n_subset]
            cand = task.metric(subset, labels[:n_subset])
            fp32 = task.metric(baseline.outputs[:n_subset], labels[:n_subset])
            measured |= {"subset_accuracy": cand, "subset_accuracy_fp32": fp32, "subset_samples": n_subset}
            limit = spec.prune_above_drop if spec.prune_above_drop is not None else float("inf")
            if accuracy_drop(fp32, cand, higher_is_better=task.higher_is_better) > limit:
                return None
            n_subset = None
    return np.concatenate(outputs)
