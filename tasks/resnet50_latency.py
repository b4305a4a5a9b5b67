"""Latency-only: torchvision ResNet50 with random weights (no accuracy claim); see ``_latency_shapes.py``."""

from __future__ import annotations

from pathlib import Path

from sweeper.task import load_task

TASK = load_task(str(Path(__file__).with_name("_latency_shapes.py")), "RESNET50")
