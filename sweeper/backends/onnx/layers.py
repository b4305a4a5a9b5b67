"""Exclusion units of an ONNX graph: a layer with weights and the nodes that belong to it.

ONNX Runtime's quantizers take node names to leave in float, and a graph has many more nodes than
a person has layers: EfficientNet-Lite0's export holds 49 Conv and 1 Gemm, but also 33 Clip
(ReLU6), 9 residual Add, a GlobalAveragePool and a Reshape, all of which ORT quantizes. Leaving a
Conv in float while its ReLU6 stays quantized keeps most of the quantization error on its output,
so the unit a person leaves in float is the compute layer with weights (Conv, ConvTranspose, Gemm,
MatMul with a constant operand, LSTM/GRU/RNN, Attention, an embedding Gather, a normalisation
layer standing on its own) together with what belongs to it:

- the Q/DQ nodes of its weights (in an already QDQ model);
- a bias Add (``MatMul`` + ``Add`` of a constant, as exporters write ``nn.Linear`` on 3-D input)
  and a BatchNormalization that was not folded into it;
- its activation: one of :data:`ACTIVATIONS`, or swish written as ``x * Sigmoid(x)``;
- the Q/DQ pair on its output.

A unit is named by its weight node, so the names in a config, a trial row's ``excluded_layers``
and a sensitivity table are node names the exporter chose (``/_blocks.14/_depthwise_conv/Conv``),
and a backend expands each to the unit's members when it builds (:func:`expand_units`). Nodes
that belong to no unit (residual Add, pooling, Reshape) are not exclusion units.

:func:`module_path` maps a TorchScript exporter node name back to the PyTorch module path
(``_blocks.14._depthwise_conv``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

from sweeper.backends import LayerUnit

if TYPE_CHECKING:
    import onnx

# Op type -> positions of the inputs that hold its weights; a node is a layer when one of them is
# a constant (see _Graph.is_constant).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1, 0),
    "MatMul": (1, 0),
    "LSTM": (1,),
    "GRU": (1,),
    "RNN": (1,),
    "Attention": (1,),  # com.microsoft Attention: the packed QKV projection
    "Gather": (0,),  # an embedding table
    "EmbedLayerNormalization": (2,),
    "BatchNormalization": (1,),
    "InstanceNormalization": (1,),
    "LayerNormalization": (1,),
}
# Layers that only follow another layer: a BatchNormalization after a Conv belongs to the Conv.
NORMALIZATIONS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization"})
ACTIVATIONS = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Gelu", "FastGelu", "Softplus", "Mish", "ThresholdedRelu",
})  # fmt: skip
# Nodes through which a constant stays a constant (a weight behind its Q/DQ pair, transposed).
_CONSTANT_PASS = frozenset({"DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Cast", "Identity",
                            "Squeeze", "Unsqueeze"})  # fmt: skip


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        self.constants |= {out for n in self.nodes if n.op_type == "Constant" for out in n.output}
        self.outputs = {o.name for o in graph.output}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for name in dict.fromkeys(n.input):
                self.consumers.setdefault(name, []).append(n)

    def is_constant(self, tensor: str, depth: int = 0) -> bool:
        if tensor in self.constants:
            return True
        node = self.producer.get(tensor)
        if node is None or node.op_type not in _CONSTANT_PASS or depth > 8 or not node.input:
            return False
        return self.is_constant(node.input[0], depth + 1)

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        found = self.consumers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in self.outputs else None

    def weight_chain(self, tensor: str) -> list[str]:
        """Names of the Q/DQ (and pass-through) nodes between a constant and a layer's input."""
        names: list[str] = []
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _CONSTANT_PASS and node.input and node.name:
            names.append(node.name)
            node = self.producer.get(node.input[0])
        return names


def is_layer(node: onnx.NodeProto, graph: _Graph) -> bool:
    """Whether ``node`` is a compute layer with weights."""
    inputs = WEIGHT_INPUTS.get(node.op_type, ())
    return any(i < len(node.input) and node.input[i] and graph.is_constant(node.input[i]) for i in inputs)


def layer_units(model: onnx.ModelProto, op_types: Collection[str]) -> list[LayerUnit]:
    """The exclusion units of ``model``, in graph order.

    Args:
        model: the FP32 model the backend quantizes.
        op_types: the op types the backend quantizes; a layer of another type is no unit.

    Every member belongs to one unit only, and unnamed nodes are never members (ORT excludes
    nodes by name).
    """
    graph = _Graph(model)
    claimed: set[str] = set()
    units: list[LayerUnit] = []
    for node in graph.nodes:
        if not node.name or node.name in claimed or node.op_type not in op_types or not is_layer(node, graph):
            continue
        members = [node.name]
        for i in WEIGHT_INPUTS[node.op_type]:
            if i < len(node.input) and graph.is_constant(node.input[i]):
                members += graph.weight_chain(node.input[i])
        members += _followers(graph, node, claimed | set(members))
        members = [m for m in dict.fromkeys(members) if m not in claimed]
        claimed.update(members)
        units.append(LayerUnit(name=node.name, op_type=node.op_type, members=tuple(members)))
    return units


def _followers(graph: _Graph, layer: onnx.NodeProto, taken: set[str]) -> list[str]:
    """The bias Add, folded-away normalisation, activation and output Q/DQ after ``layer``."""
    found: list[str] = []
    tail = layer.output[0] if layer.output else ""
    activated = False
    while tail:
        qdq = _qdq_pair(graph, tail, taken)
        if qdq:
            found += [n.name for n in qdq]
            tail = qdq[-1].output[0]
            continue
        if activated:
            break
        nxt = graph.only_consumer(tail)
        if nxt is not None and (not nxt.name or nxt.name in taken):
            break
        if nxt is not None and (_is_bias_add(graph, nxt, tail) or nxt.op_type in NORMALIZATIONS):
            found.append(nxt.name)
            tail = nxt.output[0]
            continue
        if nxt is not None and nxt.op_type in ACTIVATIONS:
            found.append(nxt.name)
            tail, activated = nxt.output[0], True
            continue
        swish = _swish(graph, tail, taken)
        if swish:
            found += [n.name for n in swish]
            tail, activated = swish[-1].output[0], True
            continue
        break
    return found


def _is_bias_add(graph: _Graph, node: onnx.NodeProto, tail: str) -> bool:
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    other = node.input[1] if node.input[0] == tail else node.input[0]
    return graph.is_constant(other)


def _qdq_pair(graph: _Graph, tail: str, taken: set[str]) -> list[onnx.NodeProto]:
    q = graph.only_consumer(tail)
    if q is None or q.op_type != "QuantizeLinear" or not q.name or q.name in taken:
        return []
    dq = graph.only_consumer(q.output[0])
    if dq is None or dq.op_type != "DequantizeLinear" or not dq.name or dq.name in taken:
        return []
    return [q, dq]


def _swish(graph: _Graph, tail: str, taken: set[str]) -> list[onnx.NodeProto]:
    """``x * Sigmoid(x)`` (SiLU as exporters write it) on ``tail``: [Sigmoid, Mul], or []."""
    users = graph.consumers.get(tail, [])
    if len(users) != 2 or tail in graph.outputs:
        return []
    sigmoid = next((n for n in users if n.op_type == "Sigmoid"), None)
    mul = next((n for n in users if n.op_type == "Mul"), None)
    if sigmoid is None or mul is None or graph.only_consumer(sigmoid.output[0]) is not mul:
        return []
    if {sigmoid.name, mul.name} & taken or not (sigmoid.name and mul.name):
        return []
    return [sigmoid, mul]


def expand_units(units: Iterable[LayerUnit], names: Iterable[str]) -> list[str]:
    """``names`` with each unit's name replaced by the unit's members (other names kept), no repeats."""
    members = {unit.name: unit.members or (unit.name,) for unit in units}
    return list(dict.fromkeys(member for name in names for member in members.get(name, (name,))))


_REPEAT = re.compile(r"_\d+$")


def module_path(node_name: str, modules: Collection[str] | None = None) -> str | None:
    """The PyTorch module path of a node named by the TorchScript exporter, or ``None``.

    The exporter names a node ``/<scope>/<scope>/<op>``, one scope per module call, where a child
    of a container repeats its parent's name (``/features/features.0/Conv`` is module
    ``features.0``) and a module called again gets a ``_<n>`` suffix (``/_blocks.1/_swish_1/Clip``
    is the second call of ``_blocks.1._swish``). ``/_blocks.14/_depthwise_conv/Conv`` is module
    ``_blocks.14._depthwise_conv``.

    Args:
        node_name: the ONNX node name.
        modules: the model's module paths (``dict(model.named_modules())``); when given, the
            result is the longest of them the name's scopes spell, or ``None``.
    """
    if not node_name.startswith("/"):
        return None
    scopes = node_name.strip("/").split("/")[:-1]
    if not scopes:
        return None
    parts: list[str] = []
    previous = ""
    for scope in scopes:
        if previous and scope.startswith(previous + "."):
            parts.append(scope[len(previous) + 1 :])
        else:
            parts.append(scope)
        previous = scope
    if modules is None:
        return ".".join(parts)
    # The longest prefix that is a module: a node ORT's pre-processing made (a fused
    # /side/MatMul/MatMulAddFusion) adds a scope of its own; a module called more than once
    # carries the exporter's _<n> suffix on its last scope.
    for end in range(len(parts), 0, -1):
        for last in dict.fromkeys((parts[end - 1], _REPEAT.sub("", parts[end - 1]))):
            path = ".".join([*parts[: end - 1], last])
            if path in modules:
                return path
    return None
