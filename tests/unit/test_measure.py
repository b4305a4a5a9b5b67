from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest

from sweeper.measure import (
    accuracy_drop,
    agreement_pct,
    latency_stats,
    max_abs_error,
    time_interleaved,
)
from sweeper.spec import MeasureSettings


@dataclass(frozen=True)
class DropCase:
    fp32: float
    candidate: float
    higher_is_better: bool
    mode: str
    expected: float


DROP_CASES = [
    DropCase(98.0, 97.5, True, "absolute", 0.5),
    DropCase(98.0, 98.5, True, "absolute", -0.5),  # the candidate is better: a negative drop
    DropCase(80.0, 76.0, True, "relative", 5.0),
    DropCase(0.20, 0.25, False, "absolute", 0.05),  # lower is better (an error rate or loss)
    DropCase(0.20, 0.15, False, "absolute", -0.05),
    DropCase(2.0, 2.5, False, "relative", 25.0),
    DropCase(50.0, 50.0, True, "relative", 0.0),
]


@pytest.mark.parametrize("case", DROP_CASES, ids=lambda c: f"{c.fp32}-{c.candidate}-{c.higher_is_better}-{c.mode}")
def test_accuracy_drop_table(case: DropCase) -> None:
    got = accuracy_drop(case.fp32, case.candidate, higher_is_better=case.higher_is_better, mode=case.mode)
    assert got == pytest.approx(case.expected)


def test_accuracy_drop_rejects_unknown_mode_and_relative_zero() -> None:
    with pytest.raises(ValueError, match="allowed: absolute, relative"):
        accuracy_drop(1.0, 1.0, mode="percent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="undefined"):
        accuracy_drop(0.0, 1.0, mode="relative")


def test_latency_stats_in_milliseconds() -> None:
    stats = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats.p50 == pytest.approx(3.0)
    assert stats.mean == pytest.approx(4.0)
    assert stats.runs == 5
    assert stats.p99 <= 10.0 and stats.p99 > stats.p90 > stats.p50
    assert stats.std == pytest.approx(float(np.std([1, 2, 3, 4, 10], ddof=1)))


def test_latency_stats_needs_runs() -> None:
    with pytest.raises(ValueError):
        latency_stats([])


def test_time_interleaved_alternates_and_stops_at_max_runs() -> None:
    calls: list[str] = []
    ticks = itertools.count()
    settings = MeasureSettings(warmup_runs=2, min_runs=5, max_runs=40, min_time_s=1e9, round_size=4)
    base, cand = time_interleaved(
        lambda: calls.append("b"), lambda: calls.append("c"), settings, clock=lambda: float(next(ticks))
    )
    assert cand.runs == 40 and base.runs == 40  # min_time_s is never reached: max_runs ends it
    timed = calls[4:]  # after two warm-up pairs
    rounds = ["".join(timed[i : i + 4]) for i in range(0, len(timed), 4)]
    assert rounds[:4] == ["bbbb", "cccc", "cccc", "bbbb"]  # the order flips every round


def test_time_interleaved_stops_after_min_runs_and_time() -> None:
    ticks = itertools.count()
    settings = MeasureSettings(warmup_runs=0, min_runs=20, max_runs=10_000, min_time_s=0.0, round_size=10)
    _, cand = time_interleaved(lambda: None, lambda: None, settings, clock=lambda: float(next(ticks)))
    assert cand.runs == 20


def test_agreement_and_error() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    out = np.array([[0.9, 0.1], [0.0, 1.0], [0.0, 1.0], [0.2, 0.1]])
    assert agreement_pct(ref, out) == pytest.approx(75.0)
    assert max_abs_error(ref, out) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        agreement_pct(ref, out[:2])
    assert not math.isnan(max_abs_error(ref, ref))
