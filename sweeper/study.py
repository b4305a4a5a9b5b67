"""The driver: Optuna asks, Ray tasks run trials, Optuna is told, every trial becomes a row.

Only this module talks to Optuna. Workers receive a :class:`~sweeper.spec.TrialSpec` and return a
:class:`~sweeper.spec.TrialResult`; ``max_concurrent`` trials stay in flight with ``ray.wait``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import results, study_folder
from sweeper.backends import get_backend
from sweeper.cluster import cluster_cpus, connect, worker_launch
from sweeper.errors import ConfigError, SweeperInputError, TaskError
from sweeper.events import EventHandler, SweepPhase, SweepStarted, TrialRecovered, ignore
from sweeper.exclusion import warm_start_ladder
from sweeper.location import StudyPath
from sweeper.params import Fixed, Range
from sweeper.repeats import Measured
from sweeper.rows import INTERRUPTED, counts_toward_budget, make_row
from sweeper.running_study import RunningStudy, run_trials
from sweeper.sensitivity import study_rankings
from sweeper.signals import StopFlag, StopRequested, SweepInterrupted, stop_on_signals
from sweeper.space import Space
from sweeper.spec import FP32Baseline, StudyInfo, TaskRef, failed_result
from sweeper.task import check_task_file, find_task_file, load_task, task_search_dirs
from sweeper.worker import baseline_summary


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
    proposals answered from stored results, and whether the sampler ran out of new ones."""

    study_dir: StudyPath
    rows_written: int
    wall_time_s: float
    distinct: int = 0
    repeats: int = 0
    exhausted: bool = False


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
            info, baseline = _study_info(study_dir, space, task_ref, options)
            rankings = study_rankings(space, task_ref, study_dir, dict(_first_params(space)), emit)
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
    rows = _existing_rows(study_dir)
    done = sum(1 for r in rows if counts_toward_budget(r))
    seed = options.seed if options.seed is not None else space.seed
    # A resumed study continues its sampler's stream instead of replaying its first proposals.
    seed = None if seed is None else seed + done
    study = _open_study(study_name, study_dir, options.storage, seed, n_trials)
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
    return SweepSummary(study_dir=study_dir, rows_written=written, wall_time_s=time.time() - started,
                        distinct=len(measured.rows), repeats=measured.repeats, exhausted=measured.exhausted)


def _open_study(study_name: str, study_dir: StudyPath, storage_url: str | None, seed: int | None, n_trials: int) -> Any:
    """Create or load the Optuna study, with the sampler every sweep uses."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_folder.open_storage(study_dir, storage_url)
    with warnings.catch_warnings():
        # multivariate TPE with grouping is what suits conditional (per-backend) spaces
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=max(4, min(10, n_trials // 3)),
            multivariate=True,
            group=True,
            constant_liar=True,
        )
    return optuna.create_study(
        study_name=study_name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
    )


def _existing_rows(study_dir: StudyPath) -> list[dict[str, Any]]:
    return results.read_table(study_dir).to_pylist() if results.trials_dir(study_dir).is_dir() else []


def _recover_interrupted(study: Any, run: RunningStudy) -> None:
    """Settle trials a stopped driver left running: tell what has a row, fail and re-ask the rest."""
    import optuna
    from optuna.trial import TrialState

    rows = {r["trial_number"]: r for r in _existing_rows(run.study_dir)}
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


def _study_info(
    study_dir: StudyPath, space: Space, task_ref: TaskRef, options: SweepOptions
) -> tuple[StudyInfo, FP32Baseline]:
    """Read the study's info on resume; otherwise measure the FP32 baseline once and record it."""
    existing = results.read_study_info(study_dir)
    if existing is not None:
        info = StudyInfo.from_json(existing, default_study=options.study or space.study)
        if info.baseline is None:
            raise SweeperInputError(f"'{study_dir}': study.json has no FP32 baseline; start a new study")
        changes = space_changes(info, space, task_ref)
        if changes and not options.force:
            raise SweeperInputError(
                f"cannot resume study '{info.study}': its space changed since it began ({'; '.join(changes)}). "
                "Rows measured under the old settings would mix with new ones. Resume with the space it began "
                f"with (kept in '{study_dir}/study.json'), start a new study, or pass --force to accept the change."
            )
        return info, info.baseline
    import ray

    target = space.targets[space.backend_targets[next(iter(space.backends))]]
    remote = ray.remote(baseline_summary).options(**target.ray_options(), max_retries=1)
    measure = space.measure
    try:
        baseline = ray.get(remote.remote(task_ref, measure, target.num_cpus, _first_params(space)))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, SweeperInputError):
            raise type(cause)(str(cause)) from None
        raise TaskError(
            f"task '{task_ref.name}' ({task_ref.path}) failed while building its FP32 baseline: "
            f"{type(cause).__name__}: {cause}"
        ) from None
    info = StudyInfo(
        study=options.study or space.study,
        task=task_ref.name,
        task_path=task_ref.path,
        space_path=str(space.path.resolve()),
        space=space.text or space.path.read_text(),
        baseline=baseline,
    )
    results.write_study_info(study_dir, info.to_json())
    return info, baseline


def _first_params(space: Space) -> list[tuple[str, dict[str, Any]]]:
    """One config per backend: each parameter's first value (fixed value, first choice, low end).

    Used for the preflight checks and as the configuration a sensitivity ranking is measured
    with. A backend whose first values do not make a valid config is left to its trials.
    """
    pairs = []
    for backend, params in space.backends.items():
        first = {
            key: p.value if isinstance(p, Fixed) else p.low if isinstance(p, Range) else p.values[0]
            for key, p in params.items()
        }
        try:
            get_backend(backend).config(first)
        except ConfigError:
            continue
        pairs.append((backend, first))
    return pairs


def check_calibration_samples(space: Space, task_name: str, limit: int) -> None:
    """Check the calibration sample counts a space asks for (or a backend's default, when the
    space does not set it) against the task's calibration split, before anything starts.

    Raises:
        ConfigError: naming the key, the count and the split's size.
    """
    for backend, params in space.backends.items():
        param = params.get("calibration_samples")
        if param is None:
            field = get_backend(backend).Config.model_fields.get("calibration_samples")
            if field is None or not isinstance(field.default, int) or field.default <= limit:
                continue
            raise ConfigError(
                f"{space.path}: key 'backends.{backend}': '{backend}' calibrates with {field.default} samples by "
                f"default, but task '{task_name}' has {limit} calibration samples; set calibration_samples "
                f"to 1..{limit}"
            )
        largest = (
            param.value if isinstance(param, Fixed) else param.high if isinstance(param, Range) else max(param.values)
        )
        if largest > limit:
            raise ConfigError(
                f"{space.path}: key 'backends.{backend}.calibration_samples': asks for up to {largest} "
                f"samples, but task '{task_name}' has {limit} calibration samples; allowed: 1..{limit}"
            )


# The parts of a space that change what a row means; a resumed study must keep them.
RESUME_KEYS = ("task", "objective", "constraint", "measure", "early_stop", "backends", "hardware", "targets")


def space_changes(info: StudyInfo, space: Space, task_ref: TaskRef) -> list[str]:
    """What differs between the space a study began with and ``space`` (keys of RESUME_KEYS)."""
    import yaml

    before = yaml.safe_load(info.space or "") or {}
    now = yaml.safe_load(space.text or "") or {}
    changes = [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in RESUME_KEYS
        if key != "task" and before.get(key) != now.get(key)
    ]
    if info.task and info.task != task_ref.name:
        changes.insert(0, f"task: {info.task!r} -> {task_ref.name!r}")
    return changes
