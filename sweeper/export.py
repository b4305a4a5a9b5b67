"""Exporting a chosen trial: its artifact, a config that reproduces it, and a loader snippet.

``export_trial(study_dir, to, trial=N)`` (or ``best=True``) writes::

    <to>/model.onnx | state_dict.pt | ...   the trial's artifact, copied as saved
    <to>/config.json      task, task_path, backend, params, how it was measured, the row's metrics,
                          and a confirmed finalist's confirmed figures ("confirmed")
    <to>/space.yaml       a one-backend search space fixed to these params: `sweeper run` rebuilds it
    <to>/load_model.py    reloads the artifact with sweeper and evaluates it on the task

:func:`load_exported` and :func:`evaluate_exported` do what the snippet does, in-process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sweeper import analysis, confirmed, results
from sweeper.backends import Candidate, get_backend
from sweeper.errors import SweeperInputError
from sweeper.holdout import trial_part
from sweeper.measure import agreement_pct, max_abs_error
from sweeper.spec import MeasureSettings, TaskRef
from sweeper.task import Task, load_task
from sweeper.worker import build_context, evaluate, prepare_baseline

if TYPE_CHECKING:
    import pandas as pd

EXPORT_FORMAT = 1
# The row's columns that are not measurements: who, what, when, where. Every other column of
# results.COLUMNS is a metric the export's config.json carries (so a new metric needs no list here).
NOT_METRICS = frozenset({
    "schema_version", "study", "trial_number", "state", "task", "backend", "params_json", "attempt", "target",
    "started_at", "finished_at", "excluded_layers", "error", "artifact_path", "node_id", "hostname",
})  # fmt: skip
# The finalist's confirmed figures (see sweeper.confirmed), in config.json's "confirmed" (null when
# the trial was not confirmed).
# (Every figure of sweeper.confirmed.CONFIRMED_COLUMNS but the confirmation's own bookkeeping.)
CONFIRMED_BOOKKEEPING = frozenset({
    "study", "trial_number", "confirmed_set", "confirmed_at", "confirmed_round_ms", "confirmed_source",
    "confirmed_concurrent_timings", "confirmed_error", "confirmed_settings",
})  # fmt: skip
CONFIRMED_COLUMNS = tuple(name for name, _, _ in confirmed.CONFIRMED_COLUMNS if name not in CONFIRMED_BOOKKEEPING)
INTEGER_CONFIRMED = frozenset(
    name for name, dtype, _ in confirmed.CONFIRMED_COLUMNS if pa.types.is_integer(dtype)
)
ENVIRONMENT_COLUMNS = ("device", "cpu_model", "torch_version", "onnxruntime_version", "sweeper_version")


@dataclass(frozen=True)
class Export:
    """What :func:`export_trial` wrote."""

    directory: Path
    artifact: Path
    config: Path
    space: Path
    loader: Path
    trial_number: int
    # The trial's confirmed figures (config.json's "confirmed"), None when it was not confirmed.
    confirmed: dict[str, Any] | None = None


def choose_trial(df: pd.DataFrame, *, trial: int | None, best: bool, objective: str = "latency_ms_p50") -> pd.Series:
    """Pick the row to export: trial number ``trial``, or the best feasible trial (chosen from the
    confirmed figures in a confirmed study, see :func:`sweeper.analysis.best_feasible`).

    Raises:
        SweeperInputError: for an unknown or unfinished trial, or when nothing is feasible.
    """
    if (trial is None) == (not best):
        raise SweeperInputError("give exactly one of --trial N or --best")
    if best:
        top = analysis.best_feasible(df, objective, k=1)
        if top.empty:
            close = ", ".join(str(n) for n in analysis.closest_infeasible(df)["trial_number"])
            raise SweeperInputError(
                f"no trial met the accuracy budget, so there is no best feasible trial; "
                f"export one with --trial N (closest: {close or 'none complete'})"
            )
        return top.iloc[0]
    match = df[df["trial_number"] == trial]
    if match.empty:
        known = df["trial_number"]
        raise SweeperInputError(f"the study has no trial {trial}; its trials are {known.min()}..{known.max()}")
    row = match.iloc[0]
    if row["state"] != "complete":
        raise SweeperInputError(f"trial {trial} is {row['state']}, not complete; it has no model to export")
    return row


def artifact_of(study_dir: Path, row: pd.Series) -> Path:
    """The trial's artifact: as recorded, else under this study folder (a moved study).

    Raises:
        SweeperInputError: when neither exists.
    """
    recorded = Path(str(row["artifact_path"] or ""))
    if recorded.name and recorded.exists():
        return recorded
    local = study_dir / "artifacts" / f"trial-{int(row['trial_number']):06d}" / recorded.name
    if recorded.name and local.exists():
        return local
    raise SweeperInputError(f"trial {row['trial_number']}'s artifact is missing: not at '{recorded}' nor '{local}'")


def export_trial(
    study_dir: str | Path, to: str | Path, *, trial: int | None = None, best: bool = False
) -> Export:
    """Copy a trial's artifact to ``to`` with ``config.json``, ``space.yaml`` and ``load_model.py``.

    Raises:
        SweeperInputError: for a bad choice of trial, a missing artifact or a non-empty ``to``.
    """
    study_dir, to = Path(study_dir), Path(to)
    if not results.trials_dir(study_dir).is_dir():
        raise SweeperInputError(f"'{study_dir}' is not a study folder (it has no trials/ folder)")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise SweeperInputError(f"'{to}' already exists and is not an empty folder; choose a new --to")
    settings = analysis.study_settings(study_dir)
    row = choose_trial(results.load(study_dir), trial=trial, best=best, objective=settings.objective)
    source = artifact_of(study_dir, row)
    to.mkdir(parents=True, exist_ok=True)
    target = to / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    space = settings.space
    config = {
        "sweeper_export": EXPORT_FORMAT,
        "study": row["study"],
        "trial_number": int(row["trial_number"]),
        "task": row["task"],
        "task_path": settings.task_path,
        "backend": row["backend"],
        "params": json.loads(row["params_json"] or "{}"),
        "artifact": target.name,
        "num_threads": _plain(row["num_threads"]) or 1,
        "eval_batch_size": int((space.get("measure") or {}).get("eval_batch_size", MeasureSettings().eval_batch_size)),
        "metrics": {c: _plain(row[c]) for c in results.COLUMN_NAMES if _is_metric(c) and c in row.index},
        "confirmed": _confirmed(row),
        "environment": {c: _plain(row[c]) for c in ENVIRONMENT_COLUMNS},
    }
    config_path = to / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    space_path = to / "space.yaml"
    space_path.write_text(_reproducing_space(config, space))
    loader = to / "load_model.py"
    loader.write_text(LOADER)
    return Export(directory=to, artifact=target, config=config_path, space=space_path, loader=loader,
                  trial_number=config["trial_number"], confirmed=config["confirmed"])


def _confirmed(row: pd.Series) -> dict[str, Any] | None:
    """The row's confirmed figures, or ``None`` when its trial was not a confirmed finalist."""
    if _plain(row.get("confirmed_set")) is None:
        return None
    values = {c: _plain(row.get(c)) for c in CONFIRMED_COLUMNS}
    # Whole-number columns come back as floats from the join (missing values are NaN there).
    return {c: int(v) if c in INTEGER_CONFIRMED and v is not None else v for c, v in values.items()}


def _is_metric(column: str) -> bool:
    return column not in NOT_METRICS and column not in ENVIRONMENT_COLUMNS and not column.endswith("_version")


def _plain(value: Any) -> Any:
    """A JSON-friendly Python value (numpy scalars unwrapped, missing values as None)."""
    import pandas as pd

    if value is None or (not isinstance(value, str | tuple | list) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _reproducing_space(config: dict[str, Any], space: dict[str, Any]) -> str:
    import yaml

    params = {k: {"value": v} if isinstance(v, list) else v for k, v in config["params"].items()}
    body: dict[str, Any] = {
        "task": config["task_path"] or config["task"],
        "study": f"{config['study']}-trial-{config['trial_number']}",
        "trials": 1,
        "objective": space.get("objective", "latency_ms_p50"),
        "constraint": space.get("constraint", {"max_drop": config["metrics"]["max_drop"]}),
        **{k: space[k] for k in ("hardware", "measure") if k in space},
        "backends": {config["backend"]: params},
    }
    header = (f"# Rebuilds and re-measures trial {config['trial_number']} of study '{config['study']}':\n"
              "#   sweeper run space.yaml\n")
    return header + yaml.safe_dump(body, sort_keys=False)


def load_exported(
    directory: str | Path, *, task_path: str | None = None, num_threads: int | None = None
) -> tuple[Candidate, Task, dict[str, Any]]:
    """Reload an exported artifact (what ``load_model.py`` runs): ``get_backend(...).load(...)``.

    Returns:
        The candidate, its task and the export's config.
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    backend = get_backend(config["backend"])
    backend_config = backend.Config.model_validate_json(json.dumps(config["params"]))
    task = load_task(task_path or config["task_path"])
    threads = num_threads or config["num_threads"]
    with tempfile.TemporaryDirectory(prefix="sweeper-load-") as workdir:
        ctx = build_context(task.build_model().eval(), task, Path(workdir), threads)
        candidate = backend.load(directory / config["artifact"], ctx, backend_config)
    return candidate, task, config


def evaluate_exported(directory: str | Path, *, task_path: str | None = None) -> dict[str, float]:
    """Reload an export and measure it on the task's evaluation split as its trial did (same
    evaluation batch size and thread count).

    Returns:
        ``accuracy`` (the task metric), and against the FP32 model's outputs ``agreement`` and
        ``output_max_abs_error``: the row's columns of the same names.
    """
    import torch

    candidate, task, config = load_exported(directory, task_path=task_path)
    keep = trial_part(task, config["eval_batch_size"])
    outputs, labels = evaluate(candidate.predict, task, config["eval_batch_size"], keep)
    threads = torch.get_num_threads()
    torch.set_num_threads(config["num_threads"])  # the FP32 reference is computed as the trial did
    try:
        ref = TaskRef(name=config["task"], path=task_path or config["task_path"])
        baseline = prepare_baseline(ref, config["eval_batch_size"])
    finally:
        torch.set_num_threads(threads)
    return {
        "accuracy": task.metric(outputs, labels),
        "agreement": agreement_pct(baseline.outputs, outputs),
        "output_max_abs_error": max_abs_error(baseline.outputs, outputs),
    }


# What load_model.py holds: load_exported below, spelled out for a reader of the export folder.
LOADER = '''"""Reload this exported model with sweeper and evaluate it on its task.

    python load_model.py [TASK_FILE]

TASK_FILE overrides config.json's task_path (for a copy on another machine). Needs sweeper
installed (pip install sweeper) and the task module.
"""

import json
import sys
import tempfile
from pathlib import Path

from sweeper.backends import get_backend
from sweeper.holdout import trial_part
from sweeper.task import load_task
from sweeper.worker import build_context, evaluate

here = Path(__file__).resolve().parent
config = json.loads((here / "config.json").read_text())
task = load_task(sys.argv[1] if len(sys.argv) > 1 else config["task_path"])
backend = get_backend(config["backend"])
backend_config = backend.Config.model_validate_json(json.dumps(config["params"]))
with tempfile.TemporaryDirectory() as workdir:
    ctx = build_context(task.build_model().eval(), task, Path(workdir), config["num_threads"])
    model = backend.load(here / config["artifact"], ctx, backend_config)

# model.predict({"input": array}) -> logits as a numpy array; inputs as task.example_inputs(1).
# Scored as its trial was: on the trial part of the evaluation split (the rest is held out for
# the finalists' confirmation, see config.json's "confirmed").
keep = trial_part(task, config["eval_batch_size"])
outputs, labels = evaluate(model.predict, task, config["eval_batch_size"], keep)
metric = task.metric(outputs, labels)
recorded = config["metrics"]["accuracy"]
print(json.dumps({"backend": config["backend"], "trial": config["trial_number"],
                  config["metrics"]["metric_name"]: metric, "recorded": recorded}))
'''
