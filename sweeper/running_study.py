"""The driver's loop: ask Optuna, send new configurations to Ray, write rows, tell Optuna.

Only the driver talks to Optuna. What Optuna is told, per row:

- complete: the objective, and the constraint ``accuracy_drop - max_drop`` (feasible when <= 0);
- pruned: PRUNED, with the constraint measured on the subset it was pruned on;
- failed (the build or measurement raised): PRUNED with a large violation, so that TPE keeps
  away from it as it does from infeasible regions (Optuna ignores FAIL trials); the trial's user
  attribute ``sweeper_state`` says ``failed``, and so does its row;
- a configuration its backend rejects (a ``ConfigError``): the same, with a ``rejected:`` row that
  does not use up the budget;
- a repeat of a measured configuration: the stored outcome, and no row (see :mod:`sweeper.repeats`).
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

from sweeper import results, study_folder
from sweeper.backends import get_backend
from sweeper.dispatch import Dispatcher
from sweeper.errors import ConfigError
from sweeper.events import EventHandler, TrialFinished, TrialRecovered, TrialStarted
from sweeper.location import StudyPath
from sweeper.measure import accuracy_drop
from sweeper.repeats import Measured, config_key, rejected_key
from sweeper.rows import INTERRUPTED, REJECTED, make_row
from sweeper.sampling import suggest
from sweeper.signals import StopFlag, SweepInterrupted
from sweeper.space import Space
from sweeper.spec import FP32Baseline, TaskRef, TrialResult, TrialSpec, failed_result

# How often the loop looks at the stop flag while it waits for trials.
STOP_POLL_S = 0.5
# The constraint violation (points of accuracy) Optuna is told for a failed or rejected trial.
FAILED_VIOLATION = 1000.0


@dataclass
class RunningStudy:
    """What the driver's loop needs of the study it runs: the space, where rows go, the FP32
    baseline, the sensitivity rankings, and where progress events go."""

    space: Space
    study_name: str
    study_dir: StudyPath
    task_ref: TaskRef
    baseline: FP32Baseline
    emit: EventHandler
    rankings: dict[str, list[str]]
    storage_url: str | None = None
    seed: int | None = None

    def prune_above_drop(self) -> float | None:
        """The subset drop (metric units) beyond which a trial is pruned, if early stopping is on."""
        early = self.space.early_stop
        if early is None:
            return None
        limit = self.space.constraint.max_drop + early.margin
        if self.space.constraint.mode == "relative":
            limit = limit / 100.0 * abs(self.baseline.metric)
        return limit

    def spec(self, trial_number: int, backend: str, params: dict[str, Any]) -> TrialSpec:
        target = self.space.backend_targets.get(backend, next(iter(self.space.targets)))
        return TrialSpec(
            study=self.study_name,
            trial_number=trial_number,
            task=self.task_ref,
            backend=backend,
            params=params,
            measure=self.space.measure,
            num_threads=self.space.targets[target].num_cpus,
            artifact_dir=str(study_folder.artifact_dir(self.study_dir, trial_number)),
            target=target,
            device="cuda" if self.space.targets[target].kind == "gpu" else "cpu",
            early_stop_fraction=self.space.early_stop.fraction if self.space.early_stop else None,
            prune_above_drop=self.prune_above_drop(),
        )

    def tell(self, study: Any, trial: Any, row: dict[str, Any]) -> None:
        """Tell Optuna a trial's outcome from its row (see the module docstring)."""
        from optuna.trial import TrialState

        max_drop = self.space.constraint.max_drop
        if row["state"] == "complete":
            trial.set_constraint("accuracy_drop", row["accuracy_drop"] - max_drop)
            study.tell(trial, row[self.space.objective])
            return
        if row["state"] == "pruned" and row.get("subset_accuracy") is not None:
            drop = accuracy_drop(
                row["subset_accuracy_fp32"], row["subset_accuracy"],
                higher_is_better=self.baseline.higher_is_better, mode=self.space.constraint.mode,
            )
            trial.set_constraint("accuracy_drop", drop - max_drop)
        else:
            trial.set_constraint("accuracy_drop", FAILED_VIOLATION)
            trial.set_user_attr("sweeper_state", row["state"])
        study.tell(trial, state=TrialState.PRUNED)

    def record(self, study: Any, trial: Any, spec: TrialSpec, result: TrialResult) -> dict[str, Any]:
        """Write the trial's row, then tell Optuna: a crash in between loses nothing (see resume)."""
        if result.artifact_files is not None and result.artifact_name is not None:
            path = study_folder.write_artifact(
                self.study_dir, spec.trial_number, result.artifact_name, result.artifact_files
            )
            result = dataclasses.replace(result, artifact_files=None, artifact_path=path)
        row = make_row(self.space, spec, result, self.baseline)
        results.write_row(self.study_dir, row)
        self.tell(study, trial, row)
        study_folder.mirror_journal(self.study_dir, self.storage_url)
        self.emit(TrialFinished(row=row))
        return row

    def interrupt(self, study: Any, trial: Any, spec: TrialSpec, why: str) -> None:
        """Record a trial that was cancelled before it finished and queue it to be asked again."""
        from optuna.trial import TrialState

        result = failed_result(f"{INTERRUPTED} {why}; it is asked again on --resume")
        results.write_row(self.study_dir, make_row(self.space, spec, result, self.baseline))
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), skip_if_exists=False)
        study_folder.mirror_journal(self.study_dir, self.storage_url)
        self.emit(TrialRecovered(row=make_row(self.space, spec, result, self.baseline)))


def run_trials(study: Any, run: RunningStudy, remaining: int, max_concurrent: int, stop: StopFlag,
               measured: Measured) -> int:
    """Keep ``max_concurrent`` new configurations in flight until ``remaining`` have been built;
    return the rows written."""
    dispatcher = Dispatcher(run.space, max_concurrent)
    built = written = 0
    stop.deferred = True
    try:
        while (len(dispatcher) or (built < remaining and not measured.exhausted)) and not stop.raised:
            while built < remaining and dispatcher.has_room() and not measured.exhausted and not stop.raised:
                proposal = _propose(study, run, measured)
                if proposal is None:
                    continue
                trial, spec, key = proposal
                dispatcher.submit(spec, (trial, key))
                measured.started(key)
                built += 1
                run.emit(TrialStarted(trial_number=trial.number, backend=spec.backend, params=spec.params))
            if not len(dispatcher):
                continue
            for (trial, key), spec, result in dispatcher.wait(max_wait_s=STOP_POLL_S):
                row = run.record(study, trial, spec, result)
                written += 1
                for waiting in measured.finished(key, row):
                    run.tell(study, waiting, row)
        if stop.raised:
            _stop(study, run, dispatcher, stop, measured)
    except BaseException:
        dispatcher.cancel_all()
        raise
    finally:
        stop.deferred = False
    return written


def _propose(study: Any, run: RunningStudy, measured: Measured) -> tuple[Any, TrialSpec, str] | None:
    """Ask for a configuration; return it when it is new, else settle the trial and return None."""
    trial = _ask(study, run, measured)
    backend, params = suggest(trial, run.space, run.rankings)
    spec = run.spec(trial.number, backend, params)
    try:
        config = get_backend(backend).config(params)
    except ConfigError as exc:
        measured.streak += 1
        rejected = rejected_key(backend, params)
        if rejected in measured.rejected:  # rejected before: told the same, no second row
            run.tell(study, trial, measured.rejected[rejected])
        else:
            measured.rejected[rejected] = run.record(study, trial, spec, failed_result(f"{REJECTED} {exc}"))
        return None
    key = config_key(backend, config)
    if measured.known(key):
        stored = measured.repeat(key, trial)
        if stored is not None:
            run.tell(study, trial, stored)
        return None
    return trial, spec, key


def _ask(study: Any, run: RunningStudy, measured: Measured) -> Any:
    """The next trial: from TPE, or from a random sampler while TPE keeps repeating itself."""
    if not measured.random_next:
        return study.ask()
    import optuna

    sampler = study.sampler
    study.sampler = optuna.samplers.RandomSampler(seed=None if run.seed is None else run.seed + measured.repeats)
    try:
        return study.ask()
    finally:
        study.sampler = sampler


def _stop(study: Any, run: RunningStudy, dispatcher: Dispatcher, stop: StopFlag, measured: Measured) -> None:
    """Record the trials in flight as interrupted, settle the repeats waiting on them, and raise."""
    from optuna.trial import TrialState

    assert stop.signum is not None
    name = signal.Signals(stop.signum).name
    flights = dispatcher.cancel_all()
    for (trial, _key), spec in flights:
        run.interrupt(study, trial, spec, f"stopped by {name} while this trial was running")
    for waiting in measured.waiting.values():
        for trial in waiting:  # repeats of a cancelled trial: asked again with it on --resume
            study.tell(trial, state=TrialState.FAIL)
    raise SweepInterrupted(stop.signum, run.study_dir, interrupted=len(flights))
