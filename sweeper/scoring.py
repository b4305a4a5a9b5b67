"""Layer sensitivity, as it runs inside Ray tasks: list a backend's exclusion units, then score
each unit quantized alone against the FP32 outputs (see :mod:`sweeper.sensitivity` for the
driver side: chunks, cached tables, the ranking).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.backends import get_backend
from sweeper.errors import ConfigError, SweeperInputError
from sweeper.measure import DropCounts, EvalData, predict_rows, predict_rows_by_length
from sweeper.spec import TaskRef
from sweeper.task import load_task
from sweeper.triage import output_error, output_error_interval
from sweeper.worker import Baseline, build_context, prepare_baseline, set_threads


def _exclusion_field(backend: str) -> str:
    field = get_backend(backend).exclusion_field
    if field is None:
        raise ConfigError(f"backend '{backend}' cannot leave layers in float, so its layers have no sensitivity")
    return field


# Error text kept per row.
MAX_ERROR_CHARS = 600


def describe_error(exc: BaseException) -> str:
    """The innermost cause of ``exc`` as ``Type: message``, shortened (backends wrap ORT's errors)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@dataclasses.dataclass(frozen=True)
class _Reference:
    """What a unit's outputs are compared with: the FP32 model's outputs on the trial part of the
    evaluation split (``keep``: its samples; the held-out part is never scored here)."""

    task: Any
    model: Any
    outputs: np.ndarray
    labels: np.ndarray
    keep: np.ndarray


@functools.cache
def _task_and_model(task_ref: TaskRef) -> tuple[Any, Any]:
    task = load_task(task_ref.path, task_ref.attr)
    return task, task.build_model().eval()


def _context(
    task_ref: TaskRef, eval_batch_size: int, num_threads: int, workdir: str, reference: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The FP32 reference and a build context. With ``reference`` (the FP32 outputs and labels the
    listing task computed) the FP32 model is not evaluated again in this process."""
    set_threads(num_threads)
    baseline: Baseline | _Reference
    if reference is None:
        baseline = prepare_baseline(task_ref, eval_batch_size)
    else:
        task, model = _task_and_model(task_ref)
        baseline = _Reference(
            task=task, model=model, outputs=reference["outputs"], labels=reference["labels"], keep=reference["keep"]
        )
    ctx = build_context(baseline.model, baseline.task, Path(workdir), num_threads)
    return baseline, ctx


def _keep(baseline: Any) -> np.ndarray:
    """The trial part's samples (all of the split's when nothing is held out)."""
    return baseline.keep if baseline.keep is not None else np.arange(len(baseline.labels))


@functools.cache
def _eval_data(task_ref: TaskRef, batch_size: int) -> EvalData:
    """The evaluation split in memory, once per process (:func:`_score` takes rows of its trial part)."""
    return EvalData.of(_task_and_model(task_ref)[0].eval_batches(batch_size))


def _trial_data(task_ref: TaskRef, baseline: Baseline | _Reference, batch_size: int) -> EvalData:
    """The trial part of the evaluation split in memory: the baseline's own, or read once per process."""
    if isinstance(baseline, Baseline):
        return baseline.data
    return _eval_data(task_ref, batch_size).select(_keep(baseline))


def _score(
    baseline: Any, ctx: Any, backend: str, params: dict[str, Any], data: EvalData, rows: np.ndarray | None = None
) -> dict[str, Any]:
    """Build ``params`` and score it against FP32 on the trial part of the evaluation split
    (``data``), or on its sorted ``rows``: metric, output error with its bootstrap interval, the
    samples and, for a top-1 task, the discordant counts."""
    task = baseline.task
    candidate = get_backend(backend).build(ctx, get_backend(backend).config(params))
    outputs = _predict(task, backend, candidate.predict, data, rows)
    reference, labels = baseline.outputs, baseline.labels
    if rows is not None:
        reference, labels = reference[rows], labels[rows]
    low, high = output_error_interval(reference, outputs)
    ref64 = reference.astype(np.float64)
    scored = {
        "metric_fp32": task.metric(reference, labels), "metric": task.metric(outputs, labels),
        "output_error": output_error(reference, outputs), "output_error_low": low, "output_error_high": high,
        "samples": len(labels), "worse": None, "better": None, "correct": None,
        # Sums that add up over disjoint samples (see sweeper.sensitivity.merge_scores).
        "noise": float(np.sum((outputs.astype(np.float64) - ref64) ** 2)), "signal": float(np.sum(ref64 * ref64)),
    }  # fmt: skip
    fp32_correct = task.correct(reference, labels)
    if fp32_correct is not None:
        correct = task.correct(outputs, labels)
        counts = DropCounts.from_predictions(fp32_correct, correct)
        scored |= {"worse": counts.worse, "better": counts.better, "correct": int(np.sum(correct))}
    return scored


def _predict(task: Any, backend: str, predict: Any, data: EvalData, rows: np.ndarray | None) -> np.ndarray:
    """The candidate's outputs on ``rows`` of ``data``: on length-sorted batches cut to their
    longest sample when the task pads sequences and the backend takes any length.

    On MiniLM (64-token padding, 27 tokens on average) that scores ~2.3x faster. FP32 and static
    INT8 give the same outputs either way; dynamic INT8 takes its activation ranges per call,
    padding included, so cut batches change its outputs a little, the way a sentence run alone
    would (``benchmarks/benchmark_padded_scoring.py``)."""
    padded = [name for name in task.input_names if 1 in task.dynamic_axes.get(name, {})]
    if padded and data.batches and get_backend(backend).any_length and task.padded_lengths(data.batches[0]) is not None:
        return predict_rows_by_length(predict, data, rows, task.padded_lengths, padded)
    return predict_rows(predict, data, rows)


def _failed(layer: str, exc: BaseException) -> dict[str, Any]:
    return {"layer": layer, "metric": math.nan, "output_error": math.nan, "error": describe_error(exc)}


def list_layers(
    task_ref: TaskRef, backend: str, params: dict[str, Any], eval_batch_size: int, num_threads: int
) -> dict[str, Any]:
    """The exclusion units, every excludable name, and the FP32 and fully quantized figures (a Ray
    task body). A fully quantized model that fails to build leaves its figures NaN, with ``full_failure``."""
    impl = get_backend(backend)
    field = _exclusion_field(backend)
    with tempfile.TemporaryDirectory(prefix="sweeper-sensitivity-") as workdir:
        baseline, ctx = _context(task_ref, eval_batch_size, num_threads, workdir)
        units, names = impl.exclusion_units(ctx, impl.config(params))
        full_failure = None
        try:
            data = _trial_data(task_ref, baseline, eval_batch_size)
            full = _score(baseline, ctx, backend, {**params, field: ()}, data)
            full_metric, full_error = full["metric"], full["output_error"]
        except SweeperInputError:
            raise  # a config or task problem (too many calibration samples, say) fails every layer alike
        except Exception as exc:  # recorded; each unit is still scored on its own
            full_metric, full_error, full_failure = math.nan, math.nan, describe_error(exc)
    return {
        "units": [dataclasses.asdict(u) for u in units],
        "names": list(names),
        "metric_fp32": baseline.metric,
        "higher_is_better": baseline.task.higher_is_better,
        "top1": baseline.task.correct(baseline.outputs, baseline.labels) is not None,
        "full_metric": full_metric,
        "full_error": full_error,
        "full_failure": full_failure,
        "reference": {"outputs": baseline.outputs, "labels": baseline.labels, "keep": _keep(baseline)},
    }


def score_layers(
    task_ref: TaskRef,
    backend: str,
    params: dict[str, Any],
    units: list[dict[str, Any]],
    names: list[str],
    eval_batch_size: int,
    num_threads: int,
    reference: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Quantize each of ``units`` alone (every other name of ``names`` excluded) and score it (a
    Ray task body) on the evaluation split, or on its ``rows`` only. A unit that raises gets NaN
    scores and its ``error``. ``reference``: :func:`list_layers`'s, so that the FP32 model is not
    evaluated again here."""
    field = _exclusion_field(backend)
    scored = []
    with tempfile.TemporaryDirectory(prefix="sweeper-sensitivity-") as workdir:
        baseline, ctx = _context(task_ref, eval_batch_size, num_threads, workdir, reference)
        data = _trial_data(task_ref, baseline, eval_batch_size)
        for unit in units:
            members = set(unit["members"]) | {unit["name"]}
            others = tuple(n for n in names if n not in members)
            try:
                figures = _score(baseline, ctx, backend, {**params, field: others}, data, rows)
                scored.append({"layer": unit["name"], **figures, "error": None})
            except Exception as exc:  # one unit that cannot be scored never ends the ranking
                scored.append(_failed(unit["name"], exc))
    return scored
