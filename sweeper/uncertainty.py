"""How sure a decision is: an accuracy drop's interval, the pruning test, and latency ties.

An accuracy drop between the FP32 model and a candidate, measured on the same ``n`` samples,
rests on the discordant samples: ``worse`` samples FP32 classifies right and the candidate wrong,
``better`` the other way round. The drop in points is ``100 * (worse - better) / n``. Each
discordant count is binomial, so exact (Clopper-Pearson) bounds on the two rates bound the drop;
splitting the error level between them (Bonferroni) keeps the bound valid without assuming the
two are independent. The bounds are conservative: on a finite evaluation split sampled without
replacement the true spread is smaller.

Latency: two configurations whose medians differ by less than the noise of their timed rounds
are a tie; the noise is a bootstrap interval of the ratio of their medians.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class DropCounts:
    """The paired counts behind an accuracy drop on ``n`` samples (top-1 classification)."""

    n: int
    worse: int
    better: int

    @classmethod
    def from_predictions(cls, fp32_correct: np.ndarray, candidate_correct: np.ndarray) -> DropCounts:
        fp32_correct = np.asarray(fp32_correct, dtype=bool)
        candidate_correct = np.asarray(candidate_correct, dtype=bool)
        return cls(
            n=len(fp32_correct),
            worse=int(np.sum(fp32_correct & ~candidate_correct)),
            better=int(np.sum(~fp32_correct & candidate_correct)),
        )

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.worse - self.better) / self.n


def _rate_bounds(k: int, n: int, level: float) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) bounds on a binomial rate at confidence ``level``."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def drop_interval(counts: DropCounts, confidence: float = 0.95) -> tuple[float, float]:
    """A two-sided interval (points) for the drop on the population the ``n`` samples came from."""
    # Each of the four one-sided bounds gets (1 - confidence) / 4; a two-sided bound at level
    # 1 - 2a has one-sided error a on each side.
    level = 1.0 - (1.0 - confidence) / 2.0
    worse_low, worse_high = _rate_bounds(counts.worse, counts.n, level)
    better_low, better_high = _rate_bounds(counts.better, counts.n, level)
    return 100.0 * (worse_low - better_high), 100.0 * (worse_high - better_low)


def drop_lower_bound(counts: DropCounts, confidence: float = 0.95) -> float:
    """A one-sided lower confidence bound (points) on the drop."""
    # One-sided error (1 - confidence) / 2 on each rate: a two-sided interval at level ``confidence``.
    worse_low, _ = _rate_bounds(counts.worse, counts.n, confidence)
    _, better_high = _rate_bounds(counts.better, counts.n, confidence)
    return 100.0 * (worse_low - better_high)


def should_prune(counts: DropCounts, max_drop_points: float, confidence: float = 0.95) -> bool:
    """Whether the drop on the whole split exceeds ``max_drop_points`` with ``confidence``.

    A candidate whose true drop is at the limit is pruned with probability at most
    ``1 - confidence``.
    """
    return drop_lower_bound(counts, confidence) > max_drop_points


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random share of each label's samples (at least one each)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = max(1, round(len(rows) * fraction))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


def latency_ratio_interval(
    a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of ``median(a) / median(b)`` from two samples of per-call latencies."""
    a = np.asarray(a_ms, dtype=float)
    b = np.asarray(b_ms, dtype=float)
    rng = np.random.default_rng(seed)
    a_medians = np.median(rng.choice(a, (resamples, len(a))), axis=1)
    ratios = a_medians / np.median(rng.choice(b, (resamples, len(b))), axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))


def tied(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95) -> bool:
    """Whether two latency samples are within each other's noise (the ratio interval holds 1)."""
    low, high = latency_ratio_interval(a_ms, b_ms, confidence)
    return low <= 1.0 <= high
