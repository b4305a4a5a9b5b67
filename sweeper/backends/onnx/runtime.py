"""The ONNX Runtime side of the ONNX backends: sessions, the candidate, graph node lookups, and
silencing the exporters and ORT's quantization tools while they run."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweeper.backends import Candidate, LayerUnit
from sweeper.backends.onnx.layers import expand_units, layer_units
from sweeper.errors import ConfigError, did_you_mean
from sweeper.task import Batch

if TYPE_CHECKING:
    import onnxruntime

# ONNX Runtime input element types, as the session reports them, to numpy dtypes.
ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def onnx_unavailable_reason() -> str | None:
    """Why the ONNX Runtime backends cannot run here (a missing package), or ``None``."""
    import importlib.util

    for package in ("torch", "onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"the '{package}' package is not installed (pip install {package})"
    return None


def graph_nodes(path: Path, op_types: Collection[str]) -> list[tuple[str, str]]:
    """Return ``(name, op_type)`` of the nodes of the ONNX file ``path`` with a type in ``op_types``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(node.name, node.op_type) for node in graph.node if node.op_type in op_types]


def onnx_layer_units(path: Path, quantizable: list[tuple[str, str]]) -> list[LayerUnit]:
    """The exclusion units (:mod:`sweeper.backends.onnx.layers`) of the ONNX file ``path`` whose
    weight node is one of the ``quantizable`` ``(name, op_type)`` nodes."""
    import onnx

    names = {name for name, _ in quantizable}
    units = layer_units(onnx.load(str(path), load_external_data=False), {op for _, op in quantizable})
    return [unit for unit in units if unit.name in names]


def excluded_nodes(path: Path, quantizable: list[tuple[str, str]], names: Collection[str]) -> list[str]:
    """``names`` (units or single nodes) as the node names to hand ORT's ``nodes_to_exclude``."""
    return expand_units(onnx_layer_units(path, quantizable), names) if names else []


def quantizer_input(fp32: Path, workdir: Path) -> Path:
    """The cached FP32 model under a name private to this build, to hand ORT's quantizers.

    ``quantize_static`` and ``quantize_dynamic`` write ``<model>-inferred.onnx`` beside the model
    they are given, read it back and delete it. Two builds from the same cached file at once
    (parallel trials, sensitivity chunks) then read each other's half-written or deleted file
    (``ValueError: Failed to find proper ai.onnx domain``, ``FileNotFoundError``). A link in the
    build's own workdir keeps that scratch file private.
    """
    private = workdir / f"fp32-{fp32.name}"
    if not private.exists():
        try:
            private.symlink_to(fp32.resolve())
        except OSError:  # no symlinks here
            shutil.copyfile(fp32, private)
    return private


# Op types whose input 2 is a bias that ORT's QOperator quantizer turns into its own int32 tensor.
_BIASED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def unshare_biases(model_path: Path, workdir: Path) -> Path:
    """``model_path``, or a copy in ``workdir`` in which every Conv/ConvTranspose/Gemm bias that
    is an initializer also read by another node has a copy of its own.

    Exporters merge equal initializers: in the export of a freshly initialised BERT-base every
    all-zero bias, the pooler Gemm's among them, is one tensor, also read by ``Add`` nodes. ORT
    1.32's QOperator quantizer quantizes that tensor once as an ``Add`` input (uint8/int8, for
    QLinearAdd) and hands the same quantized tensor to QGemm as its bias, which must be int32: the
    session refuses the model ("INVALID_GRAPH ... Type 'tensor(uint8)' of input parameter
    (model.bert.embeddings.LayerNorm.bias_quantized) of operator (QGemm)"). A copy per bias is
    the same model; the activation tensors keep their names, so cached calibration ranges still apply.
    """
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    copies = 0
    for i, node in enumerate(graph.node):
        if node.op_type not in _BIASED_OPS or len(node.input) < 3:
            continue
        bias = node.input[2]
        if bias in initializers and readers[bias] > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[bias])
            copy.name = f"{bias}__bias_of_{node.name or i}"
            graph.initializer.append(copy)
            node.input[2] = copy.name
            readers[bias] -= 1
            copies += 1
    if not copies:
        return model_path
    target = workdir / f"{model_path.stem}-unshared-biases.onnx"
    onnx.save(model, str(target))
    return target


def check_nodes_to_exclude(nodes_to_exclude: Collection[str], quantizable: list[tuple[str, str]], what: str) -> None:
    """Raise ``ConfigError`` naming the ``nodes_to_exclude`` that are not ``quantizable`` nodes.

    ``what`` names the model in the message (task, exporter, opset).
    """
    known = {name for name, _ in quantizable}
    unknown = [name for name in nodes_to_exclude if name not in known]
    if not unknown:
        return
    shown = ", ".join(f"'{name}' ({op})" for name, op in quantizable[:12])
    more = f" and {len(quantizable) - 12} more" if len(quantizable) > 12 else ""
    hint = "".join(did_you_mean(name, known) for name in unknown[:1])
    raise ConfigError(
        f"nodes_to_exclude names {unknown} that are not quantizable nodes of {what}.{hint} "
        f"Quantizable nodes: {shown or 'none'}{more}."
    )


# ONNX Runtime graph optimizations every session here runs without. ``WeightBiasQuantization``
# (ORT >= 1.20, basic level) quantizes, per tensor and at session creation, the float weights of
# any Conv, ConvTranspose or Gemm whose input comes from a DequantizeLinear: exactly a layer that
# static quantization was told to leave in float (``nodes_to_exclude``) between quantized layers.
# Measured on EfficientNet-Lite0 (ORT 1.32, per-channel minmax static INT8, 190 views): with its
# first depthwise Conv and the 11 nodes outside any layer left in float, the model lost 34.7
# points of top-1 agreement with the optimization, more than with nothing left in float (15.3);
# without it, 12.6 (normalised output error on 64 views: 0.107 with, 0.0086 without). A model this
# package exports is loaded the same way (``load_model.py`` opens it with :func:`make_session`);
# elsewhere, pass the same list as ``disabled_optimizers`` to ``onnxruntime.InferenceSession``.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def make_session(path: Path, num_threads: int, optimized_to: Path | None = None) -> onnxruntime.InferenceSession:
    """Open ``path`` on ORT's CPU provider with ``num_threads`` intra-op threads, sequential,
    without the :data:`DISABLED_OPTIMIZERS`; ``optimized_to``: where ORT writes the graph it runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers and the like
    # Idle intra-op threads spin-wait by default; timed interleaved with the FP32 model (or while
    # another trial's phase waits), spinning threads would bill their cores to the other model.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )


class OnnxCandidate(Candidate):
    """An ONNX file run by an ONNX Runtime CPU session."""

    def __init__(self, path: Path, num_threads: int) -> None:
        self.path = path
        self.session = make_session(path, num_threads)
        self._dtypes = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self._output = self.session.get_outputs()[0].name

    def predict(self, batch: Batch) -> np.ndarray:
        try:
            feeds = {name: np.asarray(batch[name], dtype=dtype) for name, dtype in self._dtypes.items()}
        except KeyError:
            raise KeyError(f"the model's inputs are {sorted(self._dtypes)}; the batch has {sorted(batch)}") from None
        (output,) = self.session.run([self._output], feeds)
        return np.asarray(output, dtype=np.float32)

    def _write(self, directory: Path) -> Path:
        target = directory / "model.onnx"
        shutil.copyfile(self.path, target)
        return target


def load_onnx_candidate(artifact: Path, num_threads: int) -> OnnxCandidate:
    """Open an ONNX file written by :meth:`OnnxCandidate.save`."""
    if not artifact.is_file():
        raise FileNotFoundError(f"no ONNX artifact at '{artifact}'")
    return OnnxCandidate(artifact, num_threads)


# Loggers whose warnings and progress lines the exporters and ORT's quantization tools emit.
_CHATTY_LOGGERS = (
    "torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "root",
)  # fmt: skip


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
