"""Subset-first sensitivity: which layers a seeded subset of the evaluation split scores well
enough, and which are scored again on the whole split.

Scoring a layer means evaluating a model with only that layer quantized; on EfficientNet-Lite0
the evaluation is nearly all the cost (building the single-layer model from cached calibration
ranges takes a fraction of a second, evaluating its 463 trial views several seconds). So every layer is
first scored on a seeded random subset of the evaluation split (:func:`subset_rows`: stratified by
label for a top-1 task, at least one sample of each label), and only the layers whose place in
the ranking the subset leaves uncertain are scored on the whole split (:func:`to_rescore`).

The ranking is by output error, and what a ranking is used for is its top: the layers a search
leaves in float. A layer is re-scored when, on the subset's evidence, it could be among the
``top`` most sensitive layers and its metric drop is not already known to exceed the budget:

- *could be among the top*: the upper bound of its output error's bootstrap interval
  (:func:`output_error_interval`, over the subset's samples) reaches the ``top``-th largest lower
  bound among the layers. A layer below that cutoff has, at the interval's confidence, at least
  ``top`` layers above it, and keeps its subset figures;
- *known to exceed the budget*: for a top-1 task, the lower end of the subset's drop interval
  (:func:`~sweeper.measure.drop_interval` of its :class:`~sweeper.measure.DropCounts` against
  FP32) is above ``resolve_points``. Quantizing that layer alone already costs more than the
  budget; it is left in float whatever its exact figure, so the subset's figures stand.

A layer that failed to score is not re-scored (it ranks first either way). The intervals are per
layer, with no correction for looking at many layers at once; the cost of a layer wrongly kept at
its subset figures is a slightly misplaced layer below the top, not a wrong verdict on a trial
(trials are always evaluated on the whole split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sweeper.errors import ConfigError
from sweeper.measure import DropCounts, drop_interval, stratified_subset

# Bootstrap resamples behind an output error's interval.
RESAMPLES = 1000


@dataclass(frozen=True, kw_only=True)
class SubsetFirst:
    """How the subset-first pass is run.

    Attributes:
        fraction: share of the evaluation split in the subset (of each label's samples, for a
            top-1 task); 1.0 scores every layer on the whole split.
        max_samples: a smaller share when ``fraction`` of the split would be more samples than
            this (the ranking's output errors settle on a few hundred samples; a large split's
            share would cost as much as the whole split of a small one).
        seed: the subset's random seed (the same seed picks the same samples on a rerun).
        top: how many of the most sensitive layers must have whole-split figures (a study passes
            the most layers its exclusion search can leave in float).
        resolve_points: a layer whose subset drop is above this, with ``confidence``, is not
            re-scored (the study's ``max_drop``).
        confidence: of the drop intervals (the output errors' bootstrap intervals, computed in
            the scoring tasks, are at 95 %).
    """

    fraction: float = 0.25
    max_samples: int = 256
    seed: int = 0
    top: int = 16
    resolve_points: float = 1.0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        checks = {
            "fraction": (0.0 < self.fraction <= 1.0, "in (0, 1]"),
            "max_samples": (self.max_samples >= 1, "at least 1"),
            "top": (self.top >= 1, "at least 1"),
            "resolve_points": (self.resolve_points >= 0 and math.isfinite(self.resolve_points), ">= 0"),
            "confidence": (0.5 <= self.confidence < 1.0, "in [0.5, 1)"),
        }
        for field, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"subset-first sensitivity: {field} {getattr(self, field)!r} must be {allowed}")


def subset_rows(labels: np.ndarray, settings: SubsetFirst, *, stratify: bool) -> np.ndarray | None:
    """Sorted indices of the subset of an evaluation split with ``labels``, or ``None`` when the
    subset would be the whole split (nothing to gain). ``stratify``: per label (top-1 tasks),
    at least one sample of each label (so the subset may hold a few more than ``max_samples``)."""
    n = len(labels)
    fraction = min(settings.fraction, settings.max_samples / max(n, 1))
    if stratify:
        rows = stratified_subset(labels, fraction, settings.seed)
    else:
        rng = np.random.default_rng(settings.seed)
        rows = np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False))
    return None if len(rows) >= n else rows


def output_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Normalised squared error of ``outputs`` against ``reference`` (0 is identical)."""
    ref = reference.astype(np.float64)
    denom = float(np.sum(ref * ref)) or 1.0
    return float(np.sum((outputs.astype(np.float64) - ref) ** 2) / denom)


def sqnr_db(error: float) -> float:
    """Signal-to-quantization-noise ratio in dB from a normalised squared error."""
    if math.isnan(error):
        return math.nan
    return math.inf if error <= 0 else -10.0 * math.log10(error)


def output_error_interval(
    reference: np.ndarray, outputs: np.ndarray, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval (resampling samples, the first axis) of the normalised output error
    ``sum ||y - y_ref||^2 / sum ||y_ref||^2``."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    noise = np.sum((outputs.astype(np.float64).reshape(len(outputs), -1) - ref) ** 2, axis=1)
    signal = np.sum(ref * ref, axis=1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ref), size=(RESAMPLES, len(ref)))
    ratios = noise[picks].sum(axis=1) / np.maximum(signal[picks].sum(axis=1), np.finfo(np.float64).tiny)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))


@dataclass(frozen=True, kw_only=True)
class SubsetScore:
    """What the subset says about one layer (``counts``: ``None`` for a task that is not top-1)."""

    layer: str
    output_error_low: float
    output_error_high: float
    counts: DropCounts | None = None
    failed: bool = False


def drop_bounds(counts: DropCounts | None, confidence: float) -> tuple[float, float]:
    """The drop interval (points) of ``counts``, NaN when there are none."""
    if counts is None or counts.n == 0:
        return math.nan, math.nan
    return drop_interval(counts, confidence)


def to_rescore(scores: Sequence[SubsetScore], settings: SubsetFirst) -> list[str]:
    """The layers of ``scores`` to score again on the whole split (see the module docstring), in
    the order given."""
    scored = [s for s in scores if not s.failed]
    lows = sorted((s.output_error_low for s in scored), reverse=True)
    cutoff = lows[settings.top - 1] if len(lows) >= settings.top else -math.inf
    chosen = []
    for s in scored:
        could_be_top = s.output_error_high >= cutoff
        over_budget = drop_bounds(s.counts, settings.confidence)[0] > settings.resolve_points
        if could_be_top and not over_budget:
            chosen.append(s.layer)
    return chosen
