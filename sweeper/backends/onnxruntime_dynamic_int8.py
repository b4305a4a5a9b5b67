"""ONNX Runtime dynamic int8: weights quantized offline, activations quantized at run time.

ORT's dynamic quantizer handles MatMul (Gemm after pre-processing), Attention, LSTM, Gather,
Transpose, EmbedLayerNormalization and Conv. Conv becomes ``ConvInteger``: on ORT 1.32's CPU
provider it runs with both int8 and uint8 weights, but it is slower than the FP32 Conv it replaces
(about 2x-4x on the digits CNN), which is why ORT recommends static quantization for CNNs. So
Conv is left in float unless ``quantize_conv`` is set. GRU has no dynamic quantizer in ORT; a GRU
model gains only from its MatMul/Gemm layers.

ORT's dynamic quantizer first rewrites each Gemm ``X`` as a MatMul named ``X_MatMul`` (plus an
Add). Node names here are those of the exported model, so excluding Gemm ``X`` also excludes
``X_MatMul``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

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
)


class OnnxRuntimeDynamicInt8Config(OnnxExportConfig):
    """Settings of ONNX Runtime dynamic quantization.

    Attributes:
        weight_type: integer type of the weights.
        per_channel: one weight scale per output channel instead of per tensor.
        reduce_range: quantize weights to 7 bits (helps CPUs without VNNI avoid saturation).
        quantize_conv: also quantize Conv nodes (to ``ConvInteger``, usually slower on CPU).
        nodes_to_exclude: ONNX node names to leave in float (see
            :meth:`OnnxRuntimeDynamicInt8.quantizable_nodes`); a layer's weight node stands for
            its whole exclusion unit (:mod:`sweeper.backends.onnx.layers`).
    """

    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    quantize_conv: bool = False
    nodes_to_exclude: tuple[str, ...] = ()


class OnnxRuntimeDynamicInt8(OrtBackend[OnnxRuntimeDynamicInt8Config]):
    """ONNX Runtime dynamic int8 quantization (``quantize_dynamic``) of the exported model."""

    name: ClassVar[str] = "onnxruntime_dynamic_int8"
    Config: type[OnnxRuntimeDynamicInt8Config] = OnnxRuntimeDynamicInt8Config
    # Measured: 100% top-1 agreement on digits (360 samples) with int8 and uint8 weights, with
    # and without Conv.
    # The margin allows for CPUs without VNNI, where uint8 x int8 products can saturate.
    min_agreement_pct: ClassVar[float] = 97.0


    def quantizable_nodes(self, onnx_path: Path, *, quantize_conv: bool = False) -> list[tuple[str, str]]:
        """Return ``(name, op_type)`` of the nodes ``quantize_dynamic`` may quantize in ``onnx_path``.

        Gemm nodes are included: the quantizer turns them into MatMul first.
        """
        return graph_nodes(onnx_path, _op_types(quantize_conv) | {"Gemm"})

    exclusion_field: ClassVar[str] = "nodes_to_exclude"

    def quantizable_layers(self, ctx: BuildContext, config: OnnxRuntimeDynamicInt8Config) -> list[tuple[str, str]]:
        return self.quantizable_nodes(export_onnx(ctx, config), quantize_conv=config.quantize_conv)

    def build(self, ctx: BuildContext, config: OnnxRuntimeDynamicInt8Config) -> OnnxCandidate:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = export_onnx(ctx, config)
        quantizable = self.quantizable_nodes(fp32, quantize_conv=config.quantize_conv)
        check_nodes_to_exclude(
            config.nodes_to_exclude,
            quantizable,
            f"task '{ctx.task.name}' exported with '{config.exporter}' at opset {config.opset}",
        )
        gemms = {name for name, op in quantizable if op == "Gemm"}
        excluded = excluded_nodes(fp32, quantizable, config.nodes_to_exclude)
        excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
        output = ctx.workdir / "model_dynamic_int8.onnx"
        with quiet():
            try:
                quantize_dynamic(
                    str(quantizer_input(fp32, ctx.workdir)),
                    str(output),
                    op_types_to_quantize=sorted(_op_types(config.quantize_conv)),
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=excluded,
                )
            except Exception as exc:
                raise RuntimeError(
                    f"ONNX Runtime dynamic quantization of task '{ctx.task.name}' failed with "
                    f"{config.model_dump()}: {type(exc).__name__}: {exc}"
                ) from exc
        return OnnxCandidate(output, ctx.num_threads)



def _op_types(quantize_conv: bool) -> set[str]:
    """The op types handed to ``quantize_dynamic``: ORT's dynamic ones, Conv only if asked."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return {op for op in IntegerOpsRegistry if op != "Conv" or quantize_conv}
