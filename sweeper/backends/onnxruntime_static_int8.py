"""ONNX Runtime static int8: activation ranges from calibration data, weights quantized offline.

Calibration ranges depend only on the exported model, the calibration method and the sample
count, so they are cached per machine (``cache_dir/calibration``) and reused by every trial that
differs in format, types, per-channel, reduce-range or excluded nodes.

What the installed ONNX Runtime (1.32) does with each combination, measured on ORT's CPU provider:

- ``activation_type="int8"`` with ``weight_type="uint8"``: rejected by ORT's quantizer; the config
  rejects it on construction.
- ``quant_format="qoperator"`` with ``activation_type="int8"``: runs and is accurate, but ORT's
  CPU kernels for it are slow (about 3x slower than QDQ on the digits CNN); allowed, so the
  search can find that out.
- ``quant_format="qoperator"`` on a model whose Gemm/Conv bias is an initializer another node
  reads too (BERT-base's export): ORT's quantizer made a graph ORT refuses to load
  ("INVALID_GRAPH ... of operator (QGemm)"); such biases get a copy each before quantizing
  (:func:`~sweeper.backends.onnx.runtime.unshare_biases`). QOperator runs on MiniLM too, but
  loses ~20 points of accuracy there (QDQ ~12).
- ``calibration_method="distribution"``: ORT's distribution calibrator (meant for float8) gives
  symmetric ranges, with which ORT's quantizer drops the ReLUs after Conv/Gemm while keeping
  zero points mid-range: the ReLUs vanish and accuracy collapses (43% agreement on digits). The
  backend therefore quantizes activations symmetrically for this method
  (``ActivationSymmetric``), which keeps the ReLUs and restores accuracy.
- ``entropy``, ``percentile`` and ``distribution`` stack the calibration batches, so every batch
  must have the same number of samples; the reader below splits the samples evenly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from sweeper.backends import BuildContext
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import OrtBackend, export_onnx
from sweeper.backends.onnx.runtime import (
    OnnxCandidate,
    check_nodes_to_exclude,
    excluded_nodes,
    graph_nodes,
    quantizer_input,
    quiet,
    unshare_biases,
)
from sweeper.location import cache_key, cached_file
from sweeper.task import Batch, check_sample_count

CalibrationMethod = Literal["minmax", "entropy", "percentile", "distribution"]
IntType = Literal["int8", "uint8"]

# Percentile calibration keeps this percentile of |activation| (ORT's own default).
PERCENTILE = 99.999
# Calibration batches hold at most this many samples (evenly split, see _even_batches).
MAX_CALIBRATION_BATCH = 32
# ORT's calibrators keep every intermediate output of every calibration batch in memory until they
# compute the ranges: measured on EfficientNet-Lite0 (180 views), percentile calibration peaked at
# 12.5 GB and minmax at 4.8 GB, so two trials calibrating at once outgrew a 24 GB machine. With
# CalibStridedMinMax (the name notwithstanding, any calibrator) ORT collects one batch at a time,
# merging min/max exactly and histograms (entropy, percentile, distribution) bin by bin.
CALIBRATION_OPTIONS: dict[str, Any] = {"CalibStridedMinMax": 1}
# ORT quantizer options for a QDQ model that TensorRT's ONNX parser accepts: zero points of 0
# (symmetric int8 ranges), weights kept in float behind their own Q/DQ pair, biases left in float
# (TensorRT rejects DequantizeLinear of int32 biases), and one Q/DQ pair per consumer.
TENSORRT_QDQ_OPTIONS: dict[str, bool] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "AddQDQPairToWeight": True,
    "QuantizeBias": False,
    "DedicatedQDQPair": True,
}


class StaticQuantizationConfig(OnnxExportConfig):
    """What every ONNX Runtime static int8 quantization of the export is configured with: this
    backend's, and the QDQ model a ``tensorrt`` int8 engine is built from.

    Attributes:
        calibration_method: how activation ranges are computed from the calibration samples.
        calibration_samples: how many calibration samples (at most the task's calibration size,
            checked at build).
        per_channel: one weight scale per output channel instead of per tensor.
        nodes_to_exclude: ONNX node names to leave in float (see :func:`static_quantizable_nodes`);
            a layer's weight node stands for its whole exclusion unit
            (:mod:`sweeper.backends.onnx.layers`).
    """

    calibration_method: CalibrationMethod = "minmax"
    calibration_samples: int = Field(default=128, ge=1)
    per_channel: bool = False
    nodes_to_exclude: tuple[str, ...] = ()


class OnnxRuntimeStaticInt8Config(StaticQuantizationConfig):
    """Settings of ONNX Runtime static quantization (besides the calibration fields and
    ``nodes_to_exclude``, see :class:`StaticQuantizationConfig`).

    Attributes:
        quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs, fused by ORT) or
            ``"qoperator"`` (QLinearConv, QLinearMatMul, ...).
        activation_type: integer type of activations.
        weight_type: integer type of weights (``uint8`` needs ``uint8`` activations).
        reduce_range: quantize weights to 7 bits (helps CPUs without VNNI avoid saturation).
        qdq_target: the runtime the QDQ model is made for. ``"tensorrt"`` makes what TensorRT's
            explicit quantization accepts (see :data:`TENSORRT_QDQ_OPTIONS`); it needs
            ``quant_format="qdq"`` and int8 activations and weights. The model still runs on ORT.
    """

    quant_format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: IntType = "uint8"
    weight_type: IntType = "int8"
    reduce_range: bool = False
    qdq_target: Literal["onnxruntime", "tensorrt"] = "onnxruntime"

    @model_validator(mode="after")
    def _check_types(self) -> Self:
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError(
                "activation_type 'int8' with weight_type 'uint8' is not supported by ONNX Runtime's "
                "quantizer; allowed (activation_type, weight_type) pairs: (uint8, int8), (uint8, uint8), "
                "(int8, int8)"
            )
        if self.qdq_target == "tensorrt" and (
            self.quant_format != "qdq" or self.activation_type != "int8" or self.weight_type != "int8"
        ):
            raise ValueError(
                "qdq_target 'tensorrt' needs quant_format 'qdq' with activation_type 'int8' and weight_type "
                f"'int8', got quant_format '{self.quant_format}', activation_type '{self.activation_type}', "
                f"weight_type '{self.weight_type}'"
            )
        return self


class OnnxRuntimeStaticInt8(OrtBackend[OnnxRuntimeStaticInt8Config]):
    """ONNX Runtime static int8 quantization (``quantize_static``) of the exported model."""

    name: ClassVar[str] = "onnxruntime_static_int8"
    Config: type[OnnxRuntimeStaticInt8Config] = OnnxRuntimeStaticInt8Config
    # Measured: 100% top-1 agreement on digits (360 samples) with every tested config (all four
    # calibration methods, QDQ and QOperator, per-channel, reduce-range, both activation types).
    # The margin allows for CPUs without VNNI, where uint8 x int8 products can saturate.
    min_agreement_pct: ClassVar[float] = 97.0


    def quantizable_nodes(self, onnx_path: Path) -> list[tuple[str, str]]:
        """Return ``(name, op_type)`` of the nodes ``quantize_static`` may quantize in ``onnx_path``.

        Pass the FP32 model the backend quantizes (:func:`sweeper.backends.onnx.export.export_onnx`).
        """
        return static_quantizable_nodes(onnx_path)

    exclusion_field: ClassVar[str] = "nodes_to_exclude"

    def quantizable_layers(self, ctx: BuildContext, config: OnnxRuntimeStaticInt8Config) -> list[tuple[str, str]]:
        return self.quantizable_nodes(export_onnx(ctx, config))

    def build(self, ctx: BuildContext, config: OnnxRuntimeStaticInt8Config) -> OnnxCandidate:
        return OnnxCandidate(quantize_static_int8(ctx, config), ctx.num_threads)


def static_quantizable_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    """Return ``(name, op_type)`` of the nodes ``quantize_static`` may quantize in ``onnx_path``."""
    return graph_nodes(onnx_path, _static_op_types())


def quantize_static_int8(ctx: BuildContext, config: OnnxRuntimeStaticInt8Config) -> Path:
    """Export the model and quantize it with ``quantize_static``; return the int8 file (in ``ctx.workdir``).

    Calibration ranges are cached per machine (see the module docstring).

    Raises:
        ConfigError: when ``nodes_to_exclude`` names nodes that are not quantizable.
        RuntimeError: when ONNX Runtime's quantizer fails, with the config.
    """
    check_sample_count(ctx.task, config.calibration_samples)
    fp32 = export_onnx(ctx, config)
    quantizable = static_quantizable_nodes(fp32)
    check_nodes_to_exclude(
        config.nodes_to_exclude,
        quantizable,
        f"task '{ctx.task.name}' exported with '{config.exporter}' at opset {config.opset}",
    )
    cached_ranges = _cached_ranges_path(ctx, fp32, config)
    # On a miss ORT writes the ranges to a scratch file named like the cache entry, so a workdir
    # shared by builds with other calibration settings never hands ORT stale ranges.
    ranges = cached_ranges if cached_ranges.is_file() else ctx.workdir / f"calibration-{cached_ranges.name}"
    output = ctx.workdir / "model_int8.onnx"
    excluded = excluded_nodes(fp32, quantizable, config.nodes_to_exclude)
    try:
        source = quantizer_input(fp32, ctx.workdir)
        if config.quant_format == "qoperator":
            source = unshare_biases(source, ctx.workdir)
        _run_quantize_static(ctx, source, output, ranges, excluded, config)
    finally:  # the ranges are good even when quantizing then failed: keep them for the next build
        if ranges != cached_ranges and ranges.is_file():

            def copy_ranges(tmp: Path) -> None:
                shutil.copyfile(ranges, tmp)

            cached_file(cached_ranges, copy_ranges)
    return output


def _calibration_options(config: OnnxRuntimeStaticInt8Config) -> dict[str, Any]:
    """The ``extra_options`` the calibration ranges depend on."""
    options: dict[str, Any] = dict(CALIBRATION_OPTIONS)
    if config.calibration_method == "percentile":
        options["CalibPercentile"] = PERCENTILE
    return options


def _extra_options(config: OnnxRuntimeStaticInt8Config) -> dict[str, Any]:
    extra_options = _calibration_options(config)
    if config.calibration_method == "distribution":
        extra_options["ActivationSymmetric"] = True  # see the module docstring
    if config.qdq_target == "tensorrt":
        extra_options.update(TENSORRT_QDQ_OPTIONS)
    return extra_options


def _cached_ranges_path(ctx: BuildContext, fp32: Path, config: OnnxRuntimeStaticInt8Config) -> Path:
    """Where the calibration ranges of ``config`` on the export ``fp32`` are cached on this machine."""
    # The exported file's name keys the task and its weights; the calibration split is taken
    # to be fixed for them (it is read only on a cache miss).
    key = cache_key(options=_calibration_options(config), calibration_size=ctx.task.calibration_size)
    return ctx.cache_dir / "calibration" / (
        f"{fp32.stem}-{config.calibration_method}-{config.calibration_samples}-{key}.json"
    )


def _run_quantize_static(
    ctx: BuildContext, fp32: Path, output: Path, ranges: Path, excluded: list[str], config: OnnxRuntimeStaticInt8Config
) -> None:
    """Run ``quantize_static`` on ``fp32`` into ``output``, reading or writing the ranges at ``ranges``,
    leaving the ``excluded`` nodes in float."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }[config.calibration_method]
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    reader = CalibrationReader(ctx.task.calibration_batches(config.calibration_samples), config.calibration_samples)
    with quiet():
        try:
            quantize_static(
                str(fp32),
                str(output),
                calibration_data_reader=reader,
                quant_format=formats[config.quant_format],
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=types[config.activation_type],
                weight_type=types[config.weight_type],
                nodes_to_exclude=excluded,
                calibrate_method=method,
                extra_options=_extra_options(config),
                calibration_cache_path=str(ranges),
            )
        except Exception as exc:
            raise RuntimeError(
                f"ONNX Runtime static quantization of task '{ctx.task.name}' failed with "
                f"{config.model_dump()}: {type(exc).__name__}: {exc}"
            ) from exc


def _static_op_types() -> set[str]:
    # quantize_static's default: every op type either of ORT's static quantizers handles.
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


class CalibrationReader:
    """ORT's ``CalibrationDataReader`` protocol over the task's first ``n`` calibration samples.

    ORT recognises any object with ``get_next``. Batches are re-split into equal sizes because
    ORT's histogram calibrators (entropy, percentile, distribution) stack them. ``__len__`` and
    ``set_range`` let ORT collect one batch at a time (``CalibStridedMinMax``, see
    :data:`CALIBRATION_OPTIONS`).
    """

    def __init__(self, batches: Iterable[Batch], n: int) -> None:
        self._batches = list(_even_batches(batches, n))
        self._pending = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._pending, None)


def _even_batches(batches: Iterable[Batch], n: int) -> Iterator[Batch]:
    """Re-split ``n`` samples arriving in any batch sizes into batches of one equal size."""
    size = max(d for d in range(1, min(n, MAX_CALIBRATION_BATCH) + 1) if n % d == 0)
    pending: list[Batch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(next(iter(batch.values())))
        while held >= size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: np.ascontiguousarray(v[:size]) for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            held -= size
            pending = [rest] if held else []
