"""ONNX Runtime FP32: the exported, pre-processed model run as is on the CPU provider."""

from __future__ import annotations

from typing import ClassVar

from sweeper.backends import BuildContext
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import OrtBackend, export_onnx
from sweeper.backends.onnx.runtime import OnnxCandidate


class OnnxRuntimeFP32Config(OnnxExportConfig):
    """Only the export settings (``opset``, ``exporter``): FP32 changes nothing else."""


class OnnxRuntimeFP32(OrtBackend[OnnxRuntimeFP32Config]):
    """Export to ONNX and run with ONNX Runtime in FP32."""

    name: ClassVar[str] = "onnxruntime_fp32"
    Config: type[OnnxRuntimeFP32Config] = OnnxRuntimeFP32Config
    # Measured: 100% top-1 agreement on digits (360 samples); the same arithmetic as PyTorch up
    # to float rounding, so at most one near-tie may flip.
    min_agreement_pct: ClassVar[float] = 99.5


    def build(self, ctx: BuildContext, config: OnnxRuntimeFP32Config) -> OnnxCandidate:
        path = export_onnx(ctx, config)
        return OnnxCandidate(path, ctx.num_threads)

