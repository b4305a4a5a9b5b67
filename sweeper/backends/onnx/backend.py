"""The base of the ONNX Runtime backends."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from sweeper.backends._base import Backend, BuildContext
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import preflight_export
from sweeper.backends.onnx.runtime import (
    OnnxCandidate,
    load_onnx_candidate,
    onnx_unavailable_reason,
)

OnnxConfigT = TypeVar("OnnxConfigT", bound=OnnxExportConfig)


class OrtBackend(Backend[OnnxConfigT]):
    """What the ONNX Runtime backends share: they need torch, onnx and onnxruntime, export the
    model before any trial (preflight), and reload their ONNX artifact as a session."""

    def unavailable_reason(self) -> str | None:
        return onnx_unavailable_reason()

    def preflight(self, ctx: BuildContext, config: OnnxConfigT) -> None:
        preflight_export(self.name, ctx, config)

    def load(self, artifact: Path, ctx: BuildContext, config: OnnxConfigT) -> OnnxCandidate:
        return load_onnx_candidate(artifact, ctx.num_threads)
