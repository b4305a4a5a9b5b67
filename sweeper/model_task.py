"""A task for a model that is already trained: a torch module and its data, in a few lines.

In a task file (``my_task.py``)::

    from sweeper import ModelTask
    TASK = ModelTask("my_model", model, calibration=x_calib, evaluation=(x_test, y_test))

``calibration`` is inputs only; ``evaluation`` and the optional ``training`` split (for QAT) are
labelled. Each takes numpy arrays (an array, or a dict from input names to arrays, for the
inputs), a ``torch.utils.data.Dataset`` of ``(inputs, label)`` items, or a ``DataLoader``. The
data is read once into arrays; batching, the sample-count and batch-size checks, the input names
and the dynamic batch axis come from :class:`~sweeper.task.Task`. The metric is top-1 accuracy in
percent unless ``metric`` (``f(outputs, labels) -> float``) and ``higher_is_better`` say otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.errors import TaskError
from sweeper.task import Batch, LabeledBatch, Task

if TYPE_CHECKING:
    import torch

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class _Split:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, start: int, stop: int, rows: np.ndarray | None = None) -> Batch:
        index = rows[start:stop] if rows is not None else slice(start, stop)
        return {name: np.ascontiguousarray(array[index]) for name, array in self.inputs.items()}


class ModelTask(Task):
    """A task around an already-trained torch model and its data (see the module docstring).

    Args:
        name: the task's name (rows and study folders carry it).
        model: the trained FP32 model; each trial gets a copy in eval mode.
        calibration: calibration inputs (no labels needed; labels given are ignored).
        evaluation: labelled evaluation data, ``(inputs, labels)`` arrays, a Dataset or a DataLoader.
        training: labelled training data for quantization-aware training, optional.
        metric: ``f(outputs, labels) -> float``; default top-1 accuracy in percent.
        metric_name: the metric's name in the rows (default ``top1_accuracy_pct``, or
            ``metric``'s ``__name__`` when a metric is given).
        higher_is_better: the metric's direction.
        input_names: the model's input names, in its ``forward`` order; taken from the dict keys
            when inputs are dicts, else ``("input",)``.

    Raises:
        TaskError: when a split is empty, its arrays disagree in length, or its inputs do not
            match ``input_names``.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        calibration: Any,
        evaluation: Any,
        training: Any = None,
        metric: Metric | None = None,
        metric_name: str | None = None,
        higher_is_better: bool = True,
        input_names: tuple[str, ...] | None = None,
    ) -> None:
        # Instance attributes here; the Task contract declares them as class attributes.
        self.name = name  # type: ignore[misc]
        self._model = model
        self._metric = metric
        default_name = str(getattr(metric, "__name__", "metric")) if metric is not None else "top1_accuracy_pct"
        self.metric_name = metric_name or default_name  # type: ignore[misc]
        self.higher_is_better = higher_is_better  # type: ignore[misc]
        self._calibration = _split(calibration, "calibration", input_names, labelled=False)
        self.input_names = tuple(self._calibration.inputs)  # type: ignore[misc]
        self._evaluation = _split(evaluation, "evaluation", self.input_names, labelled=True)
        self._training = _split(training, "training", self.input_names, labelled=True) if training is not None else None

    def build_model(self) -> torch.nn.Module:
        return copy.deepcopy(self._model).eval()

    def example_inputs(self, batch_size: int = 1) -> Batch:
        """The first ``batch_size`` calibration samples (repeated when there are fewer)."""
        return self._calibration.take(0, batch_size, np.arange(batch_size) % len(self._calibration))

    @property
    def calibration_size(self) -> int:
        return len(self._calibration)

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        return (self._calibration.take(i, min(i + batch_size, n)) for i in range(0, n, batch_size))

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        return _labelled(self._evaluation, batch_size, None)

    def train_batches(self, batch_size: int = 64, *, seed: int = 0) -> Iterator[LabeledBatch]:
        if self._training is None:
            raise TaskError(f"task '{self.name}' has no training split; give ModelTask(training=...) for QAT")
        return _labelled(self._training, batch_size, np.random.default_rng(seed).permutation(len(self._training)))

    @property
    def has_training_split(self) -> bool:
        return self._training is not None

    def metric(self, outputs: np.ndarray, labels: np.ndarray) -> float:
        return float(self._metric(outputs, labels)) if self._metric is not None else super().metric(outputs, labels)

    def correct(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        return None if self._metric is not None else np.asarray(np.argmax(outputs, axis=-1) == labels)


def _labelled(split: _Split, batch_size: int, rows: np.ndarray | None) -> Iterator[LabeledBatch]:
    assert split.labels is not None
    labels = split.labels if rows is None else split.labels[rows]
    for start in range(0, len(split), batch_size):
        yield split.take(start, start + batch_size, rows), labels[start : start + batch_size].copy()


def _split(data: Any, what: str, input_names: tuple[str, ...] | None, *, labelled: bool) -> _Split:
    """Read one split's data into arrays: ``(inputs, labels)``, inputs alone, a Dataset or a DataLoader."""
    inputs, labels = _materialize(data, labelled)
    named = _named(inputs, input_names, what)
    lengths = {name: len(array) for name, array in named.items()}
    if labels is not None:
        lengths["labels"] = len(labels)
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise TaskError(
            f"the {what} split needs the same number (at least one) of every input and label, got {lengths}"
        )
    if labelled and labels is None:
        raise TaskError(f"the {what} split needs labels: give (inputs, labels), or a Dataset of (inputs, label) items")
    return _Split(named, None if labels is None else np.asarray(labels))


def _materialize(data: Any, labelled: bool) -> tuple[Any, Any]:
    if isinstance(data, tuple) and len(data) == 2 and labelled:
        return data
    if isinstance(data, np.ndarray | Mapping):
        return data, None
    if isinstance(data, tuple) and len(data) == 2:
        return data  # labels given for calibration are kept only to be checked, then ignored
    return _from_torch(data)


def _from_torch(data: Any) -> tuple[Any, Any]:
    """Concatenate what a Dataset or DataLoader yields: ``(inputs, label)`` pairs or inputs alone."""
    import torch

    loader = data
    if not isinstance(data, torch.utils.data.DataLoader):
        loader = torch.utils.data.DataLoader(data, batch_size=256)
    xs: list[Any] = []
    ys: list[np.ndarray] = []
    for item in loader:
        x, y = (item[0], item[1]) if isinstance(item, list | tuple) and len(item) == 2 else (item, None)
        xs.append({k: _numpy(v) for k, v in x.items()} if isinstance(x, Mapping) else _numpy(x))
        if y is not None:
            ys.append(_numpy(y))
    if not xs:
        raise TaskError("the data yielded no samples")
    inputs = {k: np.concatenate([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else np.concatenate(xs)
    return inputs, np.concatenate(ys) if ys else None


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _named(inputs: Any, input_names: tuple[str, ...] | None, what: str) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        named = {str(k): np.asarray(v) for k, v in inputs.items()}
        if input_names is not None and tuple(named) != tuple(input_names):
            if set(named) != set(input_names):
                raise TaskError(f"the {what} split's inputs are {sorted(named)}, expected {list(input_names)}")
            named = {k: named[k] for k in input_names}
    else:
        names = input_names or ("input",)
        if len(names) != 1:
            raise TaskError(f"the {what} split is one array, but the model takes inputs {list(names)}: give a dict")
        named = {names[0]: np.asarray(inputs)}
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in named.items()}
