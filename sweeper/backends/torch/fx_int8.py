"""Shared helpers of the PyTorch int8 backends that quantize weights and activations (static, QAT).

Flow: FX graph mode quantization (``torch.ao.quantization.quantize_fx``), chosen because it is
what the installed torch (2.14) offers that works on any FX-traceable model without editing it:

- ``prepare_fx`` / ``prepare_qat_fx`` fuse Conv+BN(+ReLU) and Linear+ReLU by themselves, where
  eager mode needs ``QuantStub``/``DeQuantStub`` added to the model and every fusion listed;
- a layer is excluded by its module name (``QConfigMapping.set_module_name(name, None)``);
- the converted model runs real int8 kernels (fbgemm, oneDNN, QNNPACK) and traces to TorchScript,
  a file that reloads without the model's code.

The PT2E flow, torch's successor to it, now lives in the separate ``torchao`` package (not a
dependency here) and reaches int8 kernels on CPU only through ``torch.compile``. FX mode is
deprecated with the rest of ``torch.ao.quantization`` but present in torch 2.14; its warnings are
silenced locally.

Layer names are module names of the FP32 model: the Conv and Linear modules the model calls
(``features.0``, ``classifier.3``). A BatchNorm or ReLU fused into one of them goes with it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

from pydantic import field_validator

from sweeper.backends import Backend, BackendConfig, BuildContext
from sweeper.backends.torch.eager import torch_unavailable_reason
from sweeper.backends.torch.jit import TorchScriptCandidate, load_torchscript
from sweeper.errors import ConfigError, SweeperInputError, did_you_mean
from sweeper.task import Task

if TYPE_CHECKING:
    import torch
    from torch.ao.quantization import QConfig, QConfigMapping

Engine = Literal["x86", "fbgemm", "qnnpack", "onednn"]
# Layer types FX static quantization turns into int8 modules with every engine here.
QUANTIZABLE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


class QuantizationError(SweeperInputError):
    """The task's model cannot be quantized this way (not FX-traceable, nothing to quantize)."""


class Int8Config(BackendConfig):
    """Fields shared by the static and quantization-aware int8 backends.

    Attributes:
        engine: ``torch.backends.quantized.engine`` to quantize and run with; must be one of this
            machine's ``torch.backends.quantized.supported_engines`` (checked at build). Activations
            use 7 bits with ``x86`` and ``fbgemm`` (``reduce_range``, torch's default for them,
            which avoids overflow on CPUs without VNNI) and 8 bits with ``qnnpack`` and ``onednn``.
        per_channel: one weight scale per output channel instead of one per tensor.
        excluded_layers: module names of layers to keep in float (see
            :func:`quantizable_layers`), kept sorted.
    """

    engine: Engine = "x86"
    per_channel: bool = True
    excluded_layers: tuple[str, ...] = ()

    @field_validator("excluded_layers")
    @classmethod
    def _canonical_layers(cls, layers: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"excluded_layers must not repeat a layer, got {layers}")
        return tuple(sorted(layers))


def quantizable_layers(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Return ``(module name, type name)`` of the layers of ``model`` that int8 quantization converts.

    These are the Conv and Linear modules the model's forward calls, in call order: the names
    ``excluded_layers`` accepts.

    Raises:
        QuantizationError: if the model cannot be traced by ``torch.fx``.
    """
    return _quantizable(model, "the model")


def _quantizable(model: torch.nn.Module, what: str) -> list[tuple[str, str]]:
    # The layers of the model as the backends quantize it: with plain convolutions for "same" ones.
    plain = unpad_same_convs(copy.deepcopy(model)) if _same_padded_convs(model) else model
    modules = dict(plain.named_modules())
    layers: list[tuple[str, str]] = []
    for node in _fx_graph(plain, what).nodes:
        if node.op == "call_module" and type(modules[node.target]).__name__ in QUANTIZABLE_TYPES:
            name = str(node.target)
            parent = name.rpartition(".")[0]
            if getattr(modules.get(parent), "same_padded", False):
                name = parent  # the pad-and-convolve Sequential standing for the original layer
            entry = (name, type(modules[node.target]).__name__)
            if entry not in layers:
                layers.append(entry)
    return layers


def _fx_graph(model: torch.nn.Module, what: str) -> torch.fx.Graph:
    import torch

    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise QuantizationError(
            f"{what} cannot be traced by torch.fx, which FX graph mode quantization needs: "
            f"{type(exc).__name__}: {' '.join(lines[:3])}{_transformers_hint(model)}"
        ) from exc


def _transformers_hint(model: torch.nn.Module) -> str:
    """Why a model built by ``transformers`` does not trace, and what quantizes it instead."""
    if not any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        return ""
    # transformers 5 removed its own FX tracer (transformers.utils.fx); plain symbolic tracing
    # stops where the model slices or branches on input shapes (position ids, attention masks).
    return (
        ". The model contains transformers modules, which torch.fx cannot trace symbolically (they slice "
        "and branch on input shapes; transformers 5 no longer ships an FX tracer). Its INT8 paths are "
        "torch_dynamic_int8 and the ONNX Runtime backends (onnxruntime_dynamic_int8, onnxruntime_static_int8)"
    )


def model_layers(model: torch.nn.Module, task: Task, backend: str) -> list[tuple[str, str]]:
    """:func:`quantizable_layers` of the task's model, raising if there is none.

    Raises:
        QuantizationError: naming the task and the backend, if the model is not FX-traceable or
            has no quantizable layer.
    """
    layers = _quantizable(model, f"{backend}: the model of task '{task.name}'")
    if not layers:
        raise QuantizationError(
            f"{backend}: the model of task '{task.name}' has no layer int8 quantization converts "
            f"(types {', '.join(QUANTIZABLE_TYPES)})"
        )
    return layers


def check_layers(model: torch.nn.Module, config: Int8Config, task: Task, backend: str) -> list[str]:
    """Check ``config.excluded_layers`` against the model; return the layers to quantize.

    Raises:
        QuantizationError: if the model is not FX-traceable or has no quantizable layer.
        ConfigError: naming excluded layers that are not quantizable layers of the model.
    """
    layers = model_layers(model, task, backend)
    names = [name for name, _ in layers]
    unknown = [name for name in config.excluded_layers if name not in names]
    if unknown:
        shown = ", ".join(f"'{name}' ({kind})" for name, kind in layers[:16])
        more = f" and {len(layers) - 16} more" if len(layers) > 16 else ""
        modules = dict(model.named_modules())
        named = ", ".join(f"'{n}'" + (f" ({type(modules[n]).__name__})" if n in modules else "") for n in unknown)
        raise ConfigError(
            f"{backend}: excluded_layers names {named}, not quantizable layers of task "
            f"'{task.name}'.{did_you_mean(unknown[0], names)} Quantizable layers: {shown}{more} "
            f"(a BatchNorm or ReLU fused into a Conv or Linear is excluded with it)."
        )
    remaining = [name for name in names if name not in config.excluded_layers]
    if not remaining:
        raise ConfigError(
            f"{backend}: excluded_layers excludes every quantizable layer of task '{task.name}' "
            f"({', '.join(names)}); nothing would be quantized"
        )
    return remaining


def set_engine(engine: str, backend: str) -> None:
    """Make ``engine`` the process's quantized engine, or raise ``ConfigError`` if unsupported here.

    The engine is process-wide state: packed int8 weights are made for the engine set when they
    are packed (at convert, and again when a TorchScript file is loaded).
    """
    import torch

    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ConfigError(
            f"{backend}: quantized engine '{engine}' is not supported by this PyTorch build; "
            f"supported here: {', '.join(e for e in supported if e != 'none')}"
        )
    torch.backends.quantized.engine = engine


def activation_range(engine: str) -> dict[str, int]:
    """``quant_min``/``quant_max`` of uint8 activations with ``engine``: 7 bits with x86 and fbgemm.

    These are torch's defaults for each engine (its ``reduce_range``), spelled as a range because
    observers deprecate ``reduce_range``.
    """
    return {"quant_min": 0, "quant_max": 127 if engine in ("x86", "fbgemm") else 255}


def weight_observer(per_channel: bool, *, fake_quant: bool = False) -> object:
    """Observer (or fake-quantize) constructor for int8 symmetric weights."""
    import torch
    from torch.ao.quantization import fake_quantize, observer

    if fake_quant:
        return (
            fake_quantize.default_fused_per_channel_wt_fake_quant
            if per_channel
            else fake_quantize.default_fused_wt_fake_quant
        )
    if per_channel:
        return observer.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return observer.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def qconfig_mapping(qconfig: QConfig, excluded_layers: tuple[str, ...]) -> QConfigMapping:
    """A ``QConfigMapping``: ``qconfig`` everywhere but the excluded layers, which get ``None``."""
    from torch.ao.quantization import QConfigMapping

    mapping = QConfigMapping().set_global(qconfig)
    for name in excluded_layers:
        mapping.set_module_name(name, None)
    return mapping


def check_converted(converted: torch.nn.Module, expected: list[str], backend: str, task: Task) -> None:
    """Raise if a layer that should be int8 was left in float by ``convert_fx``.

    FX silently skips a layer whose qconfig the engine's backend config does not support; a
    candidate that claims int8 must not be float underneath.
    """
    modules = dict(converted.named_modules())
    # a "same" convolution made plain behind a pad (unpad_same_convs) is its Sequential's second
    missing = [
        name for name in expected if not (_is_quantized(modules.get(name)) or _is_quantized(modules.get(f"{name}.1")))
    ]
    if missing:
        raise RuntimeError(f"{backend}: FX quantization left layers {missing} of task '{task.name}' in float")


def _is_quantized(module: object) -> bool:
    kind = type(module).__module__
    return kind.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def _same_padded_convs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Conv2d]]:
    """``(parent, name, conv)`` of every "same" convolution :func:`unpad_same_convs` replaces."""
    from torch import nn

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d or not isinstance(child, nn.Conv2d) or child.padding != (0, 0):
                continue
            pad = getattr(child, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) or type(pad).__name__ == "Identity":
                found.append((parent, name, child))
    return found


def fp32_copy(model: torch.nn.Module, *, train: bool) -> torch.nn.Module:
    """A deep copy of the task's model (never modified in place), in train or eval mode, with its
    "same"-padded convolutions made plain (:func:`unpad_same_convs`)."""
    return unpad_same_convs(copy.deepcopy(model)).train(train)


def unpad_same_convs(model: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place, the TensorFlow-style "same" convolutions FX cannot fuse with plain ones.

    ``efficientnet_pytorch``'s and ``efficientnet_lite_pytorch``'s ``Conv2dStaticSamePadding`` is a
    subclass of ``nn.Conv2d`` that pads with its ``static_padding`` child (a ``ZeroPad2d``) and
    convolves with ``padding=0``. FX's fusion patterns match ``nn.Conv2d`` itself, so none of its
    Conv+BatchNorm pairs fused: every BatchNorm ran as its own quantized op, and every pad
    dequantized and requantized. Each such layer becomes an ``nn.Conv2d`` with the same weights and
    the symmetric part of the pad as its padding, behind a ``ZeroPad2d`` of the rest where there is
    one (a stride-2 layer pads one more pixel at the bottom and right); outputs stay the same. The
    module keeps its name, so ``excluded_layers`` still names it (a ``Sequential`` in its place
    passes its qconfig to the convolution inside).

    Measured on EfficientNet-Lite0 with engine x86, one thread: 333 ms per call before, 44-47 ms
    after; with engine onednn, 10 ms at FP32's accuracy (:mod:`sweeper.backends.torch_static_int8`).
    """
    from torch import nn

    for parent, name, child in _same_padded_convs(model):
        pad = getattr(child, "static_padding")  # noqa: B009 (not an attribute of nn.Conv2d)
        left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        width, height = min(left, right), min(top, bottom)
        conv = nn.Conv2d(
            child.in_channels, child.out_channels, child.kernel_size, child.stride, (height, width),  # type: ignore[arg-type]
            child.dilation, child.groups, child.bias is not None,  # type: ignore[arg-type]
        )  # fmt: skip
        conv.weight, conv.bias = child.weight, child.bias
        rest = (left - width, right - width, top - height, bottom - height)
        if any(rest):
            padded = nn.Sequential(nn.ZeroPad2d(rest), conv)
            padded.same_padded = True  # type: ignore[assignment]  # its layer is reported under its name
            setattr(parent, name, padded)
        else:
            setattr(parent, name, conv)
    return model


Int8ConfigT = TypeVar("Int8ConfigT", bound=Int8Config)


class FxInt8Backend(Backend[Int8ConfigT]):
    """What the FX int8 backends (static, QAT) share: availability, layer exclusion, preflight,
    and loading the traced TorchScript artifact."""

    exclusion_field: ClassVar[str] = "excluded_layers"

    def unavailable_reason(self) -> str | None:
        return torch_unavailable_reason()

    def quantizable_layers(self, ctx: BuildContext, config: Int8ConfigT) -> list[tuple[str, str]]:
        """Return ``(module name, type name)`` of the layers ``excluded_layers`` may name."""
        return quantizable_layers(ctx.model)

    def preflight(self, ctx: BuildContext, config: Int8ConfigT) -> None:
        """Check that the task's model is FX-traceable and has a layer to quantize."""
        model_layers(ctx.model, ctx.task, self.name)

    def load(self, artifact: Path, ctx: BuildContext, config: Int8ConfigT) -> TorchScriptCandidate:
        set_engine(config.engine, self.name)  # packed weights are re-packed for it on load
        return load_torchscript(artifact, ctx.task, ctx.num_threads)
