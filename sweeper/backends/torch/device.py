"""Shared helpers for backends that run a PyTorch module in reduced precision, on CPU or CUDA.

Callers always pass float32 numpy batches and get float32 numpy outputs back: the candidate casts
floating-point inputs to the precision the module runs in and casts the output back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweeper.backends import BuildContext
from sweeper.backends.torch.eager import TorchCandidate, load_state_dict

if TYPE_CHECKING:
    import torch


def cuda_unavailable_reason() -> str | None:
    """Why nothing can run on a CUDA GPU here, or ``None`` when one is usable."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "the 'torch' package is not installed (pip install torch)"
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, {build})"
    return None


def cuda_device(ctx: BuildContext) -> str:
    """The CUDA device to build on: ``ctx.device`` when it names one, else the current device."""
    return ctx.device if ctx.device.startswith("cuda") else "cuda"


class DeviceTorchCandidate(TorchCandidate):
    """A PyTorch module run on a device, optionally in half precision or under autocast.

    Its artifact is the module's state dict (``state_dict.pt``); the backend that built it
    rebuilds the module around it (:func:`load_module_state`).

    Args:
        module: the module, already on ``device`` and in the dtype it runs in.
        input_names: the task's input names, in the module's argument order.
        num_threads: CPU threads (set for CPU devices).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        input_dtype: floating-point inputs are cast to this dtype (``None``: kept float32).
        autocast_dtype: run the forward pass under ``torch.autocast`` with this dtype.
        channels_last: pass 4-D inputs in channels-last memory format.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: tuple[str, ...],
        num_threads: int,
        *,
        device: str = "cpu",
        input_dtype: torch.dtype | None = None,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.module = module.eval()
        self.input_names = input_names
        self.num_threads = num_threads
        self.device = device
        self.input_dtype = input_dtype
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        if self.input_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.input_dtype)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _forward_context(self) -> contextlib.AbstractContextManager:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)


def load_module_state(module: torch.nn.Module, artifact: Path) -> torch.nn.Module:
    """Load the state dict saved at ``artifact`` into ``module`` (already on its device and dtype)."""
    state = load_state_dict(artifact)
    module.load_state_dict(state)
    return module
