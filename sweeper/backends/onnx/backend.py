"""The base of the ONNX Runtime backends."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

from sweeper.backends._base import Backend, BuildContext, LayerUnit
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import export_onnx, preflight_export
from sweeper.backends.onnx.layers import module_path
from sweeper.backends.onnx.runtime import (
    OnnxCandidate,
    load_onnx_candidate,
    onnx_layer_units,
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

    def exclusion_units(self, ctx: BuildContext, config: OnnxConfigT) -> tuple[list[LayerUnit], list[str]]:
        """The layers with weights, each with its activation and Q/DQ nodes, named by the weight
        node (:mod:`sweeper.backends.onnx.layers`); and every quantizable node."""
        nodes = self.quantizable_layers(ctx, config)
        units = onnx_layer_units(export_onnx(ctx, config), nodes)
        named = getattr(ctx.model, "named_modules", None)
        modules = {name for name, _ in named()} if callable(named) else None
        units = [dataclasses.replace(u, module=module_path(u.name, modules)) for u in units]
        return units, [name for name, _ in nodes]
