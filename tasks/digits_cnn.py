"""A small CNN on scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).

Splits (stratified, seed 0): 1,077 train, 360 calibration, 360 evaluation. Inputs are
``(N, 1, 8, 8)`` float32 in [0, 1]. The model has three Conv2d+BatchNorm2d+ReLU blocks named
``features.{0,1,2}``, ``features.{3,4,5}`` and ``features.{7,8,9}`` (fusable triples), max pooling
at ``features.6``, global average pooling and a Linear+ReLU+Linear head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sweeper.array_task import ArrayClassificationTask, ArraySplits, TrainingRecipe

_SPLIT_SEED = 0
_CALIBRATION_SIZE = 360
_EVALUATION_SIZE = 360


class DigitsNet(nn.Module):
    """Conv-BN-ReLU x3 with pooling, then a two-layer classifier head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class DigitsCNN(ArrayClassificationTask):
    """Handwritten 8x8 digits classified by :class:`DigitsNet`."""

    name = "digits_cnn"
    input_names = ("input",)
    output_names = ("logits",)
    architecture_version = 1
    recipe = TrainingRecipe(epochs=15, batch_size=64, learning_rate=3e-3, weight_decay=1e-4, seed=0)

    def make_splits(self) -> ArraySplits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        inputs = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        labels = digits.target.astype(np.int64)
        return ArraySplits.stratified(
            inputs, labels, calibration_size=_CALIBRATION_SIZE, evaluation_size=_EVALUATION_SIZE, seed=_SPLIT_SEED
        )

    def make_model(self) -> nn.Module:
        return DigitsNet()


TASK = DigitsCNN()
