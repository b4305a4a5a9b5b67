"""Keras models through tf2onnx into the ONNX Runtime backends.

The tests that export need TensorFlow and tf2onnx (the ``[tensorflow]`` extra) and skip without
them; the others check the parts that must work without TensorFlow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sweeper.backends import BuildContext, get_backend, is_keras_model
from sweeper.backends.onnx.config import OnnxExportError
from sweeper.backends.onnx.tf2onnx import tf2onnx_unavailable_reason
from sweeper.task import load_task

ROOT = Path(__file__).resolve().parents[2]
KERAS_TASK = ROOT / "tests" / "fixtures" / "tasks" / "digits_keras.py"
HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tf2onnx") is not None
needs_tf = pytest.mark.skipif(
    not HAS_TF, reason=f"TensorFlow/tf2onnx are not installed: {tf2onnx_unavailable_reason()}"
)


def _ctx(model: object, task: object, tmp_path: Path, cache: Path) -> BuildContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return BuildContext(model=model, task=task, workdir=workdir, cache_dir=cache, num_threads=1)  # type: ignore[arg-type]


def test_a_torch_model_is_not_taken_for_keras() -> None:
    from torch import nn

    assert not is_keras_model(nn.Linear(2, 2))
    assert not is_keras_model(object())


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed here")
def test_without_tensorflow_the_reason_names_the_extra() -> None:
    reason = tf2onnx_unavailable_reason()
    assert reason is not None and "sweeper[tensorflow]" in reason


def test_the_tf2onnx_exporter_refuses_a_torch_model(digits_task_path: Path, tmp_path: Path) -> None:
    task = load_task(str(digits_task_path))
    backend = get_backend("onnxruntime_fp32")
    ctx = _ctx(task.build_model(), task, tmp_path, tmp_path)
    with pytest.raises(OnnxExportError, match="is a PyTorch model; use exporter 'torchscript' or 'dynamo'"):
        backend.build(ctx, backend.Config(exporter="tf2onnx", opset=17))


# --- with TensorFlow ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    pytest.importorskip("tensorflow", reason="the [tensorflow] extra is not installed")
    pytest.importorskip("tf2onnx", reason="the [tensorflow] extra is not installed")
    task = load_task(str(KERAS_TASK))
    return task, task.build_model(), tmp_path_factory.mktemp("tf2onnx-cache")


def _agreement(candidate: object, task: object, model: object) -> tuple[float, float]:
    from sweeper.backends.onnx.tf2onnx import keras_outputs

    batches = [batch for batch, _ in task.eval_batches()]  # type: ignore[attr-defined]
    expected = np.concatenate([keras_outputs(model, task, b) for b in batches])  # type: ignore[arg-type]
    actual = np.concatenate([candidate.predict(b) for b in batches])  # type: ignore[attr-defined]
    return float(np.mean(actual.argmax(-1) == expected.argmax(-1)) * 100), float(np.abs(actual - expected).max())


@needs_tf
def test_a_keras_model_runs_on_onnxruntime_fp32(keras_setup: tuple, tmp_path: Path) -> None:
    import onnx

    task, model, cache = keras_setup
    assert is_keras_model(model)
    backend = get_backend("onnxruntime_fp32")
    candidate = backend.build(_ctx(model, task, tmp_path, cache), backend.Config(exporter="tf2onnx", opset=17))
    graph = onnx.load(str(candidate.save(tmp_path / "artifact"))).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    agreement, error = _agreement(candidate, task, model)
    assert agreement == 100.0 and error < 1e-3
    assert candidate.predict(task.example_inputs(7)).shape == (7, 10)


@needs_tf
@pytest.mark.parametrize(("name", "values", "min_agreement"), [
    ("onnxruntime_static_int8", {"per_channel": True}, 97.0),
    ("onnxruntime_fp16", {"simplify": "onnxslim"}, 99.0),
])  # fmt: skip
def test_a_keras_model_goes_through_the_other_onnx_backends(
    keras_setup: tuple, tmp_path: Path, name: str, values: dict, min_agreement: float
) -> None:
    task, model, cache = keras_setup
    backend = get_backend(name)
    candidate = backend.build(_ctx(model, task, tmp_path, cache), backend.Config(exporter="tf2onnx", **values))
    agreement, _ = _agreement(candidate, task, model)
    assert agreement >= min_agreement


@needs_tf
def test_a_torch_exporter_refuses_a_keras_model(keras_setup: tuple, tmp_path: Path) -> None:
    task, model, cache = keras_setup
    backend = get_backend("onnxruntime_fp32")
    with pytest.raises(OnnxExportError, match="is a Keras model; use exporter 'tf2onnx'"):
        backend.build(_ctx(model, task, tmp_path, cache), backend.Config(exporter="torchscript"))
