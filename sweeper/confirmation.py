"""The finalists' confirmation, as it runs inside one Ray task on one node.

The study's finalists are loaded from their trials' artifacts (or rebuilt where the artifact is
not on this node), re-scored on the held-out split (:mod:`sweeper.holdout`), then timed together
with the FP32 model, round-robin, under the machine's timing lock
(:func:`sweeper.measure.time_round_robin`), with more runs than a trial. The driver turns the
:class:`~sweeper.spec.ConfirmResult` into confirmation rows (:mod:`sweeper.finalists`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.backends import Candidate, get_backend
from sweeper.holdout import held_out_batches, predict_all
from sweeper.measure import DropCounts, exclusive_timing, latency_stats, time_round_robin
from sweeper.spec import ConfirmResult, ConfirmSpec, FinalistResult, FinalistSpec
from sweeper.worker import (
    Baseline,
    build_context,
    environment,
    fp32_candidate,
    held_out_reference,
    prepare_baseline,
    set_threads,
)


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
