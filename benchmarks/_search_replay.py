"""Searches replayed over the measured reference (a tabular benchmark, as NAS-Bench does).

**The sweeper** runs its own driver: :func:`sweeper.study._sweep` (the Optuna study and sampler of
:func:`sweeper.study_setup.open_optuna_study`: multivariate TPE with grouping and constant liar;
the warm-start ladder of the ``exclude`` block; :func:`sweeper.study.run_trials` and ``_propose``
with their repeat handling, the random sampler after repeated proposals and the exhaustion rule;
``RunningStudy.tell`` with ``trial.set_constraint`` from the drop; one Parquet row per trial).
The only part replaced is :class:`sweeper.dispatch.Dispatcher` (patched on ``sweeper.study`` for
the duration of a replay): instead of building and measuring a configuration in a Ray task, the
stand-in answers each trial with the :class:`~sweeper.spec.TrialResult` the reference measured
for that configuration (found by :func:`sweeper.repeats.config_key`). Ray, the FP32 baseline and
the sensitivity ranking come from the reference's own study, not from the replay.

**Random search** draws ``budget`` distinct configurations uniformly, without replacement, from
the enumerated space, and builds their rows with :func:`sweeper.rows.make_row` from the same
results.

The winner of a run is what a study reports: :func:`sweeper.analysis.best_feasible` on its rows
(the lowest ``latency_ms_p50`` among complete trials feasible by their search-split drop).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd

import sweeper.study
from sweeper import results, study_folder
from sweeper.analysis import best_feasible
from sweeper.events import ignore
from sweeper.repeats import config_key, row_key
from sweeper.rows import make_row
from sweeper.signals import StopFlag
from sweeper.space import Space
from sweeper.spec import FP32Baseline, TaskRef, TrialResult, TrialSpec
from sweeper.study import RunningStudy, SweepOptions


@dataclass(frozen=True)
class Reference:
    """The measured space: each configuration's backend, parameters and trial result, by key."""

    space: Space
    task_ref: TaskRef
    baseline: FP32Baseline
    rankings: dict[str, list[str]]
    configs: dict[str, tuple[str, dict[str, Any]]]
    outcomes: dict[str, TrialResult]


@dataclass(frozen=True)
class RunOutcome:
    """One search run: its winner (a config key, or ``None`` when nothing was feasible) and costs."""

    method: str
    budget: int
    seed: int
    winner: str | None
    distinct: int
    repeats: int
    trial_time_s: float
    driver_s: float


def lookup_dispatcher(reference: Reference) -> type:
    """A class with :class:`sweeper.dispatch.Dispatcher`'s interface that answers from ``reference``."""

    class LookupDispatcher:
        def __init__(self, space: Space, max_concurrent: int) -> None:
            self.max_concurrent = max_concurrent
            self.inflight: deque[tuple[Any, TrialSpec]] = deque()

        def has_room(self) -> bool:
            return len(self.inflight) < self.max_concurrent

        def __len__(self) -> int:
            return len(self.inflight)

        def submit(self, spec: TrialSpec, payload: Any) -> None:
            self.inflight.append((payload, spec))

        def wait(self, max_wait_s: float | None = None) -> list[tuple[Any, TrialSpec, TrialResult]]:
            if not self.inflight:
                return []
            payload, spec = self.inflight.popleft()  # trials finish in the order they started
            _trial, key = payload
            return [(payload, spec, reference.outcomes[key])]

        def cancel_all(self) -> list[tuple[Any, TrialSpec]]:
            cancelled = list(self.inflight)
            self.inflight.clear()
            return cancelled

    return LookupDispatcher


def _winner(rows: pd.DataFrame, objective: str) -> str | None:
    best = best_feasible(rows, objective, k=1)
    return None if best.empty else row_key(best.iloc[0].to_dict())


def replay_sweeper(reference: Reference, budget: int, seed: int, out: Path) -> RunOutcome:
    """One sweep of ``budget`` trials with ``seed``, its trials answered from the reference."""
    name = f"tpe-{budget}-seed{seed}"
    study_dir = study_folder.prepare(out, name, resume=False)
    options = SweepOptions(out=out, study=name, trials=budget, seed=seed, max_concurrent=1)
    started = time.perf_counter()
    # The finalists' confirmation (a Ray task re-timing the best few) is not replayed: the
    # reference's second pass, which no search saw, stands for the confirmed figures.
    with (
        mock.patch.object(sweeper.study, "Dispatcher", lookup_dispatcher(reference)),
        mock.patch.object(sweeper.study, "confirm", return_value=None),
    ):
        summary = sweeper.study._sweep(
            reference.space, options, study_dir, reference.task_ref, reference.baseline, reference.rankings,
            ignore, StopFlag(), time.time(),
        )  # fmt: skip
    driver_s = time.perf_counter() - started
    rows = results.read_table(study_dir).to_pandas()
    return RunOutcome(
        method="sweeper (TPE)", budget=budget, seed=seed, winner=_winner(rows, reference.space.objective),
        distinct=summary.distinct, repeats=summary.repeats, trial_time_s=float(rows["duration_s"].sum()),
        driver_s=driver_s,
    )  # fmt: skip


def random_search(reference: Reference, budget: int, seed: int, out: Path) -> RunOutcome:
    """``budget`` distinct configurations drawn uniformly with ``seed``; the best feasible wins."""
    started = time.perf_counter()
    picked = random.Random(seed).sample(sorted(reference.configs), budget)
    run = RunningStudy(space=reference.space, study_name=f"random-{budget}-seed{seed}", study_dir=out,
                       task_ref=reference.task_ref, baseline=reference.baseline, emit=ignore,
                       rankings=reference.rankings)  # fmt: skip
    rows = []
    for number, key in enumerate(picked):
        backend, params = reference.configs[key]
        rows.append(make_row(reference.space, run.spec(number, backend, params), reference.outcomes[key],
                             reference.baseline))  # fmt: skip
    table = pd.DataFrame(rows)
    return RunOutcome(
        method="random search", budget=budget, seed=seed, winner=_winner(table, reference.space.objective),
        distinct=len(picked), repeats=0, trial_time_s=float(table["duration_s"].sum()),
        driver_s=time.perf_counter() - started,
    )  # fmt: skip


def check_keys(reference: Reference) -> None:
    """Every configuration's key, recomputed from its parameters, is the key it is stored under."""
    from sweeper.backends import get_backend

    for key, (backend, params) in reference.configs.items():
        if config_key(backend, get_backend(backend).config(params)) != key:
            raise RuntimeError(f"the reference's key of {backend} {params} no longer matches; run with --remeasure")
