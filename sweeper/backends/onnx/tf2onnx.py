"""Keras models to ONNX through tf2onnx: the ``tf2onnx`` exporter of the ONNX backends.

A task whose ``build_model`` returns a Keras model (Keras 3 on TensorFlow, i.e. ``tf.keras``) is
exported with ``exporter: tf2onnx``; from then on every ONNX Runtime backend runs it like a
PyTorch export (the same cache, validation, simplification and quantization). TensorFlow and
tf2onnx are the optional ``[tensorflow]`` extra: nothing here imports them before it is used.

Inputs are fed in the task's layout (for a Keras CNN, usually channels last); the export keeps
the task's input names and renames the model's output to the task's output name, with a dynamic
batch axis named ``batch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.backends import Candidate
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import onnx

# What a missing package is installed with; both are in the ``[tensorflow]`` extra.
_PACKAGES = {"tensorflow": "tensorflow-cpu", "tf2onnx": "tf2onnx"}


def tf2onnx_unavailable_reason() -> str | None:
    """Why Keras models cannot be exported here (a missing package), or ``None``."""
    import importlib.util

    for module in _PACKAGES:
        if importlib.util.find_spec(module) is None:
            return (
                f"the '{module}' package is not installed (pip install 'sweeper[tensorflow]', "
                f"which brings {', '.join(_PACKAGES.values())})"
            )
    return None


def tf2onnx_versions() -> dict[str, str]:
    """The versions of the packages a tf2onnx export depends on (part of the export's cache key)."""
    import importlib.metadata

    versions = {}
    for module, package in _PACKAGES.items():
        # tensorflow-cpu installs the 'tensorflow' module under another distribution name.
        for distribution in dict.fromkeys((module, package)):
            try:
                versions[module] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                versions[module] = "not installed"
    return versions


def keras_outputs(model: Any, task: Task, batch: Batch) -> np.ndarray:
    """Run the Keras model in inference mode on ``batch``; return its first output as numpy."""
    inputs = [np.ascontiguousarray(batch[name]) for name in task.input_names]
    output = model(inputs[0] if len(inputs) == 1 else inputs, training=False)
    if isinstance(output, tuple | list):
        output = output[0]
    return np.asarray(output)


def export_keras(model: Any, task: Task, opset: int, path: Path) -> None:
    """Export a Keras model with tf2onnx to ``path`` with the task's names and dynamic axes.

    Raises:
        ImportError: when TensorFlow or tf2onnx is missing (the message says how to install them).
    """
    reason = tf2onnx_unavailable_reason()
    if reason is not None:
        raise ImportError(reason)
    import tensorflow as tf
    import tf2onnx

    example = task.example_inputs(1)
    dynamic = task.dynamic_axes
    signature = tuple(
        tf.TensorSpec(
            [
                None if axis in dynamic.get(name, {}) or axis == 0 else size
                for axis, size in enumerate(example[name].shape)
            ],
            tf.as_dtype(example[name].dtype),
            name=name,
        )
        for name in task.input_names
    )
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    _name_like_the_task(proto, task)
    import onnx

    onnx.save(proto, str(path))


def _name_like_the_task(proto: onnx.ModelProto, task: Task) -> None:
    """Rename the graph's outputs to the task's output names and name dynamic axes as the task does."""
    graph = proto.graph
    renames = {out.name: new for out, new in zip(graph.output, task.output_names, strict=False) if out.name != new}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in graph.output:
        value.name = renames.get(value.name, value.name)
    dynamic = task.dynamic_axes
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, label in dynamic.get(value.name, {}).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = label


class KerasCandidate(Candidate):
    """A Keras model run by Keras itself (TensorFlow): the FP32 baseline of a Keras task.

    Its artifact is the model in Keras' own format (``model.keras``).
    """

    def __init__(self, model: Any, task: Task) -> None:
        self.model = model
        self.task = task

    def predict(self, batch: Batch) -> np.ndarray:
        return np.asarray(keras_outputs(self.model, self.task, batch), dtype=np.float32)

    def _write(self, directory: Path) -> Path:
        path = directory / "model.keras"
        self.model.save(path)
        return path


def keras_weights_bytes(model: Any) -> int:
    """Bytes of a Keras model's weights (the FP32 size every candidate is compared with)."""
    return int(sum(np.asarray(w).nbytes for w in model.get_weights()))
