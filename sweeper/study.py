"""The driver: Optuna asks, Ray tasks run trials, Optuna is told, every trial becomes a row.

Only this module talks to Optuna. Workers receive a :class:`~sweeper.spec.TrialSpec` and return a
:class:`~sweeper.spec.TrialResult`; ``max_concurrent`` trials stay in flight with ``ray.wait``.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import results
from sweeper.errors import ConfigError, SweeperInputError
from sweeper.exclusion import study_rankings, warm_start_ladder
from sweeper.params import Fixed, Range
from sweeper.rows import INTERRUPTED, counts_toward_budget, failed_result, make_row
from sweeper.sampling import config_for, suggest
from sweeper.space import Space
from sweeper.spec import MeasureSettings, TaskRef, TrialResult, TrialSpec
from sweeper.task import check_task_file, find_task_file, task_search_dirs

EventHandler = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """How to run a sweep; ``None`` fields fall back to the space file."""

    out: Path = Path("results")
    study: str | None = None
    task: str | None = None
    trials: int | None = None
    max_concurrent: int | None = None
    seed: int | None = None
    address: str | None = None
    resume: bool = False
    debug: bool = False
    task_dirs: tuple[Path, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SweepSummary:
    study_dir: Path
    rows_written: int
    wall_time_s: float


def run_sweep(space: Space, options: SweepOptions, on_event: EventHandler | None = None) -> SweepSummary:
    """Run (or resume) the sweep described by ``space`` and ``options``.

    Raises:
        SweeperInputError: for bad input, before any trial starts and leaving nothing behind.
    """
    import optuna

    emit = on_event or (lambda kind, data: None)
    started = time.time()
    study_name = options.study or space.study
    task_name = options.task or space.task
    task_path = check_task_file(find_task_file(task_name, task_search_dirs(space.path, options.task_dirs)))
    # On an existing cluster the task's folder is the workers' working directory (see cluster.py).
    task_ref = TaskRef(name=task_path.stem, path=task_path.name if options.address else str(task_path))
    study_dir = _prepare_study_dir(options.out, study_name, options.resume)
    created = not options.resume
    try:
        from sweeper.cluster import cluster_cpus, connect, runtime_env

        connect(options.address, env=runtime_env(task_path.parent) if options.address else None, debug=options.debug)
        info = _study_info(study_dir, space, task_ref, options)
        _check_against_task(space, info)
        rankings = study_rankings(space, task_ref, study_dir, dict(_first_params(space)), emit)
    except SweeperInputError:
        if created:
            shutil.rmtree(study_dir, ignore_errors=True)
        raise
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    seed = options.seed if options.seed is not None else space.seed
    n_trials = options.trials or space.trials
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
    study = optuna.create_study(
        study_name=study_name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
    )
    ctx = _Context(space=space, study_name=study_name, study_dir=study_dir, task_ref=task_ref, info=info,
                   emit=emit, rankings=rankings)
    _recover_interrupted(study, ctx)
    if not study.trials:
        for backend, spec in space.exclusions.items():
            for params in warm_start_ladder(backend, spec):
                study.enqueue_trial(params)
    done = sum(1 for r in _existing_rows(study_dir) if counts_toward_budget(r))
    remaining = max(0, n_trials - done)
    max_concurrent = options.max_concurrent or space.max_concurrent
    if max_concurrent is None:
        max_concurrent = max(1, cluster_cpus() // min(t.num_cpus for t in space.targets.values()))
    emit("start", {"study": study_name, "study_dir": str(study_dir), "trials": remaining, "done": done,
                   "max_concurrent": max_concurrent, "accuracy_fp32": info["baseline"]["metric"]})
    written = _loop(study, ctx, remaining, max_concurrent)
    return SweepSummary(study_dir=study_dir, rows_written=written, wall_time_s=time.time() - started)


@dataclass
class _Context:
    space: Space
    study_name: str
    study_dir: Path
    task_ref: TaskRef
    info: dict[str, Any]
    emit: EventHandler
    rankings: dict[str, list[str]]

    def prune_above_drop(self) -> float | None:
        """The subset drop (metric units) beyond which a trial is pruned, if early stopping is on."""
        early = self.space.early_stop
        if early is None:
            return None
        limit = self.space.constraint.max_drop + early.margin
        if self.space.constraint.mode == "relative":
            limit = limit / 100.0 * abs(self.info["baseline"]["metric"])
        return limit

    def spec(self, trial_number: int, backend: str, params: dict[str, Any]) -> TrialSpec:
        target = self.space.backend_targets.get(backend, next(iter(self.space.targets)))
        return TrialSpec(
            study=self.study_name,
            trial_number=trial_number,
            task=self.task_ref,
            backend=backend,
            params=params,
            measure=MeasureSettings(**self.space.measure.model_dump()),
            num_threads=self.space.targets[target].num_cpus,
            artifact_dir=str(self.study_dir / "artifacts" / f"trial-{trial_number:06d}"),
            target=target,
            device="cuda" if self.space.targets[target].kind == "gpu" else "cpu",
            early_stop_fraction=self.space.early_stop.fraction if self.space.early_stop else None,
            prune_above_drop=self.prune_above_drop(),
        )

    def record(self, study: Any, trial: Any, spec: TrialSpec, result: TrialResult) -> dict[str, Any]:
        """Write the trial's row, then tell Optuna: a crash in between loses nothing (see resume)."""
        from optuna.trial import TrialState

        row = make_row(self.space, spec, result, self.info["baseline"])
        results.write_row(self.study_dir, row)
        if row["state"] == "complete":
            trial.set_constraint("accuracy_drop", row["accuracy_drop"] - self.space.constraint.max_drop)
            study.tell(trial, row[self.space.objective])
        else:
            study.tell(trial, state=TrialState.PRUNED if row["state"] == "pruned" else TrialState.FAIL)
        self.emit("finished", row)
        return row


def _loop(study: Any, ctx: _Context, remaining: int, max_concurrent: int) -> int:
    from sweeper.dispatch import Dispatcher

    dispatcher = Dispatcher(ctx.space, max_concurrent)
    asked = written = 0
    try:
        while asked < remaining or len(dispatcher):
            while asked < remaining and dispatcher.has_room():
                trial = study.ask()
                asked += 1
                backend, params = suggest(trial, ctx.space, ctx.rankings)
                spec = ctx.spec(trial.number, backend, params)
                try:
                    config_for(backend, params)
                except ConfigError as exc:
                    ctx.record(study, trial, spec, failed_result(str(exc)))
                    written += 1
                    continue
                dispatcher.submit(spec, trial)
                ctx.emit("started", {"trial_number": trial.number, "backend": backend, "params": params})
            if not len(dispatcher):
                continue
            for trial, spec, result in dispatcher.wait():
                ctx.record(study, trial, spec, result)
                written += 1
    except BaseException:
        dispatcher.cancel_all()
        raise
    return written


def _existing_rows(study_dir: Path) -> list[dict[str, Any]]:
    return results.read_table(study_dir).to_pylist() if results.trials_dir(study_dir).is_dir() else []


def _recover_interrupted(study: Any, ctx: _Context) -> None:
    """Settle trials a stopped driver left running: tell what has a row, fail and re-ask the rest."""
    import optuna
    from optuna.trial import TrialState

    rows = {r["trial_number"]: r for r in _existing_rows(ctx.study_dir)}
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        row = rows.get(frozen.number)
        if row is not None:  # the row was written but the driver stopped before telling Optuna
            if row["state"] == "complete":
                trial = optuna.trial.Trial(study, frozen._trial_id)
                trial.set_constraint("accuracy_drop", row["accuracy_drop"] - ctx.space.constraint.max_drop)
                study.tell(trial, row[ctx.space.objective])
            else:
                study.tell(frozen.number, state=TrialState.FAIL)
            continue
        backend = frozen.params.get("backend", "")
        spec = ctx.spec(frozen.number, backend, {})
        result = failed_result(f"{INTERRUPTED} the driver stopped while this trial was running; it was asked again")
        row = make_row(ctx.space, spec, result, ctx.info["baseline"])
        row["params_json"] = None
        results.write_row(ctx.study_dir, row)
        study.tell(frozen.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(frozen.params), skip_if_exists=False)
        ctx.emit("recovered", row)


def _prepare_study_dir(out: Path, study: str, resume: bool) -> Path:
    study_dir = out / study
    if out.exists() and not out.is_dir():
        raise SweeperInputError(f"--out '{out}' is a file; give a folder for the results")
    existing = study_dir / "study.json"
    if resume:
        if not existing.is_file():
            raise SweeperInputError(
                f"cannot resume study '{study}': there is no study in '{study_dir}'. "
                "Run without --resume to start it, or give the --out and --study of an existing study."
            )
        info = results.read_study_info(study_dir) or {}
        if info.get("schema_version") != results.SCHEMA_VERSION:
            raise SweeperInputError(
                f"'{study_dir}' holds a study of results schema {info.get('schema_version')!r}; this "
                f"sweeper writes schema {results.SCHEMA_VERSION} and cannot resume it. Start a new study."
            )
        return study_dir
    if study_dir.exists() and any(study_dir.iterdir()):
        raise SweeperInputError(
            f"'{study_dir}' already holds a study named '{study}'. Pass --resume to continue it, "
            "or choose another --study name or --out folder."
        )
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SweeperInputError(
            f"cannot write results to '{study_dir}' ({exc.strerror}); give a writable --out folder"
        ) from None
    return study_dir


def _study_info(study_dir: Path, space: Space, task_ref: TaskRef, options: SweepOptions) -> dict[str, Any]:
    """Read the study's info on resume; otherwise measure the FP32 baseline once and record it."""
    existing = results.read_study_info(study_dir)
    if existing is not None:
        return existing
    import ray

    from sweeper.errors import TaskError
    from sweeper.trial import baseline_summary

    target = space.targets[space.backend_targets[next(iter(space.backends))]]
    remote = ray.remote(baseline_summary).options(**target.ray_options(), max_retries=1)
    measure = MeasureSettings(**space.measure.model_dump())
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
    baseline["environment"] = vars(baseline["environment"])
    info = {
        "study": options.study or space.study,
        "task": task_ref.name,
        "task_path": task_ref.path,
        "space_path": str(space.path.resolve()),
        "space": space.path.read_text(),
        "baseline": baseline,
    }
    results.write_study_info(study_dir, info)
    return info


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
            config_for(backend, first)
        except ConfigError:
            continue
        pairs.append((backend, first))
    return pairs


def _check_against_task(space: Space, info: dict[str, Any]) -> None:
    """Check what only the task can tell: calibration sample counts within its calibration split."""
    limit = info["baseline"]["calibration_size"]
    for backend, params in space.backends.items():
        param = params.get("calibration_samples")
        if param is None:
            continue
        largest = param.value if isinstance(param, Fixed) else param.high if isinstance(param, Range) else max(param.values)
        if largest > limit:
            raise ConfigError(
                f"{space.path}: key 'backends.{backend}.calibration_samples': asks for up to {largest} "
                f"samples, but task '{info['task']}' has {limit} calibration samples; allowed: 1..{limit}"
            )
