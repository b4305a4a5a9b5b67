"""Subset-first sensitivity's decisions: the seeded subset, the output error's interval, and which
layers are scored again on the whole split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from sweeper.errors import ConfigError
from sweeper.measure import DropCounts
from sweeper.triage import SubsetFirst, SubsetScore, output_error, output_error_interval, subset_rows, to_rescore


def test_the_subset_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [40, 40, 12, 2])
    rows = subset_rows(labels, SubsetFirst(fraction=0.25, seed=3), stratify=True)
    assert rows is not None
    assert np.array_equal(rows, subset_rows(labels, SubsetFirst(fraction=0.25, seed=3), stratify=True))
    assert not np.array_equal(rows, subset_rows(labels, SubsetFirst(fraction=0.25, seed=4), stratify=True))
    assert np.bincount(labels[rows]).tolist() == [10, 10, 3, 1]
    plain = subset_rows(np.linspace(0, 1, 100), SubsetFirst(fraction=0.3), stratify=False)
    assert plain is not None and len(plain) == 30 and np.all(np.diff(plain) > 0)
    capped = subset_rows(np.repeat(np.arange(2), 1000), SubsetFirst(fraction=0.25, max_samples=200), stratify=True)
    assert capped is not None and len(capped) == 200
    # A subset that would hold the whole split is no subset.
    assert subset_rows(np.arange(3), SubsetFirst(fraction=0.25), stratify=True) is None


def test_the_output_error_interval_holds_the_error_and_narrows_with_samples() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 10))
    outputs = reference + rng.normal(scale=0.1, size=reference.shape)
    low, high = output_error_interval(reference, outputs)
    assert low < output_error(reference, outputs) < high
    small_low, small_high = output_error_interval(reference[:40], outputs[:40])
    assert small_high - small_low > high - low
    assert output_error_interval(reference, reference) == (0.0, 0.0)


@dataclass(frozen=True)
class Case:
    name: str
    low: float
    high: float
    counts: DropCounts | None = None
    failed: bool = False
    rescored: bool = False


# top=2: the cutoff is the second-largest lower bound, 0.05 ("b").
CASES = [
    Case("a: surely in the top", 0.10, 0.20, rescored=True),
    Case("b: surely in the top", 0.05, 0.09, rescored=True),
    Case("c: overlaps the cutoff", 0.01, 0.06, rescored=True),
    Case("d: surely below the top two", 0.001, 0.04),
    Case("e: could be top, but its drop is surely over the budget", 0.02, 0.30,
         counts=DropCounts(n=80, worse=20, better=0)),
    Case("f: could be top, drop uncertain", 0.0, 0.08, counts=DropCounts(n=80, worse=1, better=0), rescored=True),
    Case("g: failed to score", float("nan"), float("nan"), failed=True),
]  # fmt: skip


def test_which_layers_are_scored_again() -> None:
    scores = [SubsetScore(layer=c.name, output_error_low=c.low, output_error_high=c.high, counts=c.counts,
                          failed=c.failed) for c in CASES]  # fmt: skip
    chosen = to_rescore(scores, SubsetFirst(top=2, resolve_points=1.0))
    assert chosen == [c.name for c in CASES if c.rescored]


def test_fewer_layers_than_the_top_are_all_scored_again() -> None:
    scores = [SubsetScore(layer=n, output_error_low=0.0, output_error_high=1e-6) for n in ("x", "y")]
    assert to_rescore(scores, SubsetFirst(top=5)) == ["x", "y"]


@pytest.mark.parametrize("field, value", [("fraction", 0.0), ("fraction", 1.5), ("top", 0), ("max_samples", 0),
                                          ("resolve_points", -1.0), ("confidence", 1.0)])  # fmt: skip
def test_bad_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        SubsetFirst(**{field: value})
