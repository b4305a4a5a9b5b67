"""sweeper: the fastest deployable form of a trained model within an accuracy budget.

Importing this package is cheap: torch, onnxruntime, ray and tensorrt are imported only by the
modules that use them. The public names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported when the name is first used).
_PUBLIC = {
    "run": "sweeper.api",
    "open_study": "sweeper.api",
    "Study": "sweeper.api",
    "ModelTask": "sweeper.model_task",
    "load": "sweeper.results",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sweeper' has no attribute {name!r}")
