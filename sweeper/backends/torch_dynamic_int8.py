"""PyTorch dynamic int8: ``torch.ao.quantization.quantize_dynamic`` on Linear, LSTM and GRU layers.

Weights are quantized offline, activations at run time. Other layers (Conv) stay in FP32, so on
a CNN only the classifier head is quantized. ``torch.ao.quantization`` is deprecated in favour of
torchao but present in torch 2.14; its warnings are silenced locally.

The artifact is the quantized module's state dict: :meth:`TorchDynamicInt8.load` re-runs
``quantize_dynamic`` on the task's model with the same config and loads the saved weights into it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import field_validator

from sweeper.backends import Backend, BackendConfig, BuildContext
from sweeper.backends.torch.eager import (
    TorchCandidate,
    load_state_dict,
    quiet_torch_quantization,
    torch_unavailable_reason,
)
from sweeper.errors import ConfigError

if TYPE_CHECKING:
    import torch

Layer = Literal["linear", "lstm", "gru"]
LAYERS: tuple[Layer, ...] = ("linear", "lstm", "gru")


class TorchDynamicInt8Config(BackendConfig):
    """Settings of PyTorch dynamic quantization.

    Attributes:
        weight_dtype: the quantized weight type; ``qint8`` is the one integer type
            ``quantize_dynamic`` offers (its other option, float16, is not int8).
        layers: which layer types to quantize, a non-empty subset of ``linear``, ``lstm``,
            ``gru`` (kept in that order).
        engine: ``torch.backends.quantized.engine`` to quantize and run with; must be one of
            this machine's ``torch.backends.quantized.supported_engines`` (checked at build).
    """

    weight_dtype: Literal["qint8"] = "qint8"
    layers: tuple[Layer, ...] = LAYERS
    engine: Literal["x86", "fbgemm", "qnnpack", "onednn"] = "x86"

    @field_validator("layers")
    @classmethod
    def _canonical_layers(cls, layers: tuple[Layer, ...]) -> tuple[Layer, ...]:
        if not layers:
            raise ValueError(f"layers must name at least one of {', '.join(LAYERS)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer type, got {layers}")
        return tuple(layer for layer in LAYERS if layer in layers)


class TorchDynamicInt8(Backend[TorchDynamicInt8Config]):
    """PyTorch eager-mode dynamic int8 quantization."""

    name: ClassVar[str] = "torch_dynamic_int8"
    Config: type[TorchDynamicInt8Config] = TorchDynamicInt8Config
    # Measured: 100% top-1 agreement on digits (360 samples) with every engine.
    # The margin allows for CPUs without VNNI, where uint8 x int8 products can saturate.
    min_agreement_pct: ClassVar[float] = 97.0

    def unavailable_reason(self) -> str | None:
        return torch_unavailable_reason()

    def build(self, ctx: BuildContext, config: TorchDynamicInt8Config) -> TorchCandidate:
        return TorchCandidate(_quantize(ctx.model, config), ctx.task.input_names, ctx.num_threads)

    def load(self, artifact: Path, ctx: BuildContext, config: TorchDynamicInt8Config) -> TorchCandidate:
        module = _quantize(ctx.model, config)
        state = load_state_dict(artifact, allow_script_objects=True)
        module.load_state_dict(state)
        return TorchCandidate(module, ctx.task.input_names, ctx.num_threads)


def _quantize(model: torch.nn.Module, config: TorchDynamicInt8Config) -> torch.nn.Module:
    import torch
    from torch import nn

    supported = torch.backends.quantized.supported_engines
    if config.engine not in supported:
        raise ConfigError(
            f"torch_dynamic_int8: quantized engine '{config.engine}' is not supported by this "
            f"PyTorch build; supported here: {', '.join(e for e in supported if e != 'none')}"
        )
    # The engine is process-wide state; packed weights are made for the engine set at quantization.
    torch.backends.quantized.engine = config.engine
    layer_types = {"linear": nn.Linear, "lstm": nn.LSTM, "gru": nn.GRU}
    with quiet_torch_quantization():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(
            copy.deepcopy(model).eval(),
            {layer_types[layer] for layer in config.layers},
            dtype=getattr(torch, config.weight_dtype),
        )
