"""Backends, registered by name. Importing this package imports no backend module.

``BACKENDS`` maps each name to ``module:Class``; :func:`get_backend` imports the module on first
use, so a machine without an optional dependency never imports it.
"""

from __future__ import annotations

import importlib
from functools import cache

from sweeper.backends._base import Backend, BackendConfig, BuildContext, Candidate
from sweeper.errors import ConfigError, did_you_mean

BACKENDS: dict[str, str] = {
    "onnxruntime_fp32": "sweeper.backends.onnxruntime_fp32:OnnxRuntimeFP32",
    "onnxruntime_static_int8": "sweeper.backends.onnxruntime_static_int8:OnnxRuntimeStaticInt8",
    "onnxruntime_dynamic_int8": "sweeper.backends.onnxruntime_dynamic_int8:OnnxRuntimeDynamicInt8",
    "torch_dynamic_int8": "sweeper.backends.torch_dynamic_int8:TorchDynamicInt8",
    "torch_static_int8": "sweeper.backends.torch_static_int8:TorchStaticInt8",
    "torch_qat_int8": "sweeper.backends.torch_qat_int8:TorchQatInt8",
    "torchscript": "sweeper.backends.torchscript:TorchScriptFP32",
    "torch_compile": "sweeper.backends.torch_compile:TorchCompile",
    "torch_fp16": "sweeper.backends.torch_fp16:TorchFP16",
    "torch_autocast": "sweeper.backends.torch_autocast:TorchAutocast",
    "onnxruntime_fp16": "sweeper.backends.onnxruntime_fp16:OnnxRuntimeFP16",
    "tensorrt": "sweeper.backends.tensorrt:TensorRT",
}

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "BuildContext",
    "Candidate",
    "availability",
    "get_backend",
]


@cache
def get_backend(name: str) -> Backend:
    """Return the backend registered as ``name``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown backend '{name}'.{did_you_mean(name, BACKENDS)} Known backends: {', '.join(sorted(BACKENDS))}."
        )
    module_name, _, class_name = BACKENDS[name].partition(":")
    backend = getattr(importlib.import_module(module_name), class_name)()
    if backend.name != name:
        raise RuntimeError(f"backend registered as '{name}' calls itself '{backend.name}'")
    return backend


def availability() -> dict[str, str | None]:
    """Map every backend name to why it cannot run here, or ``None`` when it can."""
    result: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            result[name] = get_backend(name).unavailable_reason()
        except ImportError as exc:
            result[name] = f"cannot import its module: {exc}"
    return result
