"""ONNX Runtime FP16: the exported model converted to float16, with float32 inputs and outputs.

The conversion is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16(
keep_io_types=True)`` (onnxconverter-common's, from which it descends, where ORT's is missing;
onnxconverter-common 1.16 breaks transformer exports whose shape-inferred ``value_info`` names a
graph output, e.g. MiniLM, whose ``logits`` it retypes to float16):
initializers and activations become float16, and Cast nodes at the graph's edges keep the
interface float32, so callers pass float32 as for every other backend.

It runs on ORT's CPU provider (hardware ``cpu``), which has float16 kernels for few ops: ORT
inserts Casts around the others and its graph optimizer then folds them, so on the digits CNN
(ORT 1.32) the whole graph runs in float32 with float16-rounded weights: as fast as FP32, half
the artifact size, FP16's rounding in the outputs. On a CPU it is worth searching where the
artifact's size matters; its main use is as the input of a GPU engine (the ``tensorrt``
backend's FP16 precision builds from the same conversion). Running it on ORT's CUDA provider
would need the ``onnxruntime-gpu`` wheel, which replaces ``onnxruntime`` rather than installing
beside it, so it is not offered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sweeper.backends import BuildContext
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import OrtBackend, export_onnx
from sweeper.backends.onnx.runtime import OnnxCandidate, check_nodes_to_exclude, quiet
from sweeper.location import cache_key, cached_file

if TYPE_CHECKING:
    import onnx


class OnnxRuntimeFP16Config(OnnxExportConfig):
    """Settings of the float16 conversion.

    Attributes:
        nodes_to_exclude: ONNX node names to keep in float32 (see :func:`convertible_nodes`).
    """

    nodes_to_exclude: tuple[str, ...] = ()


class OnnxRuntimeFP16(OrtBackend[OnnxRuntimeFP16Config]):
    """Export to ONNX, convert to float16 (float32 at the edges), run with ONNX Runtime."""

    name: ClassVar[str] = "onnxruntime_fp16"
    Config: type[OnnxRuntimeFP16Config] = OnnxRuntimeFP16Config
    # Measured on ORT 1.32's CPU provider: 100% top-1 agreement on digits (360 samples), max
    # |logit error| 6e-3 (also 100% with the last Gemm kept in float32). The margin allows for
    # near-ties on other models and CPUs.
    min_agreement_pct: ClassVar[float] = 99.0


    exclusion_field: ClassVar[str] = "nodes_to_exclude"

    def quantizable_layers(self, ctx: BuildContext, config: OnnxRuntimeFP16Config) -> list[tuple[str, str]]:
        """The nodes the conversion turns to float16 (every node of the export): what
        ``nodes_to_exclude`` may keep in float32."""
        return convertible_nodes(export_onnx(ctx, config))

    def build(self, ctx: BuildContext, config: OnnxRuntimeFP16Config) -> OnnxCandidate:
        return OnnxCandidate(float16_model(ctx, config, config.nodes_to_exclude), ctx.num_threads)



def convertible_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    """Return ``(name, op_type)`` of every node of the FP32 export ``onnx_path``."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [(node.name, node.op_type) for node in graph.node]


def float16_model(ctx: BuildContext, export: OnnxExportConfig, nodes_to_exclude: tuple[str, ...]) -> Path:
    """Export the model and return its float16 conversion (float32 inputs and outputs).

    The conversion is cached beside the export, keyed by the export and the excluded nodes.

    Raises:
        ConfigError: when ``nodes_to_exclude`` names nodes the export does not have.
    """
    fp32 = export_onnx(ctx, export)
    check_nodes_to_exclude(
        nodes_to_exclude,
        convertible_nodes(fp32),
        f"task '{ctx.task.name}' exported with '{export.exporter}' at opset {export.opset}",
    )
    key = cache_key(nodes_to_exclude=sorted(nodes_to_exclude), converter=_converter_version())
    target = ctx.cache_dir / "onnx" / f"{fp32.stem}-fp16-{key}.onnx"
    return cached_file(target, lambda tmp: convert_to_float16(fp32, tmp, nodes_to_exclude))


def convert_to_float16(source: Path, target: Path, nodes_to_exclude: tuple[str, ...] = ()) -> None:
    """Write ``source`` converted to float16, keeping float32 inputs and outputs, to ``target``."""
    import onnx

    convert = _converter()
    model = onnx.load(str(source))
    _separate_excluded_outputs(model, nodes_to_exclude)
    with quiet():  # the converter warns about every weight it clamps to float16's range
        converted = convert(model, keep_io_types=True, node_block_list=list(nodes_to_exclude))
    _sort_topologically(converted)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(target))


def _sort_topologically(model: onnx.ModelProto) -> None:
    """Order the nodes so each comes after its inputs' producers (ORT's converter appends the
    input Casts at the end, which ``onnx.checker`` refuses)."""
    try:
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError:  # onnxconverter-common's converter keeps the order
        return
    OnnxModel(model).topological_sort()


def _separate_excluded_outputs(model: onnx.ModelProto, nodes_to_exclude: tuple[str, ...]) -> None:
    """Put an Identity between each excluded node and the graph output it produces.

    onnxconverter-common 1.16 with ``keep_io_types=True`` fails ("The downstream node of the second
    cast node should be graph output") when a node kept in float32 writes a graph output.
    """
    import onnx

    outputs = {value.name for value in model.graph.output}
    nodes: list[onnx.NodeProto] = []
    for original in model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        nodes.append(node)
        if node.name not in nodes_to_exclude:
            continue
        for index, name in enumerate(node.output):
            if name in outputs:
                node.output[index] = f"{name}/float32"
                to_output = f"{node.name}/to_output"
                nodes.append(onnx.helper.make_node("Identity", [node.output[index]], [name], name=to_output))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _converter() -> Callable[..., Any]:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        from onnxconverter_common.float16 import convert_float_to_float16
    return convert_float_to_float16


def _converter_version() -> str:
    import importlib.metadata

    try:
        import onnxruntime.transformers.float16  # noqa: F401 - only its presence matters here

        return f"onnxruntime {importlib.metadata.version('onnxruntime')}"
    except ImportError:
        return f"onnxconverter-common {importlib.metadata.version('onnxconverter-common')}"
