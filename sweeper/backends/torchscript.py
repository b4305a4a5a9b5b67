"""TorchScript FP32: the task's model traced or scripted, optionally frozen and optimized.

- ``mode="trace"`` records the operations run on example inputs: right for feed-forward models,
  wrong for Python control flow that depends on the inputs (the trace is checked on other batch
  sizes and rejected if it differs). ``mode="script"`` compiles the Python code itself, control
  flow included, but only code TorchScript's compiler accepts.
- ``freeze`` (``torch.jit.freeze``) inlines weights and attributes as constants and folds them.
- ``optimize_for_inference`` (``torch.jit.optimize_for_inference``) runs further passes on the
  frozen module: Conv+BN folding and, on CPU, conversion to oneDNN (MKLDNN) layouts. It needs a
  frozen module, so the config asks for ``freeze=True`` with it.

The artifact is the ``torch.jit.save`` file ``model.pt``, reloaded with ``torch.jit.load``.
The oneDNN constants that ``optimize_for_inference`` creates cannot be serialised by torch
(``torch.jit.load`` fails on them), so with that option the file holds the frozen module and
:meth:`TorchScriptFP32.load` runs ``optimize_for_inference`` again after loading; the pass is
deterministic, and a deployment does the same.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Self

from pydantic import model_validator

from sweeper.backends import Backend, BackendConfig, BuildContext
from sweeper.backends.torch.eager import torch_unavailable_reason
from sweeper.backends.torch.jit import (
    TorchScriptCandidate,
    TorchScriptError,
    load_torchscript,
    quiet_jit,
    trace,
)

if TYPE_CHECKING:
    import torch


class TorchScriptConfig(BackendConfig):
    """Settings of the TorchScript backend.

    Attributes:
        mode: ``"trace"`` (feed-forward models) or ``"script"`` (models with control flow).
        freeze: apply ``torch.jit.freeze``.
        optimize_for_inference: apply ``torch.jit.optimize_for_inference`` (needs ``freeze``).
    """

    mode: Literal["trace", "script"] = "trace"
    freeze: bool = True
    optimize_for_inference: bool = False

    @model_validator(mode="after")
    def _check_freeze(self) -> Self:
        if self.optimize_for_inference and not self.freeze:
            raise ValueError(
                "optimize_for_inference runs on a frozen module (torch freezes it first), so it "
                "needs freeze=True; use freeze=True or optimize_for_inference=False"
            )
        return self


class TorchScriptFP32(Backend[TorchScriptConfig]):
    """The FP32 model as TorchScript."""

    name: ClassVar[str] = "torchscript"
    Config: type[TorchScriptConfig] = TorchScriptConfig
    # Measured: 100% top-1 agreement on digits and on the GRU task with every config (FP32;
    # freezing and oneDNN fold BatchNorm, which changes outputs by about 1e-5).
    min_agreement_pct: ClassVar[float] = 99.0

    def unavailable_reason(self) -> str | None:
        return torch_unavailable_reason()

    def build(self, ctx: BuildContext, config: TorchScriptConfig) -> TorchScriptCandidate:
        import torch

        model = copy.deepcopy(ctx.model).eval()
        if config.mode == "trace":
            module = trace(model, ctx.task)
        else:
            try:
                with quiet_jit():
                    module = torch.jit.script(model)
            except Exception as exc:
                lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
                raise TorchScriptError(
                    f"cannot script the model of task '{ctx.task.name}' (try mode 'trace' if it has "
                    f"no input-dependent control flow): {type(exc).__name__}: {' '.join(lines[:6])}"
                ) from exc
        if config.freeze:
            with quiet_jit():
                module = torch.jit.freeze(module)
        return TorchScriptCandidate(_after_load(module, config), ctx.task.input_names, ctx.num_threads, saved=module)

    def load(self, artifact: Path, ctx: BuildContext, config: TorchScriptConfig) -> TorchScriptCandidate:
        return load_torchscript(artifact, ctx.task, ctx.num_threads, lambda m: _after_load(m, config))


def _after_load(module: torch.jit.ScriptModule, config: TorchScriptConfig) -> torch.nn.Module:
    """The passes that cannot be saved, run on the module saved (or just loaded)."""
    import torch

    if not config.optimize_for_inference:
        return module
    # The pass rewrites the graphs of the module it is given, which a deep copy shares; the saved
    # module must stay serialisable, so the pass runs on a copy made through a file's bytes.
    buffer = io.BytesIO()
    with quiet_jit():
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.optimize_for_inference(torch.jit.load(buffer, map_location="cpu"))
