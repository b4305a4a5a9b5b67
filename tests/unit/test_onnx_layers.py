"""Exclusion units of ONNX graphs (sweeper.backends.onnx.layers) and the names they map back to."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from sweeper.backends.onnx.layers import expand_units, layer_units, module_path

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

STATIC_OPS = {"Conv", "Clip", "Relu", "Add", "Gemm", "MatMul", "GlobalAveragePool", "Flatten", "Reshape", "Mul",
              "Sigmoid", "BatchNormalization"}


class ConvBlocks(nn.Module):
    """Conv + ReLU6 (exported as Clip), a residual block, pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 8, 1)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        y = y + self.blocks(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _export(model: nn.Module, path: Path) -> onnx.ModelProto:
    with torch.no_grad():
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])  # fmt: skip
    return onnx.load(str(path))


def test_conv_and_relu6_are_one_unit_on_an_exported_graph(tmp_path: Path) -> None:
    model = ConvBlocks()
    graph = _export(model, tmp_path / "m.onnx")
    clips = [n.name for n in graph.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2, "ReLU6 exports as Clip"

    units = layer_units(graph, STATIC_OPS)
    assert [u.op_type for u in units] == ["Conv", "Conv", "Conv", "Gemm"]
    stem = units[0]
    assert stem.name == "/stem/Conv" and stem.members == ("/stem/Conv", "/act/Clip")
    depthwise = units[1]
    assert depthwise.members[0] == depthwise.name and depthwise.members[1] in clips
    # The residual Add, the pooling and the flatten belong to no unit; no node is in two units.
    members = [m for u in units for m in u.members]
    assert len(members) == len(set(members))
    orphans = {n.op_type for n in graph.graph.node if n.name not in members}
    assert {"Add", "GlobalAveragePool"} <= orphans and "Clip" not in orphans

    modules = {name for name, _ in model.named_modules()}
    assert [module_path(u.name, modules) for u in units] == ["stem", "blocks.0.0", "blocks.0.2", "fc"]


def test_units_follow_the_backend_op_types(tmp_path: Path) -> None:
    graph = _export(ConvBlocks(), tmp_path / "m.onnx")
    # ORT dynamic quantization without Conv: only the Gemm is a unit.
    assert [u.name for u in layer_units(graph, {"MatMul", "Gemm"})] == ["/fc/Gemm"]


def _graph(nodes: list[onnx.NodeProto], initializers: list[str], output: str) -> onnx.ModelProto:
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [4, 4], [0.1] * 16) for name in initializers]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    return helper.make_model(graph)


def test_matmul_with_bias_add_and_swish_is_one_unit() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="/proj/MatMul"),
        helper.make_node("Add", ["mm", "b"], ["biased"], name="/proj/Add"),
        helper.make_node("Sigmoid", ["biased"], ["sig"], name="/act/Sigmoid"),
        helper.make_node("Mul", ["biased", "sig"], ["swish"], name="/act/Mul"),
        helper.make_node("MatMul", ["swish", "swish_t"], ["scores"], name="/attn/MatMul"),  # two activations
        helper.make_node("Transpose", ["swish"], ["swish_t"], name="/attn/Transpose"),
        helper.make_node("Add", ["scores", "x"], ["y"], name="/residual/Add"),
    ]
    units = layer_units(_graph(nodes, ["w", "b"], "y"), {"MatMul", "Add", "Mul", "Sigmoid", "Transpose"})
    assert [(u.name, u.members) for u in units] == [
        ("/proj/MatMul", ("/proj/MatMul", "/proj/Add", "/act/Sigmoid", "/act/Mul")),
    ], "a MatMul of two activations is no layer"


def test_weight_qdq_and_output_qdq_belong_to_the_layer() -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="/w/Q"),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"], name="/w/DQ"),
        helper.make_node("Gemm", ["x", "wdq"], ["g"], name="/fc/Gemm"),
        helper.make_node("Relu", ["g"], ["r"], name="/fc/Relu"),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="/out/Q"),
        helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"], name="/out/DQ"),
    ]
    model = _graph(nodes, ["w"], "y")
    model.graph.initializer.extend([helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                                    helper.make_tensor("z", TensorProto.UINT8, [], [0])])  # fmt: skip
    (unit,) = layer_units(model, {"Gemm", "Relu"})
    assert unit.name == "/fc/Gemm"
    assert set(unit.members) == {"/fc/Gemm", "/w/DQ", "/w/Q", "/fc/Relu", "/out/Q", "/out/DQ"}


def test_expand_units_keeps_single_nodes_and_order() -> None:
    from sweeper.backends import LayerUnit

    units = [LayerUnit(name="a", op_type="Conv", members=("a", "a_relu")), LayerUnit(name="b", op_type="Gemm", members=("b",))]
    assert expand_units(units, ["b", "x", "a", "a_relu"]) == ["b", "x", "a", "a_relu"]
    assert expand_units(units, []) == []


@pytest.mark.parametrize(
    "name,modules,expected",
    [
        ("/_blocks.14/_depthwise_conv/Conv", None, "_blocks.14._depthwise_conv"),
        ("/features/features.0/Conv", None, "features.0"),
        ("/backbone/layer1/layer1.0/conv1/Conv", None, "backbone.layer1.0.conv1"),
        ("/encoder/layer.0/attention/self/query/MatMul", None, "encoder.layer.0.attention.self.query"),
        ("/_blocks.1/_swish_1/Clip", {"_blocks.1", "_blocks.1._swish"}, "_blocks.1._swish"),
        ("/side/MatMul/MatMulAddFusion", {"side"}, "side"),
        ("/Add", None, None),
        ("node_conv2d", None, None),
        ("/nowhere/Conv", {"fc"}, None),
    ],
)
def test_module_path(name: str, modules: set[str] | None, expected: str | None) -> None:
    assert module_path(name, modules) == expected
