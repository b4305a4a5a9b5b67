"""The task contract: a trained FP32 model, its data and its metric.

A task is a Python module (usually in the project's ``tasks/`` folder) that exposes a module-level
``TASK`` object, an instance of :class:`Task`. Its constructor must be cheap: data and weights are
loaded lazily, the first time a method needs them, and cached.

Inputs travel as a :data:`Batch`, a dict from the model's input names to numpy arrays whose first
axis is the (dynamic) batch axis. Models return one output tensor (the logits for classifiers).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sweeper.errors import TaskError, did_you_mean
from sweeper.spec import Batch, LabeledBatch

if TYPE_CHECKING:
    import torch



class Task(ABC):
    """A trained model with calibration data, evaluation data and a metric.

    Subclasses set the class attributes and implement the abstract methods. The metric is
    top-1 accuracy in percent unless :meth:`metric` is overridden; ``higher_is_better`` gives its
    direction, which the accuracy-drop computation follows.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str] = "top1_accuracy_pct"
    higher_is_better: ClassVar[bool] = True
    input_names: ClassVar[tuple[str, ...]] = ("input",)
    output_names: ClassVar[tuple[str, ...]] = ("logits",)

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Check every task's arguments in one place: the batch sizes and calibration sample
        counts a subclass's batch methods receive are validated before the method runs."""
        super().__init_subclass__(**kwargs)
        for name in CHECKED_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_checked_by_task", False):
                setattr(cls, name, _checked(name, method))

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes of every input and output (ONNX export naming): the batch axis by default."""
        return {n: {0: "batch"} for n in (*self.input_names, *self.output_names)}

    def padded_lengths(self, batch: Batch) -> np.ndarray | None:
        """Each sample's length before padding, for a task whose inputs are sequences padded along
        axis 1 (that axis named in :attr:`dynamic_axes`); ``None``, the default, when they are not.

        With it, sensitivity scores a model that takes any length on length-sorted batches cut to
        their longest sample (:func:`sweeper.measure.predict_rows_by_length`). Where padding is
        masked (an attention mask) that gives the padded batches' outputs, except for models that
        take activation ranges per call (dynamic INT8: see :func:`sweeper.scoring._predict`).
        """
        return None

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """Return a fresh FP32 model with its trained weights, in eval mode."""

    @abstractmethod
    def example_inputs(self, batch_size: int = 1) -> Batch:
        """Return real inputs of ``batch_size`` samples (used for export and latency)."""

    @property
    @abstractmethod
    def calibration_size(self) -> int:
        """Number of samples in the calibration split."""

    @abstractmethod
    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        """Yield the first ``n`` samples of the calibration split in batches.

        Raises:
            TaskError: if ``n`` is not in ``1..calibration_size``.
        """

    @abstractmethod
    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        """Yield the evaluation split as (inputs, labels) batches, always in the same order."""

    def train_batches(self, batch_size: int = 64, *, seed: int = 0) -> Iterator[LabeledBatch]:
        """Yield one epoch of the training split, shuffled with ``seed``.

        Tasks without a training split keep this default, which raises ``TaskError``; backends
        that fine-tune (QAT) are then unavailable for the task.
        """

        raise TaskError(f"task '{self.name}' has no training split")

    @property
    def has_training_split(self) -> bool:
        """Whether :meth:`train_batches` is implemented."""
        return type(self).train_batches is not Task.train_batches

    def confirm_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        """Yield a held-out confirmation split as (inputs, labels) batches, always in the same order.

        The finalists of a sweep are re-scored on it; no trial, pruning decision or sensitivity
        ranking sees it. Tasks without one keep this default, which raises ``TaskError``: the
        evaluation split is then divided once (stratified, seeded) into a trial part and a
        held-out part (see :func:`sweeper.holdout.held_out_indices`).
        """

        raise TaskError(f"task '{self.name}' has no confirmation split")

    @property
    def has_confirmation_split(self) -> bool:
        """Whether :meth:`confirm_batches` is implemented."""
        return type(self).confirm_batches is not Task.confirm_batches

    def metric(self, outputs: np.ndarray, labels: np.ndarray) -> float:
        """Top-1 accuracy in percent of ``outputs`` (logits, batch-first) against ``labels``."""
        return float(np.mean(np.argmax(outputs, axis=-1) == labels) * 100.0)

    def correct(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """Which samples the outputs classify right, when the metric is their share (top-1
        accuracy): the drop's interval and the pruning test rest on it. ``None`` for a task whose
        metric is something else."""
        if type(self).metric is not Task.metric:
            return None
        return np.asarray(np.argmax(outputs, axis=-1) == labels)


# Task methods whose ``batch_size`` (and, for calibration, ``n``) the base class checks.
CHECKED_METHODS = ("example_inputs", "calibration_batches", "eval_batches", "train_batches", "confirm_batches")


def _checked(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def checked(self: Task, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if "batch_size" in bound.arguments:
            check_batch_size(bound.arguments["batch_size"])
        if name == "calibration_batches":
            check_sample_count(self, bound.arguments["n"])
        return method(self, *args, **kwargs)

    checked.__dict__["_checked_by_task"] = True
    return checked


def check_batch_size(batch_size: int) -> None:
    """Raise ``TaskError`` unless ``batch_size`` is an integer >= 1."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TaskError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def check_sample_count(task: Task, n: int) -> None:
    """Raise ``TaskError`` unless ``1 <= n <= task.calibration_size``."""

    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= task.calibration_size:
        raise TaskError(
            f"task '{task.name}' has {task.calibration_size} calibration samples; "
            f"a calibration sample count must be an integer in 1..{task.calibration_size}, got {n!r}"
        )


def task_search_dirs(space_file: str | Path | None = None, extra: Iterable[Path] = ()) -> list[Path]:
    """Where a task name is looked up, in order; every command that takes a task uses this list.

    The ``extra`` folders, then ``./tasks``, then (when there is a space file) ``tasks/`` beside
    the space file and ``tasks/`` in the folder above it.
    """
    dirs = [*extra, Path.cwd() / "tasks"]
    if space_file is not None:
        here = Path(space_file).resolve().parent
        dirs += [here / "tasks", here.parent / "tasks"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def find_task_file(ref: str, search_dirs: list[Path]) -> Path:
    """Resolve a task reference (a name such as ``digits_cnn`` or a path to a ``.py`` file).

    A name is looked up as ``<dir>/<name>.py`` in each of ``search_dirs`` in order.

    Raises:
        TaskError: naming the places looked in and the tasks found there.
    """

    if ref.endswith(".py") or "/" in ref:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise TaskError(f"task file '{ref}' does not exist; give a task name or a path to a .py file")
        return path.resolve()
    for directory in search_dirs:
        candidate = directory / f"{ref}.py"
        if candidate.is_file():
            return candidate.resolve()
    known = sorted({p.stem for d in search_dirs if d.is_dir() for p in d.glob("*.py") if not p.stem.startswith("_")})
    where = ", ".join(str(d) for d in search_dirs) or "(no task folder)"
    raise TaskError(
        f"unknown task '{ref}'.{did_you_mean(ref, known)} "
        f"Tasks found in {where}: {', '.join(known) or 'none'}."
    )


@cache
def load_task(path: str, attr: str = "TASK") -> Task:
    """Import the task module at ``path`` and return its ``attr`` object (cached per process).

    Raises:
        TaskError: when the module cannot be imported, lacks ``attr``, or ``attr`` is not a Task.
    """

    module_name = f"sweeper_task_{Path(path).stem}_{abs(hash(path)) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"cannot import task file '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise TaskError(f"task file '{path}' raised while loading: {type(exc).__name__}: {exc}") from exc
    task = getattr(module, attr, None)
    if task is None:
        raise TaskError(
            f"task file '{path}' defines no '{attr}'; a task module must define "
            f"`{attr} = YourTask()` where YourTask subclasses sweeper.task.Task"
        )
    if not isinstance(task, Task):
        raise TaskError(
            f"'{attr}' in task file '{path}' is of type {type(task).__name__}, not a sweeper.task.Task"
        )
    return task


def check_task_file(path: str | Path) -> Path:
    """Load a task file in this process and check that it defines a usable ``TASK``; return its path.

    The driver calls this before Ray starts and before any folder is made, so a task file with a
    syntax error, without ``TASK``, with a ``TASK`` of the wrong type, or one that raises on import
    fails at once with one message. The module stays cached (:func:`load_task`).

    Raises:
        TaskError: naming the file and what is wrong with it.
    """

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file '{path}' does not exist; give a task name or a path to a .py file")
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as exc:
        raise TaskError(f"task file '{path}' has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # e.g. a NUL byte: not Python source at all
        raise TaskError(f"task file '{path}' is not Python source: {exc}") from None
    task = load_task(str(path))
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TaskError(
            f"'TASK' in task file '{path}' ({type(task).__name__}) has no name; "
            'give its class a `name = "..."` string attribute'
        )
    return path
