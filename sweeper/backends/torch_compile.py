"""``torch.compile`` with the inductor backend: the FP32 model compiled to C++/OpenMP CPU kernels.

Compilation is a runtime step, not a file: the artifact is the FP32 state dict
(``state_dict.pt``), and :meth:`TorchCompile.load` loads it into the task's model and compiles
again. Inductor caches compiled kernels on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under
the system temporary folder), so compiling the same model again on a machine takes a few seconds
instead of tens. :meth:`TorchCompile.build` compiles eagerly, with one call on a task example,
so that compile errors and compile time belong to the build; every new input shape compiles once
more (all shapes are specialised with ``dynamic=False``).

Two process-wide settings of torch's compiler are changed, because a sweep builds many compiled
candidates in one worker process:

- ``torch._dynamo.reset()`` before each build and load. Compiled code is cached per Python
  function (the model class's ``forward``), and every mode, dynamic setting and input shape
  adds an entry; past ``recompile_limit`` (8) entries torch silently runs the function eagerly.
  An older candidate in the same process recompiles on its next call.
- ``fail_on_recompile_limit_hit``: should the limit still be reached, raise instead of running
  eagerly, so that a measured latency is never an uncompiled model's.

Modes: ``default``; ``max-autotune-no-cudagraphs`` (autotunes kernel choices, which takes longer
to compile); ``reduce-overhead`` adds CUDA graphs, which do not apply on the CPU, where it is the
same as ``default``. ``freezing`` (inductor's ``freezing`` option) treats the weights as constants,
folding them and pre-packing them for oneDNN (inductor's recommended setting for CPU inference).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, cast

from sweeper.backends import Backend, BackendConfig, BuildContext
from sweeper.backends.torch.eager import (
    STATE_DICT_FILE,
    TorchCandidate,
    load_state_dict,
    torch_unavailable_reason,
)

if TYPE_CHECKING:
    import torch

Mode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


class TorchCompileConfig(BackendConfig):
    """Settings of ``torch.compile`` (inductor).

    Attributes:
        mode: ``torch.compile``'s mode.
        dynamic: compile kernels for any batch size (``True``) or specialise them to each input
            shape met (``False``).
        freezing: inductor's ``freezing`` option (weights become constants, folded and
            pre-packed).
    """

    mode: Mode = "default"
    dynamic: bool = False
    freezing: bool = False


class CompiledCandidate(TorchCandidate):
    """A compiled module; its artifact is the state dict of the FP32 module it compiles."""

    def __init__(
        self, compiled: torch.nn.Module, fp32: torch.nn.Module, input_names: tuple[str, ...], num_threads: int
    ) -> None:
        super().__init__(compiled, input_names, num_threads)
        self.fp32 = fp32

    def _write(self, directory: Path) -> Path:
        import torch

        target = directory / STATE_DICT_FILE
        torch.save(self.fp32.state_dict(), target)
        return target


class TorchCompile(Backend[TorchCompileConfig]):
    """The FP32 model compiled by ``torch.compile(backend="inductor")``."""

    name: ClassVar[str] = "torch_compile"
    Config: type[TorchCompileConfig] = TorchCompileConfig
    # Measured: 100% top-1 agreement on digits with every mode (FP32; kernels reorder sums and
    # freezing folds BatchNorm, which changes outputs by about 1e-5).
    min_agreement_pct: ClassVar[float] = 99.0

    def unavailable_reason(self) -> str | None:
        import os
        import shutil
        import sys
        import sysconfig

        reason = torch_unavailable_reason()
        if reason is not None:
            return reason
        # Inductor's own choice of compiler (torch._inductor.config.cpp.cxx).
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            return (
                f"torch.compile's inductor backend compiles C++ kernels for the CPU with '{cxx}' "
                f"(the CXX environment variable, else g++), which is not on PATH; install it or set CXX"
            )
        include = sysconfig.get_paths()["include"]
        if not (Path(include) / "Python.h").is_file():
            return (
                f"torch.compile's inductor backend compiles its CPU kernels against the Python "
                f"headers, and there is no Python.h in {include}; install Python's development headers"
            )
        return None

    def build(self, ctx: BuildContext, config: TorchCompileConfig) -> CompiledCandidate:
        return _compiled(copy.deepcopy(ctx.model).eval(), ctx, config)

    def load(self, artifact: Path, ctx: BuildContext, config: TorchCompileConfig) -> CompiledCandidate:
        model = copy.deepcopy(ctx.model).eval()
        model.load_state_dict(load_state_dict(artifact))
        return _compiled(model, ctx, config)


def _compiled(model: torch.nn.Module, ctx: BuildContext, config: TorchCompileConfig) -> CompiledCandidate:
    import torch
    import torch._dynamo
    import torch._inductor

    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # Inductor writes the thread count into the kernels it generates.
    torch.set_num_threads(ctx.num_threads)
    options = {**torch._inductor.list_mode_options(config.mode, config.dynamic), "freezing": config.freezing}
    compiled = torch.compile(model, backend="inductor", dynamic=config.dynamic, options=options)
    candidate = CompiledCandidate(cast("torch.nn.Module", compiled), model, ctx.task.input_names, ctx.num_threads)
    try:
        # Through predict, so that the guards (grad mode, input tensor kinds) are the ones later
        # calls meet and the first of those does not compile again.
        candidate.predict(ctx.task.example_inputs(1))
    except Exception as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise RuntimeError(
            f"torch.compile (inductor, {config.model_dump()}) failed on the model of task "
            f"'{ctx.task.name}': {type(exc).__name__}: {' '.join(lines[:6])}"
        ) from exc
    return candidate
