"""A small CNN on Fashion-MNIST: 70,000 real 28x28 grayscale photos of clothing, 10 classes.

The data come from the Debian package ``dataset-fashion-mnist`` (files under
``/usr/share/datasets/fashion-mnist/``; ``SWEEPER_FASHION_MNIST_DIR`` points elsewhere), which
installs offline from the distribution's mirror: ``apt-get install dataset-fashion-mnist``.

Splits: the 60,000 training images give 55,000 train and 5,000 calibration samples (stratified,
seed 0); evaluation is the official 10,000-image test set. Inputs are ``(N, 1, 28, 28)`` float32
in [0, 1]. The model has three Conv2d+BatchNorm2d+ReLU blocks (``features.{0,1,2}``,
``features.{4,5,6}``, ``features.{8,9,10}``, fusable triples) with max pooling after the first
two, then a Linear+ReLU+Linear head. It trains once (6 epochs, about 2-3 minutes on one core) and the
weights are cached.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeper.array_task import ArrayClassificationTask, ArraySplit, ArraySplits, TrainingRecipe
from sweeper.errors import TaskError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_SPLIT_SEED = 0
_CALIBRATION_SIZE = 5_000


def data_dir() -> Path:
    """The folder holding the four Fashion-MNIST IDX files."""
    return Path(os.environ.get("SWEEPER_FASHION_MNIST_DIR") or DATA_DIR)


def unavailable_reason() -> str | None:
    """Why the data cannot be read here, or ``None``."""
    missing = [name for name in _FILES.values() if not (data_dir() / name).is_file()]
    if missing:
        return (
            f"Fashion-MNIST files {missing} are not in {data_dir()}; install them with "
            f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set SWEEPER_FASHION_MNIST_DIR"
        )
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format: big-endian header, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte elements
        raise TaskError(f"{path} is not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise TaskError(f"{path} holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


class FashionNet(nn.Module):
    """Conv-BN-ReLU x3 with two max pools, then a two-layer classifier head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FashionMnistCNN(ArrayClassificationTask):
    """Fashion-MNIST clothing photos classified by :class:`FashionNet`."""

    name = "fashion_mnist_cnn"
    input_names = ("input",)
    output_names = ("logits",)
    architecture_version = 1
    recipe = TrainingRecipe(epochs=6, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, seed=0)

    def make_splits(self) -> ArraySplits:
        from sklearn.model_selection import train_test_split

        reason = unavailable_reason()
        if reason:
            raise TaskError(f"task '{self.name}': {reason}")
        files = {key: read_idx(data_dir() / name) for key, name in _FILES.items()}
        train_x, train_y = files["train_images"], files["train_labels"].astype(np.int64)
        test_x, test_y = files["test_images"], files["test_labels"].astype(np.int64)
        if len(train_x) != len(train_y) or len(test_x) != len(test_y):
            raise TaskError(f"task '{self.name}': image and label counts differ in {data_dir()}")
        ids = np.arange(len(train_y), dtype=np.int64)
        train, calibration = train_test_split(
            ids, test_size=_CALIBRATION_SIZE, stratify=train_y, random_state=_SPLIT_SEED
        )

        def split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, first_id: int = 0) -> ArraySplit:
            return ArraySplit(
                inputs=(images[rows, None, :, :].astype(np.float32) / 255.0),
                labels=labels[rows],
                ids=rows.astype(np.int64) + first_id,
            )

        return ArraySplits(
            train=split(train_x, train_y, train),
            calibration=split(train_x, train_y, calibration),
            # Test images get ids after the training file's, so the two files never collide.
            evaluation=split(test_x, test_y, np.arange(len(test_y)), first_id=len(train_y)),
        )

    def make_model(self) -> nn.Module:
        return FashionNet()


TASK = FashionMnistCNN()
