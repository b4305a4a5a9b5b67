"""PyTorch mixed precision: the FP32 model run under ``torch.autocast`` on the CPU or a CUDA GPU.

Weights stay float32; inside autocast, ops that gain from lower precision (convolutions, matrix
products, linear layers) run in ``dtype`` and precision-sensitive ones (softmax, norms,
reductions) in float32. Outputs are cast back to float32.

What torch 2.14 does with each (device, dtype) pair:

- ``cpu`` + ``bfloat16``: supported; fast on CPUs with AVX512-BF16 or AMX (oneDNN), emulated
  (slower than FP32) elsewhere.
- ``cpu`` + ``float16``: supported by torch 2.14's CPU autocast (its lower-precision op list covers
  conv, linear and matmul in float16); fast only on CPUs with AVX512-FP16 or AMX-FP16. Older torch
  releases warned and silently ran float32 instead; the build therefore checks that a linear
  layer under autocast really yields ``dtype`` and refuses the pair otherwise.
- ``cuda`` + ``float16``: the classic mixed precision on tensor cores.
- ``cuda`` + ``bfloat16``: needs a GPU with bfloat16 support (Ampere or newer), checked at build.

The artifact is the (float32) state dict.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from sweeper.backends import Backend, BackendConfig, BuildContext, Hardware
from sweeper.backends.torch.device import (
    DeviceTorchCandidate,
    cuda_device,
    cuda_unavailable_reason,
    load_module_state,
)
from sweeper.backends.torch.eager import torch_unavailable_reason
from sweeper.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    import torch


class TorchAutocastConfig(BackendConfig):
    """Settings of PyTorch autocast.

    Attributes:
        device: where the model runs: ``"cpu"`` or ``"cuda"`` (needs a CUDA GPU).
        dtype: the lower-precision type autocast uses.
    """

    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["bfloat16", "float16"] = "bfloat16"


class TorchAutocast(Backend[TorchAutocastConfig]):
    """The FP32 model run under ``torch.autocast`` (bfloat16 or float16) on CPU or CUDA."""

    name: ClassVar[str] = "torch_autocast"
    Config: type[TorchAutocastConfig] = TorchAutocastConfig
    hardware: ClassVar[frozenset[Hardware]] = frozenset({"cpu", "gpu"})
    # Measured on the CPU (torch 2.14, digits, 360 samples): 100% top-1 agreement with bfloat16
    # (max |logit error| 0.057) and with float16 (0.008). The margin covers bfloat16's 8-bit
    # mantissa on larger models and GPUs.
    min_agreement_pct: ClassVar[float] = 98.0

    def unavailable_reason(self) -> str | None:
        return torch_unavailable_reason()

    def build(self, ctx: BuildContext, config: TorchAutocastConfig) -> DeviceTorchCandidate:
        device = _device(ctx, config)
        return _candidate(copy.deepcopy(ctx.model).eval().to(device), ctx, device, config)

    def load(self, artifact: Path, ctx: BuildContext, config: TorchAutocastConfig) -> DeviceTorchCandidate:
        device = _device(ctx, config)
        module = load_module_state(copy.deepcopy(ctx.model).eval().to(device), artifact)
        return _candidate(module, ctx, device, config)


def _device(ctx: BuildContext, config: TorchAutocastConfig) -> str:
    """Return the device to run on, after checking that autocast runs ``config.dtype`` there."""
    import torch

    device = "cpu"
    if config.device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"torch_autocast with device 'cuda' cannot run here: {reason}")
        device = cuda_device(ctx)
        if config.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"torch_autocast: GPU '{torch.cuda.get_device_name(device)}' does not support bfloat16; "
                f"use dtype 'float16' on it"
            )
    check_autocast(device, config.dtype)
    return device


def check_autocast(device: str, dtype_name: str) -> None:
    """Raise ``ConfigError`` unless a linear layer under ``torch.autocast`` on ``device`` yields ``dtype``.

    Some torch releases accept an unsupported autocast dtype with a warning and run float32.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    x = torch.ones(2, 2, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype):
            result = torch.nn.functional.linear(x, x).dtype
    if result != dtype:
        said = f" (torch said: {caught[0].message})" if caught else ""
        raise ConfigError(
            f"torch_autocast: torch {torch.__version__} does not run {dtype_name} autocast on "
            f"'{torch.device(device).type}': a linear layer yields {result}{said}; choose the other dtype"
        )


def _candidate(
    module: torch.nn.Module, ctx: BuildContext, device: str, config: TorchAutocastConfig
) -> DeviceTorchCandidate:
    import torch

    return DeviceTorchCandidate(
        module, ctx.task.input_names, ctx.num_threads, device=device, autocast_dtype=getattr(torch, config.dtype)
    )
