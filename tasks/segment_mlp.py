"""An MLP on raw tabular features: UCI Image Segmentation, as bundled by the ``river`` package.

The data are the 2,310 rows of the UCI "Statlog (Image Segmentation)" set (``river.datasets.
ImageSegments``, shipped inside the wheel, no download): 18 numeric features computed on 3x3 pixel
regions of outdoor images, 7 balanced classes (brickface, cement, foliage, grass, path, sky,
window). They are read once and cached under ``cache_dir("tasks")``. Splits (stratified, seed 0):
1,320 train, 330 calibration, 660 evaluation. Inputs are the raw features, ``(N, 18)`` float32.

The model takes raw features and normalises them itself with a ``BatchNorm1d`` on its input, as
tabular networks commonly do (fastai's ``TabularModel`` puts a ``BatchNorm1d`` on the continuous
variables) so that deployment needs no separate preprocessing step. Then Linear+ReLU twice and a
Linear head; the modules are ``input_norm``, ``hidden.{0,2}`` and ``head``.

Why full INT8 fails here (the reason this task exists): the raw features span very different
scales. Saturation (0..1), line densities (0..0.33) and hue (-3..3) sit beside pixel coordinates
(1..254), colour means (up to 150) and edge-contrast standard deviations with a heavy tail
(``hedge-sd`` has median 1 but reaches 1,386). ONNX Runtime static quantization (QDQ format)
quantizes the ``BatchNormalization`` node's input, i.e. the raw feature vector, with one scale per
tensor: calibration on the first 128 calibration samples gives it the range [-49, 488] (minmax,
entropy and percentile alike), so a uint8 step (2.1) is wider than the whole range of saturation
and the line densities, and hue keeps three levels. Per-channel quantization does not help (it
only applies to weights), and no clipping of the tail can bring the range below that of the
coordinates, which are common values. Keeping the one ``BatchNormalization`` node in float
(``nodes_to_exclude``) leaves the raw input unquantized; everything after it sees normalised
activations and quantizes well. (ORT's QOperator format has no quantized BatchNormalization, so
there it stays in float anyway.) The measured figures are in ``tests/unit/test_exclusion_task.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeper.array_task import ArrayClassificationTask, ArraySplits, TrainingRecipe
from sweeper.location import cache_dir, cache_key, cached_file

_SPLIT_SEED = 0
_CALIBRATION_SIZE = 330
_EVALUATION_SIZE = 660
# The dataset's feature names, in a fixed order (river yields each row as a dict); "vegde" is the
# dataset's own spelling.
FEATURES = (
    "region-centroid-col", "region-centroid-row", "short-line-density-5", "short-line-density-2",
    "vedge-mean", "vegde-sd", "hedge-mean", "hedge-sd", "intensity-mean", "rawred-mean",
    "rawblue-mean", "rawgreen-mean", "exred-mean", "exblue-mean", "exgreen-mean", "value-mean",
    "saturation-mean", "hue-mean",
)  # fmt: skip
CLASSES = ("brickface", "cement", "foliage", "grass", "path", "sky", "window")


class TabularMLP(nn.Module):
    """BatchNorm on the raw features, two Linear+ReLU layers and a Linear head."""

    def __init__(
        self, num_features: int = len(FEATURES), hidden: int = 64, num_classes: int = len(CLASSES)
    ) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(num_features)
        self.hidden = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.input_norm(x)))


class SegmentMLP(ArrayClassificationTask):
    """Image-region classes from raw UCI Image Segmentation features, by :class:`TabularMLP`."""

    name = "segment_mlp"
    input_names = ("input",)
    output_names = ("logits",)
    architecture_version = 1
    recipe = TrainingRecipe(epochs=60, batch_size=64, learning_rate=3e-3, weight_decay=1e-4, seed=0)

    def make_splits(self) -> ArraySplits:
        with np.load(_dataset_file()) as data:
            inputs, labels = data["x"], data["y"]
        return ArraySplits.stratified(
            inputs, labels, calibration_size=_CALIBRATION_SIZE, evaluation_size=_EVALUATION_SIZE, seed=_SPLIT_SEED
        )

    def make_model(self) -> nn.Module:
        return TabularMLP()


def _dataset_file() -> Path:
    """Read river's bundled CSV once per machine and cache it as arrays (river imports in ~2 s)."""
    from importlib.metadata import version

    key = cache_key(dataset="river.datasets.ImageSegments", version=version("river"), features=FEATURES)
    return cached_file(cache_dir("tasks") / f"image-segments-{key}.npz", _write_dataset)


def _write_dataset(path: Path) -> None:
    from river.datasets import ImageSegments

    rows = list(ImageSegments())
    x = np.array([[row[name] for name in FEATURES] for row, _ in rows], dtype=np.float32)
    y = np.array([CLASSES.index(label) for _, label in rows], dtype=np.int64)
    with path.open("wb") as f:  # a file object, because np.savez appends .npz to a bare name
        np.savez(f, x=x, y=y)


TASK = SegmentMLP()
