"""A bias initializer shared between a Gemm and another node (as exporters merge equal tensors:
BERT-base's pooler and its embedding LayerNorm) must not break ORT's QOperator quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _shared_bias_model(path: Path) -> Path:
    """x -> MatMul(W1) -> Add(B) -> Gemm(W3, B) -> Gemm(W2, B2) -> y: B is read by an Add (which
    QOperator quantizes as an activation) and as a Gemm's bias, as in BERT-base's export."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "W2")
    b2 = numpy_helper.from_array(np.zeros(4, np.float32), "B2")
    w3 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "W3")
    shared = numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "B")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="matmul"),
        helper.make_node("Add", ["h", "B"], ["a"], name="add"),
        helper.make_node("Gemm", ["a", "W3", "B"], ["g"], name="gemm1"),
        helper.make_node("Gemm", ["g", "W2", "B2"], ["y"], name="gemm2"),
    ]
    graph = helper.make_graph(
        nodes, "shared_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w1, w2, w3, shared, b2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


class _Reader:
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self._items = iter([{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def _quantize_qoperator(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(str(source), str(target), _Reader(), quant_format=QuantFormat.QOperator)


def test_a_shared_bias_gets_a_copy_and_the_qoperator_model_loads(tmp_path: Path) -> None:
    from sweeper.backends.onnx.runtime import DISABLED_OPTIMIZERS, unshare_biases

    fp32 = _shared_bias_model(tmp_path / "model.onnx")
    _quantize_qoperator(fp32, tmp_path / "as_exported.onnx")
    with pytest.raises(Exception, match="INVALID_GRAPH|Type Error"):
        ort.InferenceSession(str(tmp_path / "as_exported.onnx"), providers=["CPUExecutionProvider"])

    fixed = unshare_biases(fp32, tmp_path)
    assert fixed != fp32
    graph = onnx.load(str(fixed)).graph
    biases = {node.name: node.input[2] for node in graph.node if node.op_type == "Gemm"}
    add = next(node for node in graph.node if node.name == "add")
    assert biases["gemm1"] != "B" and add.input[1] == "B", "the Gemm gets the copy, the Add keeps B"
    assert biases["gemm2"] == "B2", "a bias read once is left alone"

    _quantize_qoperator(fixed, tmp_path / "int8.onnx")
    x = np.random.default_rng(2).normal(0, 1, (32, 16)).astype(np.float32)
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    session = ort.InferenceSession(
        str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )
    assert any(node.op_type == "QGemm" for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node)
    got = session.run(None, {"x": x})[0]
    error = float(np.sum((got - want) ** 2) / np.sum(want**2))
    assert error < 0.02, f"normalised output error {error:.4f} of the int8 model against FP32"


def test_a_model_without_shared_biases_is_handed_on_as_it_is(tmp_path: Path) -> None:
    from sweeper.backends.onnx.runtime import unshare_biases

    fp32 = _shared_bias_model(tmp_path / "model.onnx")
    model = onnx.load(str(fp32))
    next(n for n in model.graph.node if n.name == "add").input[1] = "B2x"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(16, np.float32), "B2x"))
    onnx.save(model, str(fp32))
    assert unshare_biases(fp32, tmp_path) == fp32
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
