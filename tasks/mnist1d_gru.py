"""A GRU on MNIST-1D sequences, generated procedurally by the ``mnist1d`` package (no download).

The dataset is ``make_dataset(get_dataset_args())`` (seed 42): 4,000 samples ``x`` and 1,000
``x_test``, 40 steps each, already centred and scaled. It is generated once and cached under
``cache_dir("tasks")``. Splits: 3,500 train and 500 calibration drawn from ``x`` (stratified,
seed 0), evaluation = ``x_test``. Inputs are ``(N, 40, 1)`` float32, batch first.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeper.array_task import ArrayClassificationTask, ArraySplit, ArraySplits, TrainingRecipe
from sweeper.location import cache_dir, cache_key, cached_file

_SPLIT_SEED = 0
_CALIBRATION_SIZE = 500


class SequenceGRU(nn.Module):
    """A GRU over the sequence followed by a Linear head on the last time step."""

    def __init__(self, hidden_size: int = 128, num_layers: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=1, hidden_size=hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.gru(x)
        return self.head(sequence[:, -1])


class Mnist1dGRU(ArrayClassificationTask):
    """MNIST-1D digits classified by :class:`SequenceGRU`."""

    name = "mnist1d_gru"
    input_names = ("input",)
    output_names = ("logits",)
    architecture_version = 1
    recipe = TrainingRecipe(
        epochs=30, batch_size=64, learning_rate=3e-3, weight_decay=1e-4, max_grad_norm=1.0, seed=0
    )

    def make_splits(self) -> ArraySplits:
        from sklearn.model_selection import train_test_split

        with np.load(_dataset_file()) as data:
            x, y = data["x"], data["y"]
            x_test, y_test = data["x_test"], data["y_test"]
        ids = np.arange(len(y), dtype=np.int64)
        train, calibration = train_test_split(
            ids, test_size=_CALIBRATION_SIZE, stratify=y, random_state=_SPLIT_SEED
        )

        def split(inputs: np.ndarray, labels: np.ndarray, rows: np.ndarray, first_id: int = 0) -> ArraySplit:
            return ArraySplit(
                inputs=inputs[rows, :, None].astype(np.float32),
                labels=labels[rows].astype(np.int64),
                ids=rows.astype(np.int64) + first_id,
            )

        return ArraySplits(
            train=split(x, y, train),
            calibration=split(x, y, calibration),
            # Test samples get ids after the training pool's so the two pools never collide.
            evaluation=split(x_test, y_test, np.arange(len(y_test)), first_id=len(y)),
        )

    def make_model(self) -> nn.Module:
        return SequenceGRU()


def _dataset_file() -> Path:
    """Generate the MNIST-1D arrays once per machine (about 3 s with imports) and cache them."""
    from importlib.metadata import version

    # The default arguments live in the package, so its version stands for them; reading it
    # does not import mnist1d (and matplotlib, scipy), which a cache hit does not need.
    key = cache_key(dataset="mnist1d", generator="make_dataset(get_dataset_args())", version=version("mnist1d"))
    return cached_file(cache_dir("tasks") / f"mnist1d-{key}.npz", _write_dataset)


def _write_dataset(path: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global numpy and random generators; keep the caller's streams.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    with path.open("wb") as f:  # a file object, because np.savez appends .npz to a bare name
        np.savez(f, **{k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")})


TASK = Mnist1dGRU()
