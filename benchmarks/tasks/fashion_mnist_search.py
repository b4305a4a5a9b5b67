"""Fashion-MNIST with its evaluation set halved: one half for the search, one held out.

The project's ``tasks/fashion_mnist_cnn.py`` evaluates on the official 10,000 test images. The
search benchmark (``benchmarks/benchmark_search.py``) needs accuracy figures that no search
decision saw, so this task splits those 10,000 images once, stratified by class with seed 0, into
two halves of 5,000:

- ``TASK``: evaluation = the *search* half. Trials, sweeps and the sensitivity ranking use it.
- ``HELD_OUT``: evaluation = the *held-out* half. Only the benchmark reads it, to check the
  winners of each search after the fact.

Training and calibration splits, the model and its trained weights are exactly those of
``fashion_mnist_cnn`` (the weights file is shared: none of it depends on the evaluation split).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.array_task import ArraySplit, ArraySplits
from sweeper.task import LabeledBatch, load_task

_BASE_FILE = Path(__file__).resolve().parents[2] / "tasks" / "fashion_mnist_cnn.py"
_BASE = load_task(str(_BASE_FILE))
# The project's task class (a module loaded by path, so it is reached through its instance).
_BaseTask: Any = type(_BASE)
HOLD_OUT_SEED = 0
HOLD_OUT_FRACTION = 0.5


def halves(evaluation: ArraySplit) -> tuple[ArraySplit, ArraySplit]:
    """The (search, held-out) halves of ``evaluation``: stratified by label, seeded, disjoint."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(evaluation), dtype=np.int64)
    search, held_out = train_test_split(
        rows, test_size=HOLD_OUT_FRACTION, stratify=evaluation.labels, random_state=HOLD_OUT_SEED
    )

    def take(picked: np.ndarray) -> ArraySplit:
        picked = np.sort(picked)
        return ArraySplit(
            inputs=evaluation.inputs[picked], labels=evaluation.labels[picked], ids=evaluation.ids[picked]
        )

    return take(search), take(held_out)


class FashionMnistSearch(_BaseTask):
    """``fashion_mnist_cnn`` evaluated on one half of its test images (``part``)."""

    name = "fashion_mnist_search"

    def __init__(self, part: str) -> None:
        super().__init__()
        if part not in ("search", "held_out"):
            raise ValueError(f"part must be 'search' or 'held_out', got {part!r}")
        self.part = part

    def make_splits(self) -> ArraySplits:
        full = _BASE.splits
        search, held_out = halves(full.evaluation)
        return ArraySplits(
            train=full.train, calibration=full.calibration, evaluation=search if self.part == "search" else held_out
        )

    def weights_path(self) -> Path:
        return _BASE.weights_path()

    def confirm_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        """The other half: a sweep confirms its finalists there, and its trials see all of theirs."""
        _, held_out = halves(_BASE.splits.evaluation)
        other = held_out if self.part == "search" else halves(_BASE.splits.evaluation)[0]
        return self._labeled(other.batches(batch_size))


TASK = FashionMnistSearch("search")
HELD_OUT = FashionMnistSearch("held_out")
