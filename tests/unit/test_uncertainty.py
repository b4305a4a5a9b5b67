"""Intervals of accuracy drops, the pruning test and latency ties (sweeper.measure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from sweeper.measure import DropCounts, drop_interval, should_prune, stratified_subset, tied


@dataclass(frozen=True)
class PruneCase:
    counts: DropCounts
    max_drop: float
    pruned: bool
    why: str


CASES = [
    PruneCase(DropCounts(n=90, worse=0, better=0), 1.0, False, "no discordant sample"),
    PruneCase(DropCounts(n=90, worse=2, better=0), 1.0, False, "2 of 90 is 2.2 points, within the noise"),
    PruneCase(DropCounts(n=90, worse=20, better=0), 1.0, True, "22 points lost on 90 samples"),
    PruneCase(DropCounts(n=1000, worse=40, better=10), 1.0, True, "3 points on 1000 samples"),
    PruneCase(DropCounts(n=1000, worse=25, better=10), 1.0, False, "1.5 points on 1000 samples: not sure"),
    PruneCase(DropCounts(n=65, worse=12, better=0), 1.0, True, "segment_mlp's full INT8 on a quarter split"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.why for c in CASES])
def test_the_pruning_decision(case: PruneCase) -> None:
    assert should_prune(case.counts, case.max_drop) is case.pruned


def test_counts_from_predictions_and_the_drop() -> None:
    fp32 = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    cand = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    counts = DropCounts.from_predictions(fp32, cand)
    assert (counts.n, counts.worse, counts.better) == (6, 2, 1)
    assert counts.drop_points == pytest.approx(100 / 6)


def test_the_interval_holds_the_drop_and_narrows_with_more_samples() -> None:
    small = DropCounts(n=100, worse=5, better=1)
    large = DropCounts(n=10_000, worse=500, better=100)
    for counts in (small, large):
        low, high = drop_interval(counts)
        assert low < counts.drop_points < high
    assert np.diff(drop_interval(large))[0] < np.diff(drop_interval(small))[0] / 5


def _simulate(worse: int, better: int, n_split: int, fraction: float, reps: int, seed: int) -> float:
    """Share of seeded subsets of a fixed split on which a candidate is pruned (max drop 1 point).

    The candidate gets ``worse`` samples of the split wrong that FP32 gets right, and ``better``
    right that FP32 gets wrong: its drop on the whole split is 100 * (worse - better) / n_split.
    """
    rng = np.random.default_rng(seed)
    fp32 = rng.random(n_split) < 0.9
    cand = fp32.copy()
    cand[rng.choice(np.flatnonzero(fp32), worse, replace=False)] = False
    cand[rng.choice(np.flatnonzero(~fp32), better, replace=False)] = True
    labels = rng.integers(0, 10, size=n_split)
    pruned = 0
    for rep in range(reps):
        rows = stratified_subset(labels, fraction, seed=rep)
        pruned += should_prune(DropCounts.from_predictions(fp32[rows], cand[rows]), 1.0)
    return pruned / reps


def test_a_candidate_at_the_limit_is_pruned_at_most_5_percent_of_the_time() -> None:
    # 40 worse and 20 better of 2000: a drop of exactly 1 point on the split, feasible at the limit.
    assert 100 * (40 - 20) / 2000 == 1.0
    assert _simulate(40, 20, n_split=2000, fraction=0.25, reps=300, seed=0) <= 0.05


def test_a_candidate_far_beyond_the_limit_is_pruned() -> None:
    # A 10-point drop (220 worse, 20 better) is caught on a quarter of the split.
    assert _simulate(220, 20, n_split=2000, fraction=0.25, reps=100, seed=1) >= 0.95


def test_the_subset_is_stratified_seeded_and_spread() -> None:
    labels = np.repeat(np.arange(13), 20)  # 13 photos x 20 views, grouped as EfficientNet-Lite0's are
    rows = stratified_subset(labels, 0.25, seed=3)
    assert len(np.unique(labels[rows])) == 13 and len(rows) == 13 * 5
    assert np.array_equal(rows, stratified_subset(labels, 0.25, seed=3))
    assert not np.array_equal(rows, stratified_subset(labels, 0.25, seed=4))


def test_latency_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(1.00, 0.05, 200)
    assert tied(a, rng.normal(1.005, 0.05, 200))
    assert not tied(a, rng.normal(1.20, 0.05, 200))


def test_a_tie_margin_ties_what_the_rounds_alone_separate() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 0.005, 600), rng.normal(1.01, 0.005, 600)  # 1 % apart, tight rounds
    assert not tied(a, b), "the rounds alone resolve 1 %"
    assert tied(a, b, margin=0.02) and not tied(a, rng.normal(1.05, 0.005, 600), margin=0.02)
