"""Backends, registered by name. Importing this package imports no backend module.

``BACKENDS`` maps each name to ``module:Class``; :func:`get_backend` imports the module on first
use, so a machine without an optional dependency never imports it.

The backend contract: a validated config, a build step, and the Candidate it produces.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from sweeper.errors import ConfigError, did_you_mean
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import torch

Hardware = Literal["cpu", "gpu"]


class BackendConfig(BaseModel):
    """Base of every backend's config: frozen, no unknown fields, validated on construction.

    Each field is a parameter the search space may fix or search. Fields use ``Literal`` types
    for choices and ``Field(ge=..., le=...)`` for ranges, so a validation error can say what is
    allowed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


ConfigT = TypeVar("ConfigT", bound=BackendConfig)


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    """Everything a backend needs to build one candidate, prepared by the trial runner.

    Attributes:
        model: the task's FP32 model in eval mode. Shared across trials: never modify it in
            place (``copy.deepcopy`` first).
        task: the task, for example inputs, calibration and training data.
        workdir: an empty folder private to this trial, for intermediate files.
        cache_dir: a folder shared by the trials on this machine, for results that depend only
            on the model and a few settings (an exported FP32 ONNX file, calibration ranges).
        num_threads: the CPU threads this trial may use (the cores its Ray task reserved).
        device: ``"cpu"`` or ``"cuda"``.
    """

    model: torch.nn.Module
    task: Task
    workdir: Path
    cache_dir: Path
    num_threads: int
    device: str = "cpu"


@dataclass(frozen=True)
class LayerUnit:
    """One unit of layer exclusion: a layer and the nodes or modules left in float with it.

    Attributes:
        name: what the backend's exclusion field holds (for the ONNX backends, the weight node).
        op_type: the layer's op type (or module type).
        members: every name left in float when the unit is, ``name`` first.
        module: the PyTorch module the layer comes from, where known.
    """

    name: str
    op_type: str
    members: tuple[str, ...] = ()
    module: str | None = None


class Candidate(ABC):
    """One built candidate: it predicts, saves its artifact, and reports the artifact's size."""

    _artifact: Path | None = None
    # Where predict() runs ("cpu", "cuda", "cuda:1"); recorded in the trial's row.
    device: str = "cpu"

    @abstractmethod
    def predict(self, batch: Batch) -> np.ndarray:
        """Return the model's output for ``batch`` as a float32 numpy array."""

    @abstractmethod
    def _write(self, directory: Path) -> Path:
        """Write the deployable artifact into ``directory``; return its path (file or folder)."""

    def save(self, directory: Path) -> Path:
        """Save the deployable artifact into ``directory`` and return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        self._artifact = self._write(directory)
        return self._artifact

    def size_bytes(self) -> int:
        """Bytes of the saved artifact on disk (a folder counts all its files)."""
        if self._artifact is None:
            raise RuntimeError("save() the candidate before asking for its size")
        path = self._artifact
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size


class Backend(ABC, Generic[ConfigT]):
    """A way to turn the FP32 model into a deployable candidate, configured by a ``ConfigT``.

    Subclasses set ``name``, ``Config``, ``hardware`` and ``min_agreement_pct`` (the top-1
    agreement with FP32 that the contract test demands on the digits task), and implement
    :meth:`build` and :meth:`load`. Modules import torch, onnxruntime and other heavy or optional
    libraries inside methods, so that reading a backend's config never needs them.
    """

    name: ClassVar[str]
    Config: type[ConfigT]
    hardware: ClassVar[frozenset[Hardware]] = frozenset({"cpu"})
    min_agreement_pct: ClassVar[float] = 95.0

    # The config field listing layers to leave in float, for backends that can (None otherwise).
    exclusion_field: ClassVar[str | None] = None
    # Whether its candidates take inputs of any size along the task's dynamic axes (an ONNX export
    # declares them), so that a padded task can be scored on batches cut to their longest sample.
    any_length: ClassVar[bool] = False

    def config(self, params: dict[str, Any]) -> ConfigT:
        """Build this backend's validated config from ``params`` (suggested, or read from a row).

        Raises:
            ConfigError: when the combination is rejected by the config's own checks.
        """
        try:
            # JSON mode: list values (as read back from a row's params_json) validate as tuples too
            return self.Config.model_validate_json(json.dumps(params))
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"backend '{self.name}' rejects {params}: {detail}") from None

    def quantizable_layers(self, ctx: BuildContext, config: ConfigT) -> list[tuple[str, str]]:
        """The layers ``config`` would quantize, as (name, op type), in model order.

        Names are what :attr:`exclusion_field` takes. Only backends with an exclusion field
        implement this.
        """
        raise NotImplementedError(f"backend '{self.name}' cannot leave layers in float")

    def exclusion_units(self, ctx: BuildContext, config: ConfigT) -> tuple[list[LayerUnit], list[str]]:
        """The layers a person would leave in float, and every name :attr:`exclusion_field` takes.

        Excluding all the names of the second list leaves the whole model in float; excluding all
        of them but a unit's members quantizes that unit alone (how sensitivity scores it). By
        default each of :meth:`quantizable_layers` is a unit of its own.
        """
        layers = self.quantizable_layers(ctx, config)
        return [LayerUnit(name=name, op_type=op, members=(name,)) for name, op in layers], [n for n, _ in layers]

    def unavailable_reason(self) -> str | None:
        """Return why this backend cannot run on this machine, or ``None`` if it can."""
        return None

    def preflight(self, ctx: BuildContext, config: ConfigT) -> None:
        """Check, once before any trial, that this backend can start from the task's model.

        Raises a :class:`~sweeper.errors.SweeperInputError` for a problem no trial could get
        past (a model that does not export, say); the sweep then stops before it starts. The
        default checks nothing.
        """

    @abstractmethod
    def build(self, ctx: BuildContext, config: ConfigT) -> Candidate:
        """Build a candidate from ``ctx.model`` with ``config``."""

    @abstractmethod
    def load(self, artifact: Path, ctx: BuildContext, config: ConfigT) -> Candidate:
        """Load a candidate from an artifact written by :meth:`Candidate.save`."""


def is_keras_model(model: object) -> bool:
    """Whether ``model`` is a Keras model, decided without importing TensorFlow or Keras."""
    return any(cls.__module__.split(".")[0] in ("keras", "tf_keras", "tensorflow") for cls in type(model).__mro__)

def keras_fingerprint(model: Any) -> str:
    """Return a hash of a Keras model's architecture (its JSON config) and weights."""
    digest = hashlib.sha256(f"{type(model).__qualname__}\n".encode())
    digest.update(model.to_json().encode())
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]

def model_fingerprint(model: torch.nn.Module) -> str:
    """Return a hash of ``model``'s architecture (its repr) and every tensor of its state dict.

    A Keras model (a task exported with tf2onnx) is hashed by its config and weights instead.
    """
    if is_keras_model(model):
        return keras_fingerprint(model)
    import torch

    # The class by its qualified name only: a task file loaded from another folder (each node of a
    # cluster has its own copy) gives its module another name, not its model other weights.
    digest = hashlib.sha256(f"{type(model).__qualname__}\n{model!r}".encode())
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]



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

