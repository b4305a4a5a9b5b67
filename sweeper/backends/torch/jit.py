"""Shared TorchScript helpers: trace or script a module, save it, load it back.

``torch.jit`` is deprecated in favour of ``torch.export`` but present in torch 2.14; it is still
the one format a quantized eager-mode model and a frozen module can be saved in and reloaded
without the model's Python code. Its deprecation and tracer warnings are silenced locally.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweeper.backends.torch.eager import TorchCandidate, quiet_torch_quantization
from sweeper.errors import SweeperInputError
from sweeper.task import Task

if TYPE_CHECKING:
    import torch

TORCHSCRIPT_FILE = "model.pt"


class TorchScriptError(SweeperInputError):
    """The task's model cannot be traced or scripted."""


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence ``torch.jit``'s deprecation warnings and the tracer's warnings."""
    import torch

    with quiet_torch_quantization(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")
        yield


def example_args(task: Task, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The task's example inputs of ``batch_size`` samples as positional tensors."""
    import torch

    batch = task.example_inputs(batch_size)
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[name])) for name in task.input_names)


def trace(module: torch.nn.Module, task: Task) -> torch.jit.ScriptModule:
    """Trace ``module`` on two samples, checked against one and three samples.

    Two samples, not one, so that nothing is specialised to a batch of one; the check re-traces
    with other batch sizes and raises if the graph or the outputs differ (shape-dependent Python
    control flow, which tracing cannot record).

    Raises:
        TorchScriptError: naming the task, with the tracer's reason.
    """
    import torch

    checks = [example_args(task, 1), example_args(task, 3)]
    try:
        with quiet_jit(), torch.no_grad():
            return torch.jit.trace(module, example_args(task, 2), check_inputs=checks)
    except Exception as exc:
        raise TorchScriptError(
            f"cannot trace the model of task '{task.name}': {type(exc).__name__}: {_first_lines(exc)}"
        ) from exc


def _first_lines(exc: BaseException, n: int = 4) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[:n]) + (" ..." if len(lines) > n else "")


class TorchScriptCandidate(TorchCandidate):
    """A TorchScript module; its artifact is the ``torch.jit.save`` file ``model.pt``.

    ``saved`` is what goes to disk; ``module`` is what predicts. They differ only when a pass that
    cannot be serialised runs after loading (``torch.jit.optimize_for_inference``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: tuple[str, ...],
        num_threads: int,
        saved: torch.jit.ScriptModule | None = None,
    ) -> None:
        super().__init__(module, input_names, num_threads)
        self.saved = saved if saved is not None else module

    def _write(self, directory: Path) -> Path:
        import torch

        target = directory / TORCHSCRIPT_FILE
        with quiet_jit():
            torch.jit.save(self.saved, str(target))
        return target


def load_torchscript(
    artifact: Path,
    task: Task,
    num_threads: int,
    after_load: Callable[[torch.jit.ScriptModule], torch.nn.Module] | None = None,
) -> TorchScriptCandidate:
    """Load a file written by :meth:`TorchScriptCandidate.save`; ``after_load`` re-applies passes."""
    import torch

    if not artifact.is_file():
        raise FileNotFoundError(f"no TorchScript artifact at '{artifact}'")
    with quiet_jit():
        saved = torch.jit.load(str(artifact), map_location="cpu")
        module = after_load(saved) if after_load is not None else saved
    return TorchScriptCandidate(module, task.input_names, num_threads, saved=saved)
