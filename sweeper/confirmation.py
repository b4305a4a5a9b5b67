"""The study-level Ray tasks: the FP32 summary a study begins with, and the finalists'
confirmation it ends with, each one Ray task on one node.

:func:`baseline_summary` measures the FP32 model once (metric, fingerprint, reference latency,
the confirmation split) for ``study.json``.

The study's finalists are loaded from their trials' artifacts (or rebuilt where the artifact is
not on this node), re-scored on the held-out split (:mod:`sweeper.holdout`), then timed together
with the FP32 model, round-robin, under the machine's timing lock
(:func:`time_round_robin`), with more runs than a trial. The driver turns the
:class:`~sweeper.spec.ConfirmResult` into confirmation rows (:mod:`sweeper.finalists`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.backends import Candidate, get_backend
from sweeper.holdout import HeldOut, held_out, held_out_batches, predict_all
from sweeper.measure import DropCounts, exclusive_timing, latency_stats
from sweeper.spec import (
    ConfirmResult,
    ConfirmSpec,
    FinalistResult,
    FinalistSpec,
    FP32Baseline,
    MeasureSettings,
    TaskRef,
    environment,
)
from sweeper.worker import (
    Baseline,
    build_context,
    fp32_candidate,
    prepare_baseline,
    set_threads,
)


def time_round_robin(
    fns: Sequence[Callable[[], object]],
    settings: MeasureSettings,
    min_rounds: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[list[float]]]:
    """Time several models together: each round times ``round_size`` calls of every model, the
    order rotating by one each round; return each model's per-round call times in seconds.

    Rounds go on until every model has ``min_runs`` runs, ``min_rounds`` rounds have passed and
    the timed calls took ``min_time_s`` per model, or until ``max_runs`` runs each.
    """
    for _ in range(settings.warmup_runs):
        for fn in fns:
            fn()
    rounds: list[list[list[float]]] = [[] for _ in fns]
    timed = 0.0
    while True:
        runs = sum(len(r) for r in rounds[0])
        enough = runs >= settings.min_runs and len(rounds[0]) >= min_rounds
        if (enough and timed >= settings.min_time_s * len(fns)) or runs >= settings.max_runs:
            break
        shift = len(rounds[0]) % len(fns)
        for index in [*range(shift, len(fns)), *range(shift)]:
            times = []
            for _ in range(settings.round_size):
                t0 = clock()
                fns[index]()
                times.append(clock() - t0)
            rounds[index].append(times)
            timed += sum(times)
    return rounds


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
    device: str = "cpu",
) -> FP32Baseline:
    """The FP32 figures a study needs once, after the backends' preflight checks.

    Returns the FP32 metric, its direction, the state dict's size, the fingerprint of the weights
    and evaluation data, and the FP32 latency on ``device`` (the reference a latency objective is
    scaled to). ``preflight`` lists (backend, params) pairs whose
    :meth:`~sweeper.backends.Backend.preflight` must pass.
    """
    set_threads(num_threads)
    baseline = prepare_baseline(task_ref, measure.eval_batch_size)
    with tempfile.TemporaryDirectory(prefix="sweeper-preflight-") as workdir:
        ctx = build_context(baseline.model, baseline.task, Path(workdir), num_threads)
        for backend, params in preflight:
            get_backend(backend).preflight(ctx, get_backend(backend).config(params))
    held = held_out_reference(task_ref, measure.eval_batch_size)
    device = _usable(device) if baseline.runtime == "pytorch" else "cpu"
    return FP32Baseline(
        metric=baseline.metric,
        metric_name=baseline.task.metric_name,
        higher_is_better=baseline.task.higher_is_better,
        runtime=baseline.runtime,
        size_bytes=baseline.size_bytes,
        calibration_size=baseline.task.calibration_size,
        eval_samples=int(baseline.labels.shape[0]),
        environment=environment(),
        fingerprint=baseline.fingerprint,
        reference_latency_ms=_reference_latency(baseline, measure, num_threads, device),
        reference_device=device,
        confirm_split=held.split,
        confirm_samples=int(held.labels.shape[0]),
        confirm_metric=held.metric,
    )


def _usable(device: str) -> str:
    """``device``, or the CPU when it names a GPU this node cannot use (a CPU path of a GPU target)."""
    import torch

    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


def _reference_latency(baseline: Baseline, measure: MeasureSettings, num_threads: int, device: str) -> dict[str, float]:
    """The FP32 model's latency on ``device`` (ms per call), timed alone under the machine's timing lock."""
    fp32 = fp32_candidate(baseline.model, baseline.task, num_threads, device)
    example = baseline.task.example_inputs(measure.batch_size)
    with exclusive_timing():
        (rounds,) = time_round_robin([lambda: fp32.predict(example)], measure)
    stats = latency_stats(t for round_times in rounds for t in round_times)
    return {"p50": stats.p50, "p90": stats.p90, "p99": stats.p99, "mean": stats.mean}


def confirm_finalists(spec: ConfirmSpec) -> ConfirmResult:
    """Re-score and re-time ``spec``'s finalists together (the Ray task body).

    A finalist that cannot be loaded or rebuilt gets a result with its ``error``; the others are
    confirmed all the same.
    """
    started = time.time()
    set_threads(spec.num_threads)
    baseline = prepare_baseline(spec.task, spec.measure.eval_batch_size)
    reference = held_out_reference(spec.task, spec.measure.eval_batch_size)
    results: dict[int, FinalistResult] = {}
    candidates: dict[int, Candidate] = {}
    with tempfile.TemporaryDirectory(prefix="sweeper-confirm-") as workdir:
        for finalist in spec.finalists:
            try:
                candidate, source = _candidate(finalist, baseline, spec, Path(workdir) / str(finalist.trial_number))
                outputs, _ = predict_all(candidate.predict, held_out_batches(
                    baseline.task, baseline.keep, spec.measure.eval_batch_size))
            except Exception as exc:  # recorded; the other finalists are confirmed all the same
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"
                results[finalist.trial_number] = FinalistResult(trial_number=finalist.trial_number, error=error)
                continue
            candidates[finalist.trial_number] = candidate
            worse, better = _discordant(baseline, reference.outputs, reference.labels, outputs)
            results[finalist.trial_number] = FinalistResult(
                trial_number=finalist.trial_number, accuracy=baseline.task.metric(outputs, reference.labels),
                source=source, discordant_worse=worse, discordant_better=better,
            )
        example = baseline.task.example_inputs(spec.measure.batch_size)
        fp32 = fp32_candidate(baseline.model, baseline.task, spec.num_threads)
        models = [fp32, *candidates.values()]
        with exclusive_timing() as phase:
            rounds = time_round_robin(
                [_call(model, example) for model in models], spec.measure, min_rounds=spec.min_rounds
            )
    for number, times in zip(candidates, rounds[1:], strict=True):
        results[number] = dataclasses.replace(
            results[number], latency=latency_stats(t for r in times for t in r), round_ms=_round_ms(times)
        )
    return ConfirmResult(
        finalists=tuple(results[f.trial_number] for f in spec.finalists),
        split=reference.split,
        samples=int(len(reference.labels)),
        accuracy_fp32=reference.metric,
        baseline_latency=latency_stats(t for r in rounds[0] for t in r),
        baseline_round_ms=_round_ms(rounds[0]),
        environment=dataclasses.replace(environment(), device=spec.device),
        timing_wait_s=phase.wait_s,
        concurrent_timings=phase.concurrent,
        started_at=started,
        finished_at=time.time(),
    )


def _call(model: Candidate, example: Any) -> Any:
    return lambda: model.predict(example)


def _round_ms(rounds: list[list[float]]) -> tuple[float, ...]:
    return tuple(float(np.median(r)) * 1000.0 for r in rounds)


def _candidate(finalist: FinalistSpec, baseline: Baseline, spec: ConfirmSpec, workdir: Path) -> tuple[Candidate, str]:
    """The finalist's model: its trial's artifact when this node sees it, else rebuilt from its config."""
    backend = get_backend(finalist.backend)
    config = backend.config(finalist.params)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = build_context(baseline.model, baseline.task, workdir, spec.num_threads, spec.device)
    artifact = Path(finalist.artifact_path) if finalist.artifact_path and "://" not in finalist.artifact_path else None
    if artifact is not None and artifact.exists():
        try:
            return backend.load(artifact, ctx, config), "artifact"
        except Exception:  # an artifact this node cannot load (a backend without load): rebuilt below
            pass
    return backend.build(ctx, config), "rebuilt"


def _discordant(
    baseline: Baseline, fp32_outputs: np.ndarray, labels: np.ndarray, outputs: np.ndarray
) -> tuple[int | None, int | None]:
    """The paired counts (worse, better) behind the confirmed drop (top-1 tasks); ``None`` otherwise."""
    task = baseline.task
    fp32_correct, correct = task.correct(fp32_outputs, labels), task.correct(outputs, labels)
    if fp32_correct is None or correct is None:
        return None, None
    counts = DropCounts.from_predictions(fp32_correct, correct)
    return counts.worse, counts.better
