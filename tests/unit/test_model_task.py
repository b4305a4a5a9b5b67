"""ModelTask: an already-trained torch model and its data as a task, from arrays, Datasets or DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sweeper import ModelTask
from sweeper.errors import TaskError

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=40)
MODEL = torch.nn.Linear(6, 3)


def _batches_equal(task: ModelTask, inputs: np.ndarray, labels: np.ndarray) -> None:
    got = list(task.eval_batches(16))
    assert [len(lab) for _, lab in got] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b, _ in got]), inputs)
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), labels)


def test_from_numpy_arrays() -> None:
    task = ModelTask("t", MODEL, calibration=X[:10], evaluation=(X, Y))
    assert task.name == "t" and task.input_names == ("input",) and task.calibration_size == 10
    _batches_equal(task, X, Y)
    assert [len(b["input"]) for b in task.calibration_batches(7, batch_size=3)] == [3, 3, 1]
    assert task.example_inputs(12)["input"].shape == (12, 6)  # repeats the 10 calibration samples
    assert not task.has_training_split
    with pytest.raises(TaskError, match="no training split"):
        task.train_batches()


def test_from_a_dataset_and_a_dataloader() -> None:
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    for data in (dataset, torch.utils.data.DataLoader(dataset, batch_size=7)):
        task = ModelTask("t", MODEL, calibration=data, evaluation=data, training=data)
        assert task.calibration_size == 40 and task.has_training_split
        _batches_equal(task, X, Y)
        epoch = list(task.train_batches(10, seed=1))
        assert sorted(np.concatenate([lab for _, lab in epoch]).tolist()) == sorted(Y.tolist())


def test_named_inputs_follow_the_given_order() -> None:
    inputs = {"mask": X[:, :2], "ids": X[:, 2:]}
    task = ModelTask("t", MODEL, calibration=inputs, evaluation=(inputs, Y), input_names=("ids", "mask"))
    assert task.input_names == ("ids", "mask")
    batch, _ = next(task.eval_batches(5))
    assert list(batch) == ["ids", "mask"] and batch["ids"].shape == (5, 4)


def test_a_custom_metric_and_its_direction() -> None:
    def mean_abs_error(outputs: np.ndarray, labels: np.ndarray) -> float:
        return float(np.abs(outputs[:, 0] - labels).mean())

    task = ModelTask("t", MODEL, calibration=X, evaluation=(X, Y), metric=mean_abs_error, higher_is_better=False)
    assert task.metric_name == "mean_abs_error" and task.higher_is_better is False
    assert task.metric(np.zeros((2, 3)), np.array([1.0, 3.0])) == 2.0


def test_the_model_is_a_copy_in_eval_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.5)).train()
    built = ModelTask("t", model, calibration=X, evaluation=(X, Y)).build_model()
    assert built is not model and not built.training and model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"evaluation": X}, "needs labels"),
        ({"evaluation": (X, Y[:5])}, "same number"),
        ({"evaluation": (X[:0], Y[:0])}, "at least one"),
        ({"calibration": {"a": X, "b": X[:3]}, "evaluation": ({"a": X, "b": X}, Y)}, "same number"),
        ({"calibration": {"a": X}, "evaluation": ({"b": X}, Y)}, "expected"),
    ],
)
def test_bad_data_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        ModelTask("t", MODEL, **{"calibration": X, "evaluation": (X, Y), **kwargs})


def test_the_base_task_checks_batch_sizes_and_sample_counts() -> None:
    task = ModelTask("t", MODEL, calibration=X[:10], evaluation=(X, Y))
    for call in (lambda: task.eval_batches(0), lambda: task.example_inputs(-1), lambda: task.calibration_batches(3, True)):
        with pytest.raises(TaskError, match="batch_size must be an integer >= 1"):
            call()
    with pytest.raises(TaskError, match="1..10"):
        task.calibration_batches(11)
