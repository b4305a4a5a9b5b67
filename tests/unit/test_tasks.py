"""The bundled array tasks (digits_cnn, mnist1d_gru) and their base, ArrayClassificationTask.

Accuracy and shape tests use the default cache, so trained weights are reused between runs; the
tests of caching itself point SWEEPER_CACHE_DIR at a temporary folder and use digits_cnn, which
trains in a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.array_task import (
    ArrayClassificationTask,
    ArraySplit,
    ArraySplits,
    TrainingRecipe,
)
from sweeper.errors import ConfigError, TaskError
from sweeper.task import load_task

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "digits_cnn": {"train": 1077, "calibration": 360, "evaluation": 360},
    "mnist1d_gru": {"train": 3500, "calibration": 500, "evaluation": 1000},
}
SAMPLE_SHAPES = {"digits_cnn": (1, 8, 8), "mnist1d_gru": (40, 1)}
# Measured on the eval split: digits_cnn 99.7 %, mnist1d_gru 96.6 %; the margin absorbs a retrain
# on another machine, where float rounding can differ.
MIN_ACCURACY_PCT = {"digits_cnn": 95.0, "mnist1d_gru": 90.0}


def _load(name: str) -> ArrayClassificationTask:
    task = load_task(str(ROOT / "tasks" / f"{name}.py"))
    assert isinstance(task, ArrayClassificationTask)
    return task


def _fresh(name: str) -> ArrayClassificationTask:
    """A new instance, with no splits or state carried over from other tests."""
    return type(_load(name))()


@pytest.fixture(params=sorted(SIZES))
def task(request: pytest.FixtureRequest) -> ArrayClassificationTask:
    return _load(request.param)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path))
    return tmp_path


def _evaluate(task: ArrayClassificationTask, model: torch.nn.Module) -> float:
    outputs, labels = [], []
    with torch.no_grad():
        for batch, batch_labels in task.eval_batches():
            outputs.append(model(torch.from_numpy(batch[task.input_names[0]])).numpy())
            labels.append(batch_labels)
    return task.metric(np.concatenate(outputs), np.concatenate(labels))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- data ---------------------------------------------------------------------------------------


def test_split_sizes_dtypes_and_shapes(task: ArrayClassificationTask) -> None:
    assert task.splits.sizes() == SIZES[task.name]
    assert task.calibration_size == SIZES[task.name]["calibration"]
    for split in task.splits.named().values():
        assert split.inputs.dtype == np.float32
        assert split.labels.dtype == np.int64
        assert split.inputs.shape[1:] == SAMPLE_SHAPES[task.name]
        assert set(np.unique(split.labels)) == set(range(10))


def test_splits_are_disjoint(task: ArrayClassificationTask) -> None:
    named = task.splits.named()
    all_ids = np.concatenate([split.ids for split in named.values()])
    assert len(np.unique(all_ids)) == len(all_ids)


def test_digits_splits_partition_the_dataset_and_are_scaled() -> None:
    task = _load("digits_cnn")
    ids = np.sort(np.concatenate([s.ids for s in task.splits.named().values()]))
    np.testing.assert_array_equal(ids, np.arange(1797))
    for split in task.splits.named().values():
        assert split.inputs.min() >= 0.0 and split.inputs.max() <= 1.0


def test_mnist1d_train_and_calibration_partition_x_and_evaluation_is_x_test() -> None:
    splits = _load("mnist1d_gru").splits
    np.testing.assert_array_equal(np.sort(np.concatenate([splits.train.ids, splits.calibration.ids])), np.arange(4000))
    np.testing.assert_array_equal(splits.evaluation.ids, np.arange(4000, 5000))


def test_splits_are_the_same_in_a_new_instance(task: ArrayClassificationTask) -> None:
    fresh = type(task)()
    for name, split in task.splits.named().items():
        other = fresh.splits.named()[name]
        np.testing.assert_array_equal(split.ids, other.ids)
        np.testing.assert_array_equal(split.inputs, other.inputs)


@pytest.mark.parametrize("n", [1, 33, "all"])
def test_calibration_batches_yield_the_first_n_samples(task: ArrayClassificationTask, n: int | str) -> None:
    count = task.calibration_size if n == "all" else n
    batches = list(task.calibration_batches(count, batch_size=32))
    assert all(set(b) == {task.input_names[0]} for b in batches)
    assert all(len(b[task.input_names[0]]) <= 32 for b in batches)
    inputs = np.concatenate([b[task.input_names[0]] for b in batches])
    np.testing.assert_array_equal(inputs, task.splits.calibration.inputs[:count])


@pytest.mark.parametrize("n", [0, -1, "size+1", 2.0, True])
def test_calibration_batches_reject_bad_counts(task: ArrayClassificationTask, n: object) -> None:
    bad = task.calibration_size + 1 if n == "size+1" else n
    with pytest.raises(TaskError, match=rf"integer in 1\.\.{task.calibration_size}, got {bad!r}"):
        task.calibration_batches(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_size", [0, -3, 1.5])
def test_batch_methods_reject_bad_batch_sizes(batch_size: object) -> None:
    task = _load("digits_cnn")
    calls = [
        lambda: task.calibration_batches(10, batch_size=batch_size),
        lambda: task.eval_batches(batch_size=batch_size),
        lambda: task.train_batches(batch_size=batch_size),
        lambda: task.example_inputs(batch_size),
    ]
    for call in calls:
        with pytest.raises(TaskError, match=r"batch_size must be an integer >= 1"):
            call()


def test_eval_order_is_stable(task: ArrayClassificationTask) -> None:
    def labels(t: ArrayClassificationTask, batch_size: int) -> np.ndarray:
        return np.concatenate([y for _, y in t.eval_batches(batch_size)])

    first = labels(task, 256)
    np.testing.assert_array_equal(first, labels(task, 256))
    np.testing.assert_array_equal(first, labels(task, 7))
    np.testing.assert_array_equal(first, labels(type(task)(), 100))
    assert len(first) == SIZES[task.name]["evaluation"]


def test_batches_are_copies(task: ArrayClassificationTask) -> None:
    key = task.input_names[0]
    batch, labels = next(task.eval_batches(4))
    batch[key][:] = 123.0
    labels[:] = -1
    next(task.calibration_batches(4))[key][:] = 123.0
    task.example_inputs(4)[key][:] = 123.0
    assert not np.any(task.splits.evaluation.inputs[:4] == 123.0)
    assert not np.any(task.splits.evaluation.labels[:4] == -1)
    assert not np.any(task.splits.calibration.inputs[:4] == 123.0)


def test_train_batches_cover_the_split_once_shuffled_by_seed() -> None:
    task = _load("digits_cnn")

    def epoch(seed: int) -> np.ndarray:
        return np.concatenate([b["input"].reshape(len(y), -1) for b, y in task.train_batches(50, seed=seed)])

    first = epoch(0)
    np.testing.assert_array_equal(first, epoch(0))
    assert not np.array_equal(first, epoch(1))
    expected = task.splits.train.inputs.reshape(len(first), -1)
    # Same rows, another order.
    assert len(first) == len(expected)
    np.testing.assert_array_equal(np.unique(first, axis=0), np.unique(expected, axis=0))
    assert not np.array_equal(first, expected)
    assert task.has_training_split


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7])
def test_example_inputs_have_a_dynamic_batch_axis(task: ArrayClassificationTask, batch_size: int) -> None:
    inputs = task.example_inputs(batch_size)
    assert set(inputs) == {task.input_names[0]}
    x = inputs[task.input_names[0]]
    assert x.shape == (batch_size, *SAMPLE_SHAPES[task.name]) and x.dtype == np.float32
    model = task.build_model()
    assert not model.training
    with torch.no_grad():
        assert model(torch.from_numpy(x)).shape == (batch_size, 10)


def test_example_inputs_larger_than_the_calibration_split_repeat_it() -> None:
    task = _load("digits_cnn")
    x = task.example_inputs(task.calibration_size + 5)["input"]
    np.testing.assert_array_equal(x[task.calibration_size :], task.splits.calibration.inputs[:5])


def test_fp32_accuracy(task: ArrayClassificationTask) -> None:
    assert _evaluate(task, task.build_model()) >= MIN_ACCURACY_PCT[task.name]


def test_digits_model_has_fusable_conv_bn_relu_blocks() -> None:
    modules = dict(_load("digits_cnn").make_model().named_modules())
    for conv, bn, relu in [("0", "1", "2"), ("3", "4", "5"), ("7", "8", "9")]:
        assert isinstance(modules[f"features.{conv}"], torch.nn.Conv2d)
        assert isinstance(modules[f"features.{bn}"], torch.nn.BatchNorm2d)
        assert isinstance(modules[f"features.{relu}"], torch.nn.ReLU)


# --- training and the weights cache --------------------------------------------------------------


def test_build_model_trains_once_then_loads_the_cached_weights(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = _fresh("digits_cnn")
    first = _state(task.build_model())
    path = task.weights_path()
    assert path.parent == isolated_cache / "tasks" and path.name.startswith("digits_cnn-")
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_training(self: ArrayClassificationTask, model: torch.nn.Module) -> None:
        raise AssertionError("build_model retrained although the weights were cached")

    monkeypatch.setattr(ArrayClassificationTask, "fit", no_training)
    _assert_same_weights(first, _state(task.build_model()))
    _assert_same_weights(first, _state(_fresh("digits_cnn").build_model()))
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []

    # Another process finds the same file and loads it without training.
    code = (
        "import sys, torch\n"
        "from sweeper.array_task import ArrayClassificationTask\n"
        "from sweeper.task import load_task\n"
        "def no_training(self, model): raise SystemExit('retrained')\n"
        "ArrayClassificationTask.fit = no_training\n"
        f"model = load_task({str(ROOT / 'tasks' / 'digits_cnn.py')!r}).build_model()\n"
        "print(sum(float(v.double().sum()) for v in model.state_dict().values()))\n"
    )
    env = {**os.environ, "SWEEPER_CACHE_DIR": str(isolated_cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(sum(float(v.double().sum()) for v in first.values()), rel=0, abs=0)
    assert path.stat().st_mtime_ns == mtime


def test_training_is_deterministic_and_leaves_global_torch_state_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = []
    for run in ("a", "b"):
        monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / run))
        threads = torch.get_num_threads()
        torch.manual_seed(1234)
        expected_draw = torch.rand(3)
        torch.manual_seed(1234)
        states.append(_state(_fresh("digits_cnn").build_model()))
        torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)
        assert torch.get_num_threads() == threads
        assert not torch.are_deterministic_algorithms_enabled()
    _assert_same_weights(*states)


def test_weights_path_changes_with_what_affects_training(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = _fresh("digits_cnn")
    base = task.weights_path()
    assert task.weights_path() == base
    monkeypatch.setattr(task, "recipe", dataclasses.replace(task.recipe, epochs=task.recipe.epochs + 1))
    longer = task.weights_path()
    monkeypatch.setattr(task, "recipe", dataclasses.replace(task.recipe, seed=task.recipe.seed + 1))
    reseeded = task.weights_path()
    monkeypatch.setattr(task, "architecture_version", task.architecture_version + 1)
    new_architecture = task.weights_path()
    assert len({base, longer, reseeded, new_architecture}) == 4


def test_mnist1d_generation_keeps_the_global_numpy_stream(isolated_cache: Path) -> None:
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    splits = _fresh("mnist1d_gru").splits
    np.testing.assert_array_equal(np.random.rand(3), expected)
    assert [p.suffix for p in (isolated_cache / "tasks").iterdir()] == [".npz"]
    np.testing.assert_array_equal(splits.evaluation.inputs, _load("mnist1d_gru").splits.evaluation.inputs)


# --- base-class validation ---------------------------------------------------------------------


def _split(n: int, first_id: int = 0) -> ArraySplit:
    return ArraySplit(
        inputs=np.zeros((n, 2), np.float32),
        labels=np.zeros(n, np.int64),
        ids=np.arange(first_id, first_id + n, dtype=np.int64),
    )


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"inputs": np.zeros((2, 2))}, "inputs must be float32, got float64"),
        ({"labels": np.zeros(2, np.int32)}, "labels must be a 1-D int64 array"),
        ({"labels": np.zeros(3, np.int64)}, "got 2 inputs, 3 labels and 2 ids"),
        ({"ids": np.array([4, 4])}, "ids must be unique"),
    ],
)
def test_array_split_rejects_bad_arrays(fields: dict[str, np.ndarray], message: str) -> None:
    good = dataclasses.asdict(_split(2))
    with pytest.raises(TaskError, match=message):
        ArraySplit(**{**good, **fields})


def test_array_splits_reject_shared_ids_and_mixed_shapes() -> None:
    with pytest.raises(TaskError, match="splits 'train' and 'evaluation' share 1 sample ids"):
        ArraySplits(train=_split(3), calibration=_split(2, first_id=10), evaluation=_split(2, first_id=2))
    odd = ArraySplit(inputs=np.zeros((2, 5), np.float32), labels=np.zeros(2, np.int64), ids=np.array([20, 21]))
    with pytest.raises(TaskError, match="same sample shape"):
        ArraySplits(train=_split(3), calibration=_split(2, first_id=10), evaluation=odd)


@pytest.mark.parametrize(
    "fields,name",
    [({"epochs": 0}, "epochs"), ({"epochs": 2, "batch_size": 1.5}, "batch_size"),
     ({"epochs": 2, "learning_rate": 0.0}, "learning_rate"), ({"epochs": 2, "max_grad_norm": -1.0}, "max_grad_norm")],
)
def test_training_recipe_rejects_bad_values(fields: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"TrainingRecipe\.{name} must be"):
        TrainingRecipe(**fields)  # type: ignore[arg-type]


def test_importing_array_task_does_not_import_torch() -> None:
    code = "import sys, sweeper.array_task; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
