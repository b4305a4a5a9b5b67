"""What a study needs before its first trial: its Optuna study, its FP32 baseline and study.json,
the checks of the space against the task, and what a resume may not change.

Only the driver uses this module (it talks to Optuna and starts the baseline's Ray task).
"""

from __future__ import annotations

import warnings
from typing import Any

from sweeper import results, study_folder
from sweeper.backends import get_backend
from sweeper.confirmation import baseline_summary
from sweeper.errors import ConfigError, SweeperInputError, TaskError
from sweeper.location import StudyPath
from sweeper.params import Fixed, Range
from sweeper.space import Space
from sweeper.spec import FP32Baseline, StudyInfo, TaskRef


def open_optuna_study(
    study_name: str, study_dir: StudyPath, storage_url: str | None, seed: int | None, n_trials: int
) -> Any:
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


def existing_rows(study_dir: StudyPath) -> list[dict[str, Any]]:
    return results.read_table(study_dir).to_pylist() if results.trials_dir(study_dir).is_dir() else []


def study_info(
    study_dir: StudyPath, space: Space, task_ref: TaskRef, study_name: str, force: bool
) -> tuple[StudyInfo, FP32Baseline]:
    """Read the study's info on resume; otherwise measure the FP32 baseline once and record it."""
    existing = results.read_study_info(study_dir)
    if existing is not None:
        info = StudyInfo.from_json(existing, default_study=study_name)
        if info.baseline is None:
            raise SweeperInputError(f"'{study_dir}': study.json has no FP32 baseline; start a new study")
        changes = space_changes(info, space, task_ref)
        if changes and not force:
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
        device = "cuda" if target.kind == "gpu" else "cpu"
        baseline = ray.get(remote.remote(task_ref, measure, target.num_cpus, first_params(space), device))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, SweeperInputError):
            raise type(cause)(str(cause)) from None
        raise TaskError(
            f"task '{task_ref.name}' ({task_ref.path}) failed while building its FP32 baseline: "
            f"{type(cause).__name__}: {cause}"
        ) from None
    info = StudyInfo(
        study=study_name,
        task=task_ref.name,
        task_path=task_ref.path,
        space_path=str(space.path.resolve()),
        space=space.text or space.path.read_text(),
        baseline=baseline,
    )
    results.write_study_info(study_dir, info.to_json())
    return info, baseline


def first_params(space: Space) -> list[tuple[str, dict[str, Any]]]:
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
    if info.baseline is not None and info.baseline.confirm_split is None:
        changes.append(
            "evaluation split: the study's trials were scored on the whole evaluation split; trials are now "
            "scored on part of it, the rest held out to confirm the finalists"
        )
    return changes
