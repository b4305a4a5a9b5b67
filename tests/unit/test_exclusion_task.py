"""segment_mlp: the task on which full static INT8 breaks the budget and excluding one node mends it.

The trained weights come from the default cache (trained once, about 15 s on one thread); the
ONNX export and calibration go to a temporary folder, so the INT8 figures are rebuilt each run.

Measured (torch 2.14.1, onnxruntime 1.32, this repo's backend): FP32 96.97 % on the 660 evaluation
samples; full static INT8 (QDQ) 76.7-80.5 %, a drop of 16.5-20.3 points whatever the calibration
method (minmax, entropy, percentile, distribution), per-channel, int8 activations or reduce_range;
with ``/input_norm/BatchNormalization`` excluded the drop is -0.3 to +0.3 points.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.array_task import ArrayClassificationTask
from sweeper.backends import BuildContext, get_backend
from sweeper.task import load_task

ROOT = Path(__file__).resolve().parents[2]
TASK_FILE = ROOT / "tasks" / "segment_mlp.py"
SIZES = {"train": 1320, "calibration": 330, "evaluation": 660}
NUM_FEATURES, NUM_CLASSES = 18, 7
# Measured 96.97 %; the margin absorbs a retrain on another machine.
MIN_ACCURACY_PCT = 94.0
# The accuracy budget (points of top-1, absolute) the exclusion search is meant to meet here.
BUDGET_PCT = 1.0
# The node whose input is the raw feature vector; quantizing it per tensor crushes the small-scale
# features (see the task's docstring).
SENSITIVE_NODES = ("/input_norm/BatchNormalization",)


@cache
def _task() -> ArrayClassificationTask:
    task = load_task(str(TASK_FILE))
    assert isinstance(task, ArrayClassificationTask)
    return task


@cache
def _model() -> torch.nn.Module:
    return _task().build_model()


def _accuracy(predict: Callable[[dict[str, np.ndarray]], np.ndarray]) -> float:
    correct = total = 0
    for batch, labels in _task().eval_batches():
        correct += int(np.sum(np.argmax(predict(batch), axis=-1) == labels))
        total += len(labels)
    return 100.0 * correct / total


def _fp32(batch: dict[str, np.ndarray]) -> np.ndarray:
    model = _model()  # outside inference mode: on a cold cache this trains
    with torch.inference_mode():
        return model(torch.from_numpy(batch["input"])).numpy()


@cache
def _fp32_accuracy() -> float:
    return _accuracy(_fp32)


def test_splits_are_disjoint_and_sized() -> None:
    splits = _task().splits
    assert splits.sizes() == SIZES
    named = list(splits.named().values())
    for i, a in enumerate(named):
        for b in named[i + 1 :]:
            assert not np.intersect1d(a.ids, b.ids).size
    for split in named:
        assert split.inputs.shape[1:] == (NUM_FEATURES,) and split.inputs.dtype == np.float32
        assert set(np.unique(split.labels)) == set(range(NUM_CLASSES))


def test_inputs_are_raw_features_on_very_different_scales() -> None:
    inputs = _task().splits.train.inputs
    spans = inputs.max(axis=0) - inputs.min(axis=0)
    assert spans.max() > 300 and spans.min() < 1.0


def test_model_shapes_and_fp32_accuracy() -> None:
    batch = _task().example_inputs(3)
    assert batch["input"].shape == (3, NUM_FEATURES)
    assert _fp32(batch).shape == (3, NUM_CLASSES)
    assert _fp32_accuracy() >= MIN_ACCURACY_PCT


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_full_int8_breaks_the_budget_and_excluding_the_input_norm_mends_it(
    per_channel: bool, tmp_path: Path
) -> None:
    from sweeper.backends.onnx.export import export_onnx

    backend = get_backend("onnxruntime_static_int8")

    def int8_drop(nodes_to_exclude: tuple[str, ...]) -> float:
        config = backend.Config(per_channel=per_channel, nodes_to_exclude=nodes_to_exclude)
        with tempfile.TemporaryDirectory(dir=tmp_path) as workdir:
            ctx = BuildContext(
                model=_model(), task=_task(), workdir=Path(workdir), cache_dir=tmp_path, num_threads=1
            )
            candidate = backend.build(ctx, config)
        return _fp32_accuracy() - _accuracy(candidate.predict)

    ctx = BuildContext(model=_model(), task=_task(), workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    quantizable = dict(backend.quantizable_nodes(export_onnx(ctx, opset=17, exporter="torchscript")))
    assert {quantizable[name] for name in SENSITIVE_NODES} == {"BatchNormalization"}

    assert int8_drop(()) > BUDGET_PCT
    assert int8_drop(SENSITIVE_NODES) <= BUDGET_PCT
