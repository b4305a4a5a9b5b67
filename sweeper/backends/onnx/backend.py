"""The base of the ONNX Runtime backends."""

from __future__ import annotations

from pathlib import Path

from sweeper.backends._base import Backend, BackendConfig, BuildContext
from sweeper.backends.onnx.export import preflight_export
from sweeper.backends.onnx.runtime import (
    OnnxCandidate,
    load_onnx_candidate,
    onnx_unavailable_reason,
)


class OrtBackend(Backend):
    """What the ONNX Runtime backends share: they need torch, onnx and onnxruntime, export the
    model before any trial (preflight), and reload their ONNX artifact as a session."""

    def unavailable_reason(self) -> str | None:
        return onnx_unavailable_reason()

    def preflight(self, ctx: BuildContext, config: BackendConfig) -> None:
        preflight_export(self.name, ctx, config)  # type: ignore[arg-type]

    def load(self, artifact: Path, ctx: BuildContext, config: BackendConfig) -> OnnxCandidate:
        return load_onnx_candidate(artifact, ctx.num_threads)
