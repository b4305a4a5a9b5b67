"""Shared helpers for backends whose candidate is a PyTorch module run eagerly on the CPU."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.backends import Candidate
from sweeper.task import Batch

if TYPE_CHECKING:
    import torch

STATE_DICT_FILE = "state_dict.pt"


def torch_unavailable_reason() -> str | None:
    """Why the PyTorch backends cannot run here (torch is missing), or ``None``."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "the 'torch' package is not installed (pip install torch)"
    return None


@contextlib.contextmanager
def quiet_torch_quantization() -> Iterator[None]:
    """Silence the deprecation and storage warnings of ``torch.ao.quantization`` and ``torch.save``.

    ``torch.ao.quantization`` is deprecated in favour of torchao but still present in torch 2.14;
    its warnings would repeat on every trial.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        yield


class TorchCandidate(Candidate):
    """A PyTorch module run under ``torch.inference_mode`` with a fixed number of CPU threads.

    Its artifact is the module's state dict (``state_dict.pt``); the backend that built it knows
    how to rebuild the module around it.
    """

    def __init__(
        self, module: torch.nn.Module, input_names: tuple[str, ...], num_threads: int, device: str = "cpu"
    ) -> None:
        self.module = module.eval()
        self.input_names = input_names
        self.num_threads = num_threads
        self.device = device

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """One input as the tensor the module takes, on the module's device (subclasses cast it)."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if self.device == "cpu" else tensor.to(self.device)

    def _forward_context(self) -> contextlib.AbstractContextManager:
        """What the forward pass runs under besides inference mode (subclasses add autocast)."""
        return contextlib.nullcontext()

    def predict(self, batch: Batch) -> np.ndarray:
        import torch

        if self.device == "cpu" and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        inputs = [self._tensor(batch[name]) for name in self.input_names]
        with torch.inference_mode(), self._forward_context():
            output = self.module(*inputs)
        if isinstance(output, tuple | list):
            output = output[0]
        # .cpu() waits for the device, so a timed predict() includes a GPU's work.
        return output.detach().float().cpu().numpy()

    def _write(self, directory: Path) -> Path:
        import torch

        target = directory / STATE_DICT_FILE
        with quiet_torch_quantization():
            torch.save(self.module.state_dict(), target)
        return target


def load_state_dict(path: Path, *, allow_script_objects: bool = False) -> dict[str, object]:
    """Load a state dict saved by :meth:`TorchCandidate.save` with ``weights_only=True``.

    Args:
        path: the ``state_dict.pt`` file.
        allow_script_objects: also accept ``torch.ScriptObject`` values, which dynamically
            quantized recurrent layers (LSTM, GRU) use for their packed weights. Only TorchScript
            classes registered by torch itself can be rebuilt from them.
    """
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"no state dict artifact at '{path}'")
    allowed: list[Any] = [torch.ScriptObject] if allow_script_objects else []
    with quiet_torch_quantization(), torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)
