"""sweeper: the fastest deployable form of a trained model within an accuracy budget.

Importing this package is cheap: torch, onnxruntime, ray and tensorrt are imported only by the
modules that use them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
