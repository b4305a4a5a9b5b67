"""What Optuna is told: a latency scaled by the same-trial FP32 baseline and the study's reference."""

from __future__ import annotations

import pytest

from sweeper.rows import objective_value
from sweeper.spec import FP32Baseline, LatencyStats, TrialResult


def _stats(p50: float) -> LatencyStats:
    return LatencyStats(p50=p50, p90=2 * p50, p99=3 * p50, mean=p50, std=0.0, runs=10)


def _result(candidate: float, baseline: float, device: str = "cpu") -> TrialResult:
    return TrialResult(state="complete", started_at=0.0, finished_at=1.0, latency=_stats(candidate),
                       baseline_latency=_stats(baseline), baseline_device=device, size_bytes=1234)


REFERENCE = FP32Baseline(metric=99.0, reference_latency_ms={"p50": 3.0, "p90": 6.0, "p99": 9.0, "mean": 3.0})


def test_a_slow_moment_does_not_change_what_optuna_is_told() -> None:
    # The same candidate measured in a calm and in a busy moment: both models slow down together.
    calm = objective_value("latency_ms_p50", _result(1.0, 2.0), REFERENCE)
    busy = objective_value("latency_ms_p50", _result(1.5, 3.0), REFERENCE)
    assert calm == busy == pytest.approx(1.5)  # half the reference FP32 latency (3 ms)
    assert objective_value("latency_ms_p90", _result(1.0, 2.0), REFERENCE) == pytest.approx(3.0)


def test_without_a_reference_on_the_device_the_latency_is_told_as_measured() -> None:
    assert objective_value("latency_ms_p50", _result(1.0, 2.0, device="cuda"), REFERENCE) == 1.0
    assert objective_value("latency_ms_p50", _result(1.0, 2.0), FP32Baseline(metric=99.0)) == 1.0


def test_size_is_told_as_it_is() -> None:
    assert objective_value("size_bytes", _result(1.0, 2.0), REFERENCE) == 1234.0
