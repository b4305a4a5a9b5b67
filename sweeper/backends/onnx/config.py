"""The export settings every ONNX-based backend shares, and the errors an export raises."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from sweeper.backends import BackendConfig
from sweeper.errors import SweeperInputError
from sweeper.task import Task

Exporter = Literal["torchscript", "dynamo", "tf2onnx"]
Simplifier = Literal["none", "onnxslim", "onnxsim"]

# torch 2.14's TorchScript exporter implements opsets up to 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
# Its dynamo exporter implements 18 and above; a lower opset goes through a best-effort version
# converter that silently keeps opset 18 when it fails (it does for some models at 13 and 14).
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18
# Static QDQ per-channel quantization needs opset 13; 21 is the newest opset this project tests.
MIN_OPSET = 13
MAX_OPSET = 21
# tf2onnx 1.17 implements opsets up to 18 (tf2onnx.constants.OPSET_TO_IR_VERSION).
TF2ONNX_MAX_OPSET = 18
# Simplifier -> (module to import, what to pip install). onnxslim is a core dependency; onnxsim
# ships a compiled extension with wheels for fewer platforms, so it is the ``[onnxsim]`` extra.
SIMPLIFIERS: dict[str, tuple[str, str]] = {
    "onnxslim": ("onnxslim", "pip install onnxslim"),
    "onnxsim": ("onnxsim", "pip install 'sweeper[onnxsim]'"),
}


class OnnxExportError(SweeperInputError):
    """The task's model cannot be exported to ONNX with the chosen exporter and opset."""


class OnnxValidationError(OnnxExportError):
    """The exported model's outputs differ from the original model's beyond ``validate_atol``."""


class OnnxExportConfig(BackendConfig):
    """Fields shared by every backend that starts from the exported ONNX model.

    Attributes:
        opset: the ONNX opset to export with. The TorchScript exporter supports 13..20, the
            dynamo exporter 18..21, tf2onnx 13..18.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``), ``"dynamo"``
            (``torch.export``-based), or ``"tf2onnx"`` for a task whose model is a Keras model
            (the ``[tensorflow]`` extra).
        simplify: simplify the exported graph with ``onnxslim`` or ``onnxsim`` (the ``[onnxsim]``
            extra) before ONNX Runtime's pre-processing, or not (``"none"``).
        validate_atol: the largest absolute difference allowed between the export's outputs and
            the original model's on the task's example inputs, per unit of output scale: the
            tolerance is ``validate_atol * max(1, max |output|)``.
    """

    opset: int = Field(default=17, ge=MIN_OPSET, le=MAX_OPSET)
    exporter: Exporter = "torchscript"
    simplify: Simplifier = "none"
    validate_atol: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)

    def export_settings(self) -> OnnxExportConfig:
        """Return only the export fields of this config (what the exported file depends on)."""
        return OnnxExportConfig(**{name: getattr(self, name) for name in OnnxExportConfig.model_fields})

    @model_validator(mode="after")
    def _check_opset_for_exporter(self) -> Self:
        if self.exporter == "tf2onnx" and self.opset > TF2ONNX_MAX_OPSET:
            raise ValueError(
                f"exporter 'tf2onnx' supports opset {MIN_OPSET}..{TF2ONNX_MAX_OPSET}, got opset {self.opset}"
            )
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise ValueError(
                f"exporter 'torchscript' supports opset {MIN_OPSET}..{TORCHSCRIPT_MAX_OPSET}, got opset "
                f"{self.opset}; use exporter 'dynamo' for opset {TORCHSCRIPT_MAX_OPSET + 1}..{MAX_OPSET}"
            )
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise ValueError(
                f"exporter 'dynamo' supports opset {DYNAMO_MIN_OPSET}..{MAX_OPSET}, got opset "
                f"{self.opset}; use exporter 'torchscript' for opset {MIN_OPSET}..{DYNAMO_MIN_OPSET - 1}"
            )
        return self


def describe_export(task: Task, settings: OnnxExportConfig) -> str:
    """Name an export in messages: task, exporter, opset and simplifier."""
    what = f"task '{task.name}' with exporter '{settings.exporter}' at opset {settings.opset}"
    return what if settings.simplify == "none" else f"{what}, simplified with {settings.simplify}"
