"""Export the FP32 model to ONNX once per machine: the file every ONNX-based backend starts from.

The exported file is what every ONNX Runtime backend starts from: the task's model exported with
its input/output names and dynamic axes, checked, optionally simplified (onnxslim or onnxsim), and
put through ONNX Runtime's quantization pre-processing (symbolic shape inference and graph
cleanup). It is cached in ``BuildContext.cache_dir``, keyed by the task, the model's weights, the
export settings and the library versions, so that the many trials a machine runs export once.

Every export is validated before use: ``onnx.checker`` runs while exporting; then the export's
outputs on the task's example inputs (batch sizes 1 and 7, which exercises the dynamic batch axis)
are compared with the original model's (PyTorch, or Keras for a tf2onnx export). The measured
error is cached beside the ONNX file, since it depends only on the file and the model; each config
compares it with its ``validate_atol``, so a trial with a mismatch fails with the maximum error in
its row.

:class:`OrtBackend` is the base of the ONNX Runtime backends: it exports in preflight and reloads
its ONNX artifact as a session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from sweeper.backends import Backend, BuildContext, LayerUnit, is_keras_model, model_fingerprint
from sweeper.backends.onnx.config import (
    SIMPLIFIERS,
    Exporter,
    OnnxExportConfig,
    OnnxExportError,
    OnnxValidationError,
    describe_export,
)
from sweeper.backends.onnx.layers import module_path
from sweeper.backends.onnx.runtime import (
    ORT_DTYPES,
    OnnxCandidate,
    load_onnx_candidate,
    make_session,
    onnx_layer_units,
    onnx_unavailable_reason,
    quiet,
)
from sweeper.backends.onnx.tf2onnx import (
    export_keras,
    keras_outputs,
    tf2onnx_versions,
)
from sweeper.errors import ConfigError
from sweeper.location import cache_key, cached_file
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import onnx
    import torch


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
    settings = (config or OnnxExportConfig.model_validate(fields)).export_settings()
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    if settings.simplify != "none":
        versions[settings.simplify] = _simplifier_version(settings.simplify)
    if settings.exporter == "tf2onnx":
        versions.update(tf2onnx_versions())
    key = cache_key(
        task=ctx.task.name,
        model=model_fingerprint(ctx.model),
        opset=settings.opset,
        exporter=settings.exporter,
        simplify=settings.simplify,
        dynamic_axes=ctx.task.dynamic_axes,
        **versions,
    )
    simplified = "" if settings.simplify == "none" else f"-{settings.simplify}"
    name = f"{ctx.task.name}-{settings.exporter}-opset{settings.opset}{simplified}-{key}.onnx"
    path = cached_file(ctx.cache_dir / "onnx" / name, lambda tmp: _export_and_preprocess(ctx, settings, tmp))
    check_export(ctx, path, settings)
    return path


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
                _preprocess(raw, pre)
                onnx.checker.check_model(str(pre))
            except Exception as exc:
                raise OnnxExportError(
                    f"ONNX Runtime's quantization pre-processing failed on the export of {what}: {_reason(exc)}"
                ) from exc
        shutil.copyfile(pre, out)


def _preprocess(raw: Path, pre: Path) -> None:
    """ORT's quantization pre-processing (symbolic shape inference, graph optimization, ONNX shape
    inference) of ``raw`` into ``pre``; without the symbolic shape inference when it cannot finish.

    A transformers encoder exported with a dynamic sequence axis stops ORT's symbolic shape
    inference ("Incomplete symbolic shape inference": it cannot broadcast ``Min(512, seq)`` against
    ``seq`` in the position ids). The shapes it would add are optional: ORT's quantizers read the
    ONNX shape inference the other steps still run, and quantize such a model (measured on
    all-MiniLM-L6-v2 with ORT 1.32, dynamic and static QDQ, at 24 and 64 tokens).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(raw), str(pre))
    except Exception as exc:
        if "symbolic shape inference" not in str(exc):
            raise
        quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)


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


# Batch sizes of the example inputs an export is validated on: 1, and an odd size other than the
# size of 2 it was exported with, so a batch axis frozen by the exporter shows up.
VALIDATION_BATCH_SIZES = (1, 7)


def check_export(ctx: BuildContext, path: Path, settings: OnnxExportConfig) -> None:
    """Raise ``OnnxValidationError`` if the export at ``path`` is off by more than ``validate_atol``.

    The measurement (maximum absolute error and output scale over the validation batch sizes) is
    cached beside the file, since it depends only on the file and the model.
    """
    report_path = path.with_name(f"{path.stem}.validation.json")
    if not report_path.is_file():
        report = measure_export_error(ctx, path, settings)

        def write_report(tmp: Path) -> None:
            tmp.write_text(json.dumps(report))

        cached_file(report_path, write_report)
    report = json.loads(report_path.read_text())
    error, scale = float(report["max_abs_error"]), float(report["output_scale"])
    tolerance = settings.validate_atol * max(1.0, scale)
    if not error <= tolerance:  # also true for NaN
        raise OnnxValidationError(
            f"the ONNX export of {describe_export(ctx.task, settings)} does not match the original model on "
            f"the task's example inputs: maximum absolute error {error:.3g} (at batch size "
            f"{report['worst_batch_size']}) exceeds validate_atol {settings.validate_atol:g} x output "
            f"scale {max(1.0, scale):.3g} = {tolerance:.3g}"
        )


def measure_export_error(ctx: BuildContext, path: Path, settings: OnnxExportConfig) -> dict[str, float]:
    """Compare the ONNX file's outputs with ``ctx.model``'s on the task's example inputs.

    Returns:
        ``max_abs_error`` (NaN outputs count as infinite), ``output_scale`` (the largest absolute
        reference output) and ``worst_batch_size``.

    Raises:
        OnnxValidationError: when an output's shape differs from the model's.
    """
    session = make_session(path, ctx.num_threads)
    dtypes = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    error, scale, worst = -1.0, 0.0, 0
    for batch_size in VALIDATION_BATCH_SIZES:
        batch = ctx.task.example_inputs(batch_size)
        expected = reference_outputs(ctx.model, ctx.task, batch)
        feeds = {name: np.asarray(batch[name], dtype=dtype) for name, dtype in dtypes.items()}
        actual = np.asarray(session.run(None, feeds)[0], dtype=np.float64)
        if actual.shape != expected.shape:
            raise OnnxValidationError(
                f"the ONNX export of {describe_export(ctx.task, settings)} gives outputs of shape {actual.shape} "
                f"for a batch of {batch_size}, the original model {expected.shape}"
            )
        diff = np.abs(actual - expected)
        batch_error = float(np.nanmax(diff)) if not np.isnan(diff).any() else float("inf")
        if batch_error > error:
            error, worst = batch_error, batch_size
        scale = max(scale, float(np.max(np.abs(expected))))
    return {"max_abs_error": error, "output_scale": scale, "worst_batch_size": worst}


def reference_outputs(model: torch.nn.Module, task: Task, batch: Batch) -> np.ndarray:
    """Return the original model's first output for ``batch`` as a float64 array."""
    if is_keras_model(model):
        return np.asarray(keras_outputs(model, task, batch), dtype=np.float64)
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in task.input_names]
    with torch.inference_mode():
        output = model(*args)
    if isinstance(output, tuple | list):
        output = output[0]
    return output.detach().cpu().double().numpy()


OnnxConfigT = TypeVar("OnnxConfigT", bound=OnnxExportConfig)


class OrtBackend(Backend[OnnxConfigT]):
    """What the ONNX Runtime backends share: they need torch, onnx and onnxruntime, export the
    model before any trial (preflight), and reload their ONNX artifact as a session. The export
    declares the task's dynamic axes, so their sessions take any length along them."""

    any_length: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        return onnx_unavailable_reason()

    def preflight(self, ctx: BuildContext, config: OnnxConfigT) -> None:
        preflight_export(self.name, ctx, config)

    def load(self, artifact: Path, ctx: BuildContext, config: OnnxConfigT) -> OnnxCandidate:
        return load_onnx_candidate(artifact, ctx.num_threads)

    def exclusion_units(self, ctx: BuildContext, config: OnnxConfigT) -> tuple[list[LayerUnit], list[str]]:
        """The layers with weights, each with its activation and Q/DQ nodes, named by the weight
        node (:mod:`sweeper.backends.onnx.layers`); and every quantizable node."""
        nodes = self.quantizable_layers(ctx, config)
        units = onnx_layer_units(export_onnx(ctx, config), nodes)
        named = getattr(ctx.model, "named_modules", None)
        modules = {name for name, _ in named()} if callable(named) else None
        units = [dataclasses.replace(u, module=module_path(u.name, modules)) for u in units]
        return units, [name for name, _ in nodes]
