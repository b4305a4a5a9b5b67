"""The confirmation split: which evaluation samples trials see, and which are held out.

The finalists of a sweep are re-scored on samples no trial, pruning decision or sensitivity
ranking saw. A task may provide them (:meth:`~sweeper.task.Task.confirm_batches`); otherwise the
evaluation split is divided once, stratified and seeded (:func:`held_out_indices`),
into a trial part and a held-out part. A split too small to divide is used whole by the trials,
and the confirmation re-scores on it (and says so: split ``"evaluation"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from sweeper.measure import trial_indices
from sweeper.task import LabeledBatch, Task

# What the finalists are confirmed on (study.json's ``baseline.confirm_split``, the rows'
# ``confirmed_split``): a held-out part of the evaluation split, the task's own confirmation
# split, or the whole evaluation split when it is too small to hold a part out.
SPLITS = ("held_out", "task", "evaluation")


def trial_part(task: Task, batch_size: int) -> np.ndarray | None:
    """The trial part of a task's evaluation split (:func:`trial_indices` of its labels)."""
    labels = np.concatenate([y for _, y in task.eval_batches(batch_size)])
    return trial_indices(labels, task.has_confirmation_split)


def select_batches(
    batches: Iterable[LabeledBatch], keep: np.ndarray, *, invert: bool = False
) -> Iterator[LabeledBatch]:
    """The samples ``keep`` lists (sorted indices into the whole stream) of a stream of batches, or
    with ``invert`` every other sample."""
    offset = 0
    for batch, labels in batches:
        n = len(labels)
        lo, hi = np.searchsorted(keep, [offset, offset + n])
        local = keep[lo:hi] - offset
        if invert:
            local = np.setdiff1d(np.arange(n), local)
        offset += n
        if len(local):
            yield {name: values[local] for name, values in batch.items()}, labels[local]


def split_name(task: Task, keep: np.ndarray | None) -> str:
    """Which split the finalists are confirmed on, given the trial part ``keep``."""
    if task.has_confirmation_split:
        return "task"
    return "evaluation" if keep is None else "held_out"


def held_out_batches(task: Task, keep: np.ndarray | None, batch_size: int) -> Iterator[LabeledBatch]:
    """The batches of the confirmation split (see :func:`split_name`)."""
    split = split_name(task, keep)
    if split == "task":
        return task.confirm_batches(batch_size)
    batches = task.eval_batches(batch_size)
    return batches if keep is None else select_batches(batches, keep, invert=True)


@dataclass(frozen=True)
class HeldOut:
    """The FP32 model on the confirmation split: which ``split``, outputs, labels and metric."""

    split: str
    outputs: np.ndarray
    labels: np.ndarray
    metric: float


def predict_all(
    predict: Callable[[dict[str, np.ndarray]], object], batches: Iterable[LabeledBatch]
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict`` over ``batches``; return (outputs, labels)."""
    outputs, labels = [], []
    for batch, y in batches:
        outputs.append(np.asarray(predict(batch), dtype=np.float32))
        labels.append(y)
    return np.concatenate(outputs), np.concatenate(labels)


def held_out(
    task: Task, keep: np.ndarray | None, predict: Callable[[dict[str, np.ndarray]], object], batch_size: int
) -> HeldOut:
    """The FP32 model (its ``predict``) on the confirmation split."""
    outputs, labels = predict_all(predict, held_out_batches(task, keep, batch_size))
    return HeldOut(split=split_name(task, keep), outputs=outputs, labels=labels, metric=task.metric(outputs, labels))
