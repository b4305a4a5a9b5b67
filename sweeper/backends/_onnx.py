"""Shared ONNX helpers: export the FP32 model once per machine, and run ONNX files on ORT CPU.

The exported file is what every ONNX Runtime backend starts from: the task's model exported with
its input/output names and dynamic axes, checked, optionally simplified (onnxslim or onnxsim), and
put through ONNX Runtime's quantization pre-processing (symbolic shape inference and graph
cleanup). It is cached in ``BuildContext.cache_dir``, keyed by the task, the model's weights, the
export settings and the library versions, so that the many trials a machine runs export once.

Every export is validated before use (:mod:`sweeper.backends._onnx_validation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from sweeper.backends._base import BackendConfig, BuildContext
from sweeper.cache import cache_key, cached_file
from sweeper.errors import ConfigError, SweeperInputError
from sweeper.task import Task

if TYPE_CHECKING:
    import onnx
    import torch

Exporter = Literal["torchscript", "dynamo", "tf2onnx"]
Simplifier = Literal["none", "onnxslim", "onnxsim"]

# torch 2.14's TorchScript exporter implements opsets up to 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
# Its dynamo exporter implements 18 and above; a lower opset goes through a best-effort version
# converter that silently keeps opset 18 when it fails (it does for some models at 13 and 14).
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 18
# Static QDQ per-channel quantization needs opset 13; 21 is the newest opset this project tests.
MIN_OPSET = 13
MAX_OPSET = 21
# tf2onnx 1.17 implements opsets up to 18 (tf2onnx.constants.OPSET_TO_IR_VERSION).
TF2ONNX_MAX_OPSET = 18
# Simplifier -> (module to import, what to pip install). onnxslim is a core dependency; onnxsim
# ships a compiled extension with wheels for fewer platforms, so it is the ``[onnxsim]`` extra.
SIMPLIFIERS: dict[str, tuple[str, str]] = {
    "onnxslim": ("onnxslim", "pip install onnxslim"),
    "onnxsim": ("onnxsim", "pip install 'sweeper[onnxsim]'"),
}

# Loggers whose warnings and progress lines the exporters and ORT's quantization tools emit.
_CHATTY_LOGGERS = (
    "torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "root",
)  # fmt: skip


class OnnxExportError(SweeperInputError):
    """The task's model cannot be exported to ONNX with the chosen exporter and opset."""


class OnnxValidationError(OnnxExportError):
    """The exported model's outputs differ from the original model's beyond ``validate_atol``."""


class OnnxExportConfig(BackendConfig):
    """Fields shared by every backend that starts from the exported ONNX model.

    Attributes:
        opset: the ONNX opset to export with. The TorchScript exporter supports 13..20, the
            dynamo exporter 18..21, tf2onnx 13..18.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``), ``"dynamo"``
            (``torch.export``-based), or ``"tf2onnx"`` for a task whose model is a Keras model
            (the ``[tensorflow]`` extra).
        simplify: simplify the exported graph with ``onnxslim`` or ``onnxsim`` (the ``[onnxsim]``
            extra) before ONNX Runtime's pre-processing, or not (``"none"``).
        validate_atol: the largest absolute difference allowed between the export's outputs and
            the original model's on the task's example inputs, per unit of output scale: the
            tolerance is ``validate_atol * max(1, max |output|)``.
    """

    opset: int = Field(default=17, ge=MIN_OPSET, le=MAX_OPSET)
    exporter: Exporter = "torchscript"
    simplify: Simplifier = "none"
    validate_atol: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)

    def export_settings(self) -> OnnxExportConfig:
        """Return only the export fields of this config (what the exported file depends on)."""
        return OnnxExportConfig(**{name: getattr(self, name) for name in OnnxExportConfig.model_fields})

    @model_validator(mode="after")
    def _check_opset_for_exporter(self) -> Self:
        if self.exporter == "tf2onnx" and self.opset > TF2ONNX_MAX_OPSET:
            raise ValueError(
                f"exporter 'tf2onnx' supports opset {MIN_OPSET}..{TF2ONNX_MAX_OPSET}, got opset {self.opset}"
            )
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise ValueError(
                f"exporter 'torchscript' supports opset {MIN_OPSET}..{TORCHSCRIPT_MAX_OPSET}, got opset "
                f"{self.opset}; use exporter 'dynamo' for opset {TORCHSCRIPT_MAX_OPSET + 1}..{MAX_OPSET}"
            )
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise ValueError(
                f"exporter 'dynamo' supports opset {DYNAMO_MIN_OPSET}..{MAX_OPSET}, got opset "
                f"{self.opset}; use exporter 'torchscript' for opset {MIN_OPSET}..{DYNAMO_MIN_OPSET - 1}"
            )
        return self


def model_fingerprint(model: torch.nn.Module) -> str:
    """Return a hash of ``model``'s architecture (its repr) and every tensor of its state dict.

    A Keras model (a task exported with tf2onnx) is hashed by its config and weights instead.
    """
    from sweeper.backends._tf2onnx import is_keras_model, keras_fingerprint

    if is_keras_model(model):
        return keras_fingerprint(model)
    import torch

    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def export_onnx(ctx: BuildContext, config: OnnxExportConfig | None = None, **fields: object) -> Path:
    """Export ``ctx.model`` to a checked, validated, pre-processed FP32 ONNX file (cached per machine).

    Args:
        ctx: the build context (model, task, cache folder).
        config: the backend's config; only its export fields are used.
        **fields: export fields (``opset``, ``exporter``, ``simplify``, ``validate_atol``) when no
            ``config`` is given; the others take their defaults.

    Raises:
        OnnxExportError: naming the task, exporter and opset, with the exporter's reason.
        OnnxValidationError: when the export's outputs differ from the model's beyond
            ``validate_atol``; the message gives the maximum error.
        ConfigError: when the chosen simplifier is not installed here.
    """
    import onnx
    import onnxruntime
    import torch

    if config is not None and fields:
        raise TypeError("export_onnx takes a config or export fields, not both")
    settings = (config or OnnxExportConfig(**fields)).export_settings()  # type: ignore[arg-type]
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    if settings.simplify != "none":
        versions[settings.simplify] = _simplifier_version(settings.simplify)
    if settings.exporter == "tf2onnx":
        from sweeper.backends._tf2onnx import tf2onnx_versions

        versions.update(tf2onnx_versions())
    key = cache_key(
        task=ctx.task.name,
        model=model_fingerprint(ctx.model),
        opset=settings.opset,
        exporter=settings.exporter,
        simplify=settings.simplify,
        **versions,
    )
    simplified = "" if settings.simplify == "none" else f"-{settings.simplify}"
    name = f"{ctx.task.name}-{settings.exporter}-opset{settings.opset}{simplified}-{key}.onnx"
    path = cached_file(ctx.cache_dir / "onnx" / name, lambda tmp: _export_and_preprocess(ctx, settings, tmp))
    from sweeper.backends._onnx_validation import check_export

    check_export(ctx, path, settings)
    return path


def describe_export(task: Task, settings: OnnxExportConfig) -> str:
    """Name an export in messages: task, exporter, opset and simplifier."""
    what = f"task '{task.name}' with exporter '{settings.exporter}' at opset {settings.opset}"
    return what if settings.simplify == "none" else f"{what}, simplified with {settings.simplify}"


def _simplifier_version(simplify: str) -> str:
    """Return the installed version of ``simplify``'s package, or raise ``ConfigError``."""
    import importlib.metadata
    import importlib.util

    module, install = SIMPLIFIERS[simplify]
    if importlib.util.find_spec(module) is None:
        installed = [s for s, (m, _) in SIMPLIFIERS.items() if importlib.util.find_spec(m) is not None]
        raise ConfigError(
            f"simplify '{simplify}' needs the '{module}' package, which is not installed here ({install}); "
            f"choose simplify 'none'{''.join(f' or {s!r}' for s in installed)}"
        )
    return importlib.metadata.version(module)


def _export_and_preprocess(ctx: BuildContext, settings: OnnxExportConfig, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from sweeper.backends._tf2onnx import is_keras_model

    task, opset, exporter = ctx.task, settings.opset, settings.exporter
    what = describe_export(task, settings)
    keras = is_keras_model(ctx.model)
    if keras != (exporter == "tf2onnx"):
        kind = "a Keras model" if keras else "a PyTorch model"
        fits = "'tf2onnx'" if keras else "'torchscript' or 'dynamo'"
        raise OnnxExportError(f"cannot export {what}: the task's model is {kind}; use exporter {fits}")
    with tempfile.TemporaryDirectory(dir=ctx.workdir, prefix="onnx-export-") as tmpdir:
        raw, pre = Path(tmpdir) / "exported.onnx", Path(tmpdir) / "preprocessed.onnx"
        with quiet(native=True):
            try:
                _run_exporter(ctx.model, raw, task, opset, exporter)
                model = onnx.load(str(raw))
                onnx.checker.check_model(model)
            except Exception as exc:
                raise OnnxExportError(f"cannot export {what}: {_reason(exc)}") from exc
        exported_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if exported_opset != opset:
            raise OnnxExportError(
                f"cannot export {what}: the exporter produced opset {exported_opset} instead; "
                f"choose an opset the exporter implements"
            )
        if settings.simplify != "none":
            with quiet(native=True):
                try:
                    simplified = _simplify(model, settings.simplify)
                    onnx.checker.check_model(simplified)
                    onnx.save(simplified, str(raw))
                except Exception as exc:
                    raise OnnxExportError(
                        f"{settings.simplify} failed to simplify the export of {what}: {_reason(exc)}"
                    ) from exc
        # quant_pre_process writes scratch files (sym_shape_infer_temp.onnx, *.data for large
        # models) into the current folder: keep them in the temporary one.
        with quiet(native=True), contextlib.chdir(tmpdir):
            try:
                quant_pre_process(str(raw), str(pre))
                onnx.checker.check_model(str(pre))
            except Exception as exc:
                raise OnnxExportError(
                    f"ONNX Runtime's quantization pre-processing failed on the export of {what}: "
                    f"{_reason(exc)}"
                ) from exc
        shutil.copyfile(pre, out)


def _simplify(model: onnx.ModelProto, simplify: str) -> onnx.ModelProto:
    if simplify == "onnxslim":
        import onnxslim

        return onnxslim.slim(model)
    import onnxsim

    # check_n=0: onnxsim's own check runs random inputs; the export is validated on real ones.
    simplified, ok = onnxsim.simplify(model, check_n=0)
    if not ok:
        raise RuntimeError("onnxsim reported that the simplified model is not equivalent")
    return simplified


def _run_exporter(model: torch.nn.Module, path: Path, task: Task, opset: int, exporter: Exporter) -> None:
    if exporter == "tf2onnx":
        from sweeper.backends._tf2onnx import export_keras

        export_keras(model, task, opset, path)
        return
    import torch

    # Two samples, not one: torch.export specialises a dimension of size 1 to a constant.
    example = task.example_inputs(2)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[name])) for name in task.input_names)
    input_names, output_names = list(task.input_names), list(task.output_names)
    dynamic_axes = task.dynamic_axes
    if exporter == "torchscript":
        # torch 2.14's TorchScript exporter switches ONNX logging on for the whole process and
        # leaves it on (its setup_onnx_logging tests a function for truth); put it back.
        log_enabled = torch._C._jit_is_onnx_log_enabled()
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model, args, str(path), dynamo=False, verbose=False, opset_version=opset,
                    input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                )  # fmt: skip
        finally:
            torch._C._jit_set_onnx_log_enabled(log_enabled)
        return
    # One Dim per axis name, shared by every input that names it; one entry per positional input.
    names = {dim for axes in dynamic_axes.values() for dim in axes.values()}
    dims = {dim: torch.export.Dim(_identifier(dim)) for dim in names}
    dynamic_shapes = tuple(
        {axis: dims[dim] for axis, dim in dynamic_axes.get(name, {}).items()} for name in input_names
    )
    with torch.no_grad():
        torch.onnx.export(
            model, args, str(path), dynamo=True, verbose=False, opset_version=opset, external_data=False,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
        )  # fmt: skip


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned[:1].isalpha() else f"d_{cleaned}"


@contextlib.contextmanager
def quiet(*, native: bool = False) -> Iterator[io.StringIO]:
    """Capture prints, Python warnings and library log lines; yield the captured text.

    Args:
        native: also capture what native code writes to the process's stdout and stderr file
            descriptors (the TorchScript exporter dumps its whole IR graph there on failure).
    """
    import warnings

    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    root = logging.getLogger()
    # ORT's quantizer logs with logging.warning(), which installs a stderr handler on a root
    # logger without handlers: that handler would keep writing into this block's buffer.
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.ExitStack() as stack:
            if native:
                stack.enter_context(_native_output_captured())
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if guard is not None:
            root.removeHandler(guard)


@contextlib.contextmanager
def _native_output_captured() -> Iterator[None]:
    """Point file descriptors 1 and 2 at a scratch file for the duration, then restore them."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _reason(exc: BaseException, max_lines: int = 6) -> str:
    """The gist of an exporter's exception: its type and first lines, without colour codes.

    The dynamo exporter's messages open with generic advice and put the cause under
    ``## Exception summary``; that part is kept instead.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    gist = " ".join(lines[:max_lines]) + (" ..." if len(lines) > max_lines else "")
    return f"{type(exc).__name__}: {gist}"


def preflight_export(backend: str, ctx: BuildContext, config: OnnxExportConfig) -> None:
    """Export once before any trial (cached, so the trials reuse it); name the backend on failure.

    Raises:
        OnnxExportError: when the task's model does not export with ``config``'s settings.
    """
    try:
        export_onnx(ctx, config)
    except OnnxExportError as exc:
        raise type(exc)(
            f"{exc}. Backend '{backend}' starts from this export: choose another exporter "
            "or opset for it in the space, or remove the ONNX-based backends"
        ) from None
