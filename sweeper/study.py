"""The driver: Optuna asks, Ray tasks run trials, Optuna is told, every trial becomes a row.

Only this module talks to Optuna. Workers receive a :class:`~sweeper.spec.TrialSpec` and return a
:class:`~sweeper.spec.TrialResult`; ``max_concurrent`` trials stay in flight with ``ray.wait``.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import results, study_folder
from sweeper.backends import get_backend
from sweeper.cluster import check_address, cluster_cpus, connect, worker_launch
from sweeper.dispatch import Dispatcher
from sweeper.errors import ConfigError, SweeperInputError
from sweeper.events import EventHandler, SweepPhase, SweepStarted, TrialFinished, TrialRecovered, TrialStarted, ignore
from sweeper.exclusion import revert_trials, warm_start_ladder
from sweeper.finalists import confirm
from sweeper.location import StudyPath
from sweeper.measure import accuracy_drop
from sweeper.repeats import Measured, config_key, rejected_key
from sweeper.rows import counts_toward_budget, make_row
from sweeper.sampling import suggest
from sweeper.sensitivity import study_rankings
from sweeper.signals import StopFlag, StopRequested, SweepInterrupted, stop_on_signals
from sweeper.space import Space
from sweeper.spec import INTERRUPTED, REJECTED, FP32Baseline, TaskRef, TrialResult, TrialSpec, failed_result
from sweeper.study_setup import (
    check_calibration_samples,
    existing_rows,
    first_params,
    open_optuna_study,
    study_info,
)
from sweeper.task import check_task_file, find_task_file, load_task, task_search_dirs


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """How to run a sweep; ``None`` fields fall back to the space file."""

    out: str | Path = Path("results")
    study: str | None = None
    storage: str | None = None
    task: str | None = None
    trials: int | None = None
    max_concurrent: int | None = None
    seed: int | None = None
    address: str | None = None
    resume: bool = False
    # Resume although the space changed since the study began.
    force: bool = False
    debug: bool = False
    task_dirs: tuple[Path, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep did: rows written, distinct configurations measured in the study, repeat
    proposals answered from stored results, whether the sampler ran out of new ones, and how many
    finalists this run confirmed (0 when the newest confirmation set already covered them)."""

    study_dir: StudyPath
    rows_written: int
    wall_time_s: float
    distinct: int = 0
    repeats: int = 0
    exhausted: bool = False
    confirmed: int = 0


def run_sweep(space: Space, options: SweepOptions, on_event: EventHandler | None = None) -> SweepSummary:
    """Run (or resume) the sweep described by ``space`` and ``options``.

    Raises:
        SweeperInputError: for bad input, before any trial starts and leaving nothing behind.
    """
    emit = on_event or ignore
    started = time.time()
    study_name = options.study or space.study
    task_name = options.task or space.task
    task_path = check_task_file(find_task_file(task_name, task_search_dirs(space.path, options.task_dirs)))
    task = load_task(str(task_path))
    check_calibration_samples(space, task.name, task.calibration_size)

    # On an existing cluster the workers find the task through a runtime env (see cluster.py).
    launch = worker_launch(options.address, task_path)
    task_ref = TaskRef(name=task_path.stem, path=launch.task_path)
    if options.address is not None:
        check_address(options.address)  # a bad address is one line, before anything starts
    study_dir = study_folder.prepare(options.out, study_name, options.resume)
    created = not options.resume
    with stop_on_signals() as stop:
        try:
            emit(SweepPhase(text=f"joining the Ray cluster at {options.address}" if options.address
                            else "starting an embedded local Ray"))
            connect(options.address, env=launch.runtime_env, debug=options.debug)
            stop.install()
            if results.read_study_info(study_dir) is None:
                emit(SweepPhase(text=f"measuring the FP32 baseline of {task_ref.name} (its model trains on first use)"))
            info, baseline = study_info(study_dir, space, task_ref, options.study or space.study, options.force)
            rankings = study_rankings(space, task_ref, study_dir, dict(first_params(space)), emit)
        except SweeperInputError:
            if created:
                study_folder.remove(study_dir)
            raise
        except StopRequested as exc:
            if created and results.read_study_info(study_dir) is None:
                study_folder.remove(study_dir)  # stopped before the study began
            raise SweepInterrupted(exc.signum, study_dir, interrupted=0) from None
        try:
            return _sweep(space, options, study_dir, task_ref, baseline, rankings, emit, stop, started)
        except StopRequested as exc:  # a second signal: trials left running are recovered on --resume
            raise SweepInterrupted(exc.signum, study_dir, interrupted=0) from None


def _sweep(
    space: Space,
    options: SweepOptions,
    study_dir: StudyPath,
    task_ref: TaskRef,
    baseline: FP32Baseline,
    rankings: dict[str, list[str]],
    emit: EventHandler,
    stop: StopFlag,
    started: float,
) -> SweepSummary:
    study_name = options.study or space.study
    n_trials = options.trials or space.trials
    rows = existing_rows(study_dir)
    done = sum(1 for r in rows if counts_toward_budget(r))
    seed = options.seed if options.seed is not None else space.seed
    # A resumed study continues its sampler's stream instead of replaying its first proposals.
    seed = None if seed is None else seed + done
    study = open_optuna_study(study_name, study_dir, options.storage, seed, n_trials)
    run = RunningStudy(space=space, study_name=study_name, study_dir=study_dir, task_ref=task_ref, baseline=baseline,
                       emit=emit, rankings=rankings, storage_url=options.storage, seed=seed)
    _recover_interrupted(study, run)
    if not study.trials:
        for backend, search in space.exclusions.items():
            for params in warm_start_ladder(backend, search):
                study.enqueue_trial(params)
    measured = Measured.from_rows(rows, counts_toward_budget)
    remaining = max(0, n_trials - done)
    max_concurrent = options.max_concurrent or space.max_concurrent
    if max_concurrent is None:
        max_concurrent = max(1, cluster_cpus() // min(t.num_cpus for t in space.targets.values()))
    emit(SweepStarted(study=study_name, study_dir=str(study_dir), trials=remaining, done=done,
                      max_concurrent=max_concurrent, accuracy_fp32=baseline.metric))
    written = run_trials(study, run, remaining, max_concurrent, stop, measured)
    # The budget is spent (a stop raises above): the finalists are confirmed on the held-out split.
    confirmation = confirm(space, study_name, study_dir, task_ref, baseline, existing_rows(study_dir), emit)
    return SweepSummary(study_dir=study_dir, rows_written=written, wall_time_s=time.time() - started,
                        distinct=len(measured.rows), repeats=measured.repeats, exhausted=measured.exhausted,
                        confirmed=len(confirmation or ()))


def _recover_interrupted(study: Any, run: RunningStudy) -> None:
    """Settle trials a stopped driver left running: tell what has a row, fail and re-ask the rest."""
    import optuna
    from optuna.trial import TrialState

    rows = {r["trial_number"]: r for r in existing_rows(run.study_dir)}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = rows.get(frozen.number)
        if row is not None:  # the row was written but the driver stopped before telling Optuna
            if (row.get("error") or "").startswith(INTERRUPTED):  # an interrupted row: ask the trial again
                study.tell(frozen.number, state=TrialState.FAIL)
                study.enqueue_trial(dict(frozen.params), skip_if_exists=False)
            else:
                run.tell(study, optuna.trial.Trial(study, frozen._trial_id), row)
            continue
        backend = frozen.params.get("backend", "")
        spec = run.spec(frozen.number, backend, {})
        result = failed_result(f"{INTERRUPTED} the driver stopped while this trial was running; it was asked again")
        row = make_row(run.space, spec, result, run.baseline)
        row["params_json"] = None
        results.write_row(run.study_dir, row)
        study.tell(frozen.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(frozen.params), skip_if_exists=False)
        run.emit(TrialRecovered(row=row))


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

    def max_drop_points(self) -> float | None:
        """The constraint in the metric's units (points for top-1 accuracy), for the pruning bound."""
        max_drop = self.space.constraint.max_drop
        if self.space.constraint.mode == "relative":
            return max_drop / 100.0 * abs(self.baseline.metric)
        return max_drop

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
            max_drop_points=self.max_drop_points(),
            prune_confidence=self.space.early_stop.confidence if self.space.early_stop else 0.95,
            subset_seed=self.seed or 0,
            fp32_fingerprint=self.baseline.fingerprint,
        )

    def tell(self, study: Any, trial: Any, row: dict[str, Any]) -> None:
        """Tell Optuna a trial's outcome from its row (see the module docstring)."""
        from optuna.trial import TrialState

        max_drop = self.space.constraint.max_drop
        if row["state"] == "complete":
            trial.set_constraint("accuracy_drop", row["accuracy_drop"] - max_drop)
            value = row.get("objective_value")
            study.tell(trial, row[self.space.objective] if value is None else value)
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
        row = make_row(self.space, spec, result, self.baseline)
        results.write_row(self.study_dir, row)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), skip_if_exists=False)
        study_folder.mirror_journal(self.study_dir, self.storage_url)
        self.emit(TrialRecovered(row=row))


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
                if run.space.exclusions:  # rows in memory: no re-reading of the study folder per trial
                    trials = study.get_trials(deepcopy=False)
                    for params in revert_trials(trials, measured.rows.values(), run.space.exclusions):
                        study.enqueue_trial(params, skip_if_exists=False)
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
        _refuse_float_form(run, backend, params)
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


def _refuse_float_form(run: RunningStudy, backend: str, params: dict[str, Any]) -> None:
    """A quantizing configuration that leaves every quantizable layer in float is the FP32 model
    under another name: refuse it (a ``rejected:`` row, no budget) rather than report it as INT8."""
    field = get_backend(backend).exclusion_field
    ranking = run.rankings.get(backend)
    if field is None or not ranking or not set(ranking) <= set(params.get(field) or ()):
        return
    raise ConfigError(
        f"{backend}: excludes all {len(ranking)} quantizable layers, which leaves the FP32 model in float "
        "(its float form, measured by the FP32 backends), not a quantized one"
    )


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
