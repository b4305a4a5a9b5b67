"""Measurement: latency, accuracy drop, fidelity. Pure functions where possible.

The FP32 baseline is timed in the same process as the candidate, in alternating rounds, so that
``speedup`` compares two models under the same machine load; absolute times on a busy machine
drift, the ratio much less.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np

from sweeper.spec import LatencyStats, MeasureSettings

DropMode = Literal["absolute", "relative"]


def latency_stats(seconds: Iterable[float]) -> LatencyStats:
    """Summarise per-call times given in seconds as milliseconds."""
    ms = np.asarray(list(seconds), dtype=np.float64) * 1000.0
    if ms.size == 0:
        raise ValueError("latency_stats needs at least one timed run")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        mean=float(ms.mean()),
        std=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        runs=int(ms.size),
    )


def time_interleaved(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    settings: MeasureSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[LatencyStats, LatencyStats]:
    """Time ``baseline`` and ``candidate`` in alternating rounds; return (baseline, candidate).

    Each round times ``round_size`` calls of one model, then of the other; the order flips every
    round so that neither model always runs right after the other's cache effects.
    """
    for _ in range(settings.warmup_runs):
        baseline()
        candidate()
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    fns = {"baseline": baseline, "candidate": candidate}
    start = clock()
    round_index = 0
    while True:
        done = len(times["candidate"])
        enough_runs = done >= settings.min_runs and clock() - start >= settings.min_time_s
        if enough_runs or done >= settings.max_runs:
            break
        order = ("baseline", "candidate") if round_index % 2 == 0 else ("candidate", "baseline")
        calls = min(settings.round_size, settings.max_runs - done)
        for name in order:
            fn, sink = fns[name], times[name]
            for _ in range(calls):
                t0 = clock()
                fn()
                sink.append(clock() - t0)
        round_index += 1
    return latency_stats(times["baseline"]), latency_stats(times["candidate"])


def accuracy_drop(
    fp32: float, candidate: float, *, higher_is_better: bool = True, mode: DropMode = "absolute"
) -> float:
    """How much worse ``candidate`` is than ``fp32``; positive means worse.

    ``absolute`` is in the metric's own units (points, for a percentage); ``relative`` is in
    percent of the FP32 value.
    """
    drop = fp32 - candidate if higher_is_better else candidate - fp32
    if mode == "absolute":
        return float(drop)
    if mode == "relative":
        if fp32 == 0:
            raise ValueError("a relative accuracy drop is undefined when the FP32 metric is 0")
        return float(drop / abs(fp32) * 100.0)
    raise ValueError(f"unknown drop mode '{mode}'; allowed: absolute, relative")


def agreement_pct(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Percent of samples whose top-1 class matches the reference's (last axis = classes)."""
    if reference.shape != outputs.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the reference's {reference.shape}")
    return float(np.mean(np.argmax(reference, -1) == np.argmax(outputs, -1)) * 100.0)


def max_abs_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Largest absolute difference between two outputs of the same shape."""
    if reference.shape != outputs.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the reference's {reference.shape}")
    return float(np.max(np.abs(reference.astype(np.float64) - outputs.astype(np.float64))))
