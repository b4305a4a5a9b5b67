"""N-way interleaved timing: every model of one table timed in the same rounds, in one process.

:func:`sweeper.measure.time_interleaved` times two callables; a benchmark table compares each
candidate with two references (PyTorch FP32 and ONNX Runtime FP32), so here all of them share the
rounds: each round times ``round_size`` calls of every model in turn, and the starting model
rotates every round, so no model always follows the same other one. Every ratio in a table then
compares models measured under the same machine load.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sweeper.measure import latency_stats
from sweeper.spec import LatencyStats, MeasureSettings


def time_round_robin(
    fns: dict[str, Callable[[], object]],
    settings: MeasureSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, LatencyStats], dict[str, str]]:
    """Time every callable of ``fns`` interleaved; return (stats by name, errors by name).

    Each callable first gets ``settings.warmup_runs`` untimed calls. Rounds continue until every
    model has ``settings.min_runs`` calls and ``settings.min_time_s`` has passed, or
    ``settings.max_runs`` is reached. A callable that raises is dropped with its error; the
    others go on.
    """
    errors: dict[str, str] = {}
    live: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(settings.warmup_runs):
                fn()
        except Exception as exc:  # a candidate that cannot run is reported, the others timed
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        live[name] = fn
    times: dict[str, list[float]] = {name: [] for name in live}
    start = clock()
    round_index = 0
    while live:
        done = min(len(times[name]) for name in live)
        if (done >= settings.min_runs and clock() - start >= settings.min_time_s) or done >= settings.max_runs:
            break
        names = list(live)
        k = round_index % len(names)
        calls = min(settings.round_size, settings.max_runs - done)
        for name in names[k:] + names[:k]:
            fn, sink = live[name], times[name]
            try:
                for _ in range(calls):
                    t0 = clock()
                    fn()
                    sink.append(clock() - t0)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                del live[name]
        round_index += 1
    return {name: latency_stats(times[name]) for name in live}, errors
