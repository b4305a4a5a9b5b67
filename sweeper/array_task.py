"""A base task for classifiers whose data fit in numpy arrays.

A subclass provides three disjoint splits (:meth:`ArrayClassificationTask.make_splits`), an
untrained model (:meth:`ArrayClassificationTask.make_model`) and a :class:`TrainingRecipe`; the
base serves the batches and trains the model once, with a fixed seed, caching the weights under
``cache_dir("tasks")`` so that later calls, in this process or another, load them instead.

Importing this module does not import torch; training and loading do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from sweeper.errors import ConfigError, TaskError
from sweeper.location import cache_dir, cache_key, cached_file
from sweeper.task import Batch, LabeledBatch, Task, check_batch_size

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)

# Bump when the training loop below changes in a way that changes the trained weights.
_TRAINING_LOOP_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ArraySplit:
    """One split: float32 inputs (sample axis first), int64 labels and int64 sample ids.

    ``ids`` name each sample's origin (e.g. its row in the source dataset) so that splits can be
    checked to be disjoint.
    """

    inputs: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        if self.inputs.dtype != np.float32:
            raise TaskError(f"split inputs must be float32, got {self.inputs.dtype}")
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise TaskError(
                f"split labels must be a 1-D int64 array, got {self.labels.ndim}-D {self.labels.dtype}"
            )
        if len(self.inputs) != len(self.labels) or len(self.labels) != len(self.ids) or len(self.labels) == 0:
            raise TaskError(
                f"a split needs as many inputs as labels and ids and at least one sample, "
                f"got {len(self.inputs)} inputs, {len(self.labels)} labels and {len(self.ids)} ids"
            )
        if self.ids.dtype != np.int64 or self.ids.ndim != 1:
            raise TaskError(f"split ids must be a 1-D int64 array, got {self.ids.ndim}-D {self.ids.dtype}")
        if len(np.unique(self.ids)) != len(self.ids):
            raise TaskError("split ids must be unique, got duplicates")

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Return an iterator of (inputs, labels) copies of ``batch_size`` samples, in ``order`` if given.

        Raises:
            TaskError: if ``batch_size`` is not an integer >= 1 (at the call, not on iteration).
        """
        check_batch_size(batch_size)
        return self._batches(batch_size, order)

    def _batches(self, batch_size: int, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            if order is None:
                rows = slice(start, start + batch_size)
                yield self.inputs[rows].copy(), self.labels[rows].copy()
            else:
                picked = order[start : start + batch_size]
                yield self.inputs[picked], self.labels[picked]


@dataclass(frozen=True, kw_only=True)
class ArraySplits:
    """The train, calibration and evaluation splits of an :class:`ArrayClassificationTask`."""

    train: ArraySplit
    calibration: ArraySplit
    evaluation: ArraySplit

    def __post_init__(self) -> None:
        shapes = {name: split.inputs.shape[1:] for name, split in self.named().items()}
        if len(set(shapes.values())) != 1:
            raise TaskError(f"all splits must have the same sample shape, got {shapes}")
        named = list(self.named().items())
        for i, (name_a, a) in enumerate(named):
            for name_b, b in named[i + 1 :]:
                shared = np.intersect1d(a.ids, b.ids)
                if len(shared):
                    raise TaskError(f"splits '{name_a}' and '{name_b}' share {len(shared)} sample ids")

    @classmethod
    def stratified(
        cls, inputs: np.ndarray, labels: np.ndarray, *, calibration_size: int, evaluation_size: int, seed: int
    ) -> ArraySplits:
        """Split one labelled set three ways, each stratified by label, reproducibly with ``seed``.

        The evaluation split is drawn first, then calibration from the rest; ids are row numbers.
        ``train_test_split`` shuffles rows, so the first n calibration samples mix classes.
        """
        from sklearn.model_selection import train_test_split

        ids = np.arange(len(labels), dtype=np.int64)
        rest, evaluation = train_test_split(ids, test_size=evaluation_size, stratify=labels, random_state=seed)
        train, calibration = train_test_split(
            rest, test_size=calibration_size, stratify=labels[rest], random_state=seed
        )

        def split(rows: np.ndarray) -> ArraySplit:
            return ArraySplit(inputs=inputs[rows], labels=labels[rows], ids=rows)

        return cls(train=split(train), calibration=split(calibration), evaluation=split(evaluation))

    def named(self) -> dict[str, ArraySplit]:
        """Return the splits by name."""
        return {"train": self.train, "calibration": self.calibration, "evaluation": self.evaluation}

    def sizes(self) -> dict[str, int]:
        """Return the number of samples of each split."""
        return {name: len(split) for name, split in self.named().items()}


@dataclass(frozen=True, kw_only=True)
class TrainingRecipe:
    """How :meth:`ArrayClassificationTask.fit` trains: AdamW with a per-step cosine schedule.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per optimizer step.
        learning_rate: peak learning rate (decays to 0 with a cosine schedule).
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm to this value; ``None`` for no clipping.
        seed: seeds the weight initialisation and the shuffling.
    """

    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainingRecipe.{name} must be an integer >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"TrainingRecipe.learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"TrainingRecipe.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"TrainingRecipe.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}"
            )


class ArrayClassificationTask(Task):
    """A classification task whose splits are numpy arrays and whose model trains in seconds.

    Subclasses set ``name``, ``recipe`` and ``architecture_version`` (bump it whenever
    :meth:`make_model` changes) and implement :meth:`make_splits` and :meth:`make_model`.
    """

    recipe: ClassVar[TrainingRecipe]
    architecture_version: ClassVar[int] = 1

    @abstractmethod
    def make_splits(self) -> ArraySplits:
        """Build the three disjoint splits, deterministically (called once per instance)."""

    @abstractmethod
    def make_model(self) -> torch.nn.Module:
        """Return the untrained FP32 model (its initialisation is seeded by the caller)."""

    @cached_property
    def splits(self) -> ArraySplits:
        """The task's splits, built on first use."""
        return self.make_splits()

    # --- the Task contract ------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 1) -> Batch:
        """Return the first ``batch_size`` calibration samples (repeated when there are fewer)."""
        calibration = self.splits.calibration
        rows = np.arange(batch_size) % len(calibration)
        return {self.input_names[0]: calibration.inputs[rows]}

    @property
    def calibration_size(self) -> int:
        """Number of samples in the calibration split."""
        return len(self.splits.calibration)

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        """Yield the first ``n`` samples of the calibration split in batches.

        Raises:
            TaskError: if ``n`` is not in ``1..calibration_size`` or ``batch_size`` is below 1.
        """
        inputs = self.splits.calibration.inputs
        for start in range(0, n, batch_size):
            yield {self.input_names[0]: inputs[start : min(start + batch_size, n)].copy()}

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        """Yield the evaluation split as (inputs, labels) batches, always in the same order."""
        return self._labeled(self.splits.evaluation.batches(batch_size))

    def train_batches(self, batch_size: int = 64, *, seed: int = 0) -> Iterator[LabeledBatch]:
        """Yield one epoch of the training split, shuffled with ``seed``."""
        train = self.splits.train
        order = np.random.default_rng(seed).permutation(len(train))
        return self._labeled(train.batches(batch_size, order))

    def _labeled(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[LabeledBatch]:
        for inputs, labels in batches:
            yield {self.input_names[0]: inputs}, labels

    def build_model(self) -> torch.nn.Module:
        """Return the model with its trained weights, in eval mode (trained once, then cached)."""
        import torch

        path = cached_file(self.weights_path(), self._train_and_save)
        # The random initialisation is overwritten below; don't draw it from the caller's stream.
        with torch.random.fork_rng(devices=[]):
            model = self.make_model()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    # --- training ---------------------------------------------------------------------------

    def weights_path(self) -> Path:
        """Where the trained weights are cached; the name changes with anything that affects them."""
        key = cache_key(
            task=self.name,
            architecture_version=self.architecture_version,
            training_loop_version=_TRAINING_LOOP_VERSION,
            recipe=dataclasses.asdict(self.recipe),
            split_sizes=self.splits.sizes(),
            train_data_sha256=_fingerprint(self.splits.train),
        )
        return cache_dir("tasks") / f"{self.name}-{key}.pt"

    def _train_and_save(self, path: Path) -> None:
        import torch

        _log.info("training %s once (the weights are cached in %s)", self.name, path.parent)
        # The first build may come from inside a caller's inference_mode or no_grad block.
        with _reproducible(self.recipe.seed), torch.inference_mode(False), torch.enable_grad():
            model = self.make_model()
            self.fit(model)
        torch.save(model.state_dict(), path)

    def fit(self, model: torch.nn.Module) -> None:
        """Train ``model`` in place following :attr:`recipe` (seeding is the caller's job)."""
        import torch

        recipe = self.recipe
        steps_per_epoch = -(-len(self.splits.train) // recipe.batch_size)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for epoch in range(recipe.epochs):
            # A distinct shuffle per epoch, derived from the recipe seed.
            for batch, labels in self.train_batches(recipe.batch_size, seed=recipe.seed * 100_003 + epoch):
                if len(labels) == 1:
                    continue  # a one-sample remainder: BatchNorm cannot train on it
                optimizer.zero_grad(set_to_none=True)
                logits = model(torch.from_numpy(batch[self.input_names[0]]))
                loss = loss_fn(logits, torch.from_numpy(labels))
                loss.backward()
                if recipe.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                schedule.step()
        model.eval()



def _fingerprint(split: ArraySplit) -> str:
    digest = hashlib.sha256()
    for array in (split.inputs, split.labels):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """Seed torch, use deterministic kernels and one thread; restore the caller's state after.

    One thread makes the weights independent of the machine's core count, and these models are
    too small to gain much from more (on a busy machine, more threads are often slower).
    """
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_deterministic)
