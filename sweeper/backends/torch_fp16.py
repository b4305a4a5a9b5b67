"""PyTorch FP16: the whole model in half precision (``model.half()``) on a CUDA GPU.

Weights and activations are float16; float32 inputs are cast on the way in and outputs cast back
to float32. cuDNN and cuBLAS accumulate float16 convolutions and matrix products in float32 on
tensor cores, so the result differs from FP32 mostly by the rounding of weights and activations.
Half precision on the CPU is not offered here: for CPUs use ``torch_autocast``.

The artifact is the float16 state dict (half the FP32 size).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sweeper.backends import Backend, BackendConfig, BuildContext, Hardware
from sweeper.backends.torch.device import (
    DeviceTorchCandidate,
    cuda_device,
    cuda_unavailable_reason,
    load_module_state,
)
from sweeper.errors import BackendUnavailableError

if TYPE_CHECKING:
    import torch


class TorchFP16Config(BackendConfig):
    """Settings of PyTorch FP16.

    Attributes:
        channels_last: run 4-D activations in channels-last memory format, which cuDNN's
            tensor-core convolution kernels prefer (no effect on models without convolutions).
    """

    channels_last: bool = False


class TorchFP16(Backend[TorchFP16Config]):
    """The FP32 model converted with ``.half()`` and run on a CUDA GPU."""

    name: ClassVar[str] = "torch_fp16"
    Config: type[TorchFP16Config] = TorchFP16Config
    hardware: ClassVar[frozenset[Hardware]] = frozenset({"gpu"})
    # Not measured on a GPU yet (none was available). Emulated on the CPU (model.half() with
    # float16 inputs, torch 2.14): 100% top-1 agreement on digits (360 samples), max |logit error|
    # 0.014. The margin allows for kernel differences between CPU emulation and cuDNN.
    min_agreement_pct: ClassVar[float] = 99.0

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()

    def build(self, ctx: BuildContext, config: TorchFP16Config) -> DeviceTorchCandidate:
        device = _require_cuda(ctx)
        return _candidate(_half_module(ctx.model, device, config), ctx, device, config)

    def load(self, artifact: Path, ctx: BuildContext, config: TorchFP16Config) -> DeviceTorchCandidate:
        device = _require_cuda(ctx)
        module = load_module_state(_half_module(ctx.model, device, config), artifact)
        return _candidate(module, ctx, device, config)


def _require_cuda(ctx: BuildContext) -> str:
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"torch_fp16 needs a CUDA GPU: {reason}")
    return cuda_device(ctx)


def _half_module(model: torch.nn.Module, device: str, config: TorchFP16Config) -> torch.nn.Module:
    import torch

    module = copy.deepcopy(model).eval().to(device).half()
    if config.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _candidate(
    module: torch.nn.Module, ctx: BuildContext, device: str, config: TorchFP16Config
) -> DeviceTorchCandidate:
    import torch

    return DeviceTorchCandidate(
        module,
        ctx.task.input_names,
        ctx.num_threads,
        device=device,
        input_dtype=torch.float16,
        channels_last=config.channels_last,
    )
