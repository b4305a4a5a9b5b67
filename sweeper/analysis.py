"""Reading a study's rows: best feasible trials, the Pareto front, per-backend figures, and the
layer-sensitivity table joined with the trials that excluded those layers.

Parameter importance, which needs the stored Optuna study, is in :mod:`sweeper.importance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper import results
from sweeper.location import StudyPath, location
from sweeper.spec import FP32Baseline, StudyInfo

if TYPE_CHECKING:
    import pandas as pd

PARETO_OBJECTIVES: tuple[str, ...] = ("latency_ms_p50", "accuracy_drop", "size_bytes")
SENSITIVITY_FILE = "sensitivity.parquet"
SENSITIVITY_COLUMNS: tuple[str, ...] = ("layer", "op_type", "metric_drop", "output_error", "rank")
# The row column listing the layers a trial left unquantized, whatever the backend calls its
# exclusion field (``nodes_to_exclude``, ``excluded_layers``): see sweeper.rows.
EXCLUDED_COLUMN = "excluded_layers"
# Row columns where more is better; every other objective (latency, size, drop) is minimised.
HIGHER_IS_BETTER: frozenset[str] = frozenset({"speedup", "accuracy", "agreement"})


def maximised(objective: str, *, metric_higher_is_better: bool = True) -> bool:
    """Whether ranking by ``objective`` puts the largest value first.

    ``speedup`` and ``agreement`` are maximised; ``accuracy`` follows the task metric's direction
    (``metric_higher_is_better``, as ``study.json``'s baseline records it); everything else
    (latency, size, accuracy drop) is minimised.
    """
    if objective == "accuracy":
        return metric_higher_is_better
    return objective in HIGHER_IS_BETTER


@dataclass(frozen=True)
class StudySettings:
    """What ``study.json`` says about a study, its space file parsed (``space``)."""

    study: str
    task: str | None
    task_path: str | None
    objective: str
    space: dict[str, Any]
    baseline: FP32Baseline | None


def study_settings(study_dir: str | StudyPath) -> StudySettings:
    """What ``study.json`` says about a study: name, task, task_path, objective, the parsed space
    file (``space``) and the FP32 ``baseline``; defaults where the file or a key is missing."""
    import yaml

    folder = location(study_dir)
    info = StudyInfo.from_json(results.read_study_info(folder) or {}, default_study=folder.name)
    space = yaml.safe_load(info.space or "") or {}
    return StudySettings(
        study=info.study,
        task=info.task,
        task_path=info.task_path,
        objective=space.get("objective", "latency_ms_p50"),
        space=space,
        baseline=info.baseline,
    )


def confirmed_study(df: pd.DataFrame) -> bool:
    """Whether the rows carry a confirmation set's figures (``sweeper.load`` joins the newest)."""
    return "confirmed_set" in df.columns and bool(df["confirmed_set"].notna().any())


def best_feasible(
    df: pd.DataFrame, objective: str = "latency_ms_p50", k: int = 5, *, maximise: bool | None = None
) -> pd.DataFrame:
    """The ``k`` best complete, feasible trials by ``objective``, best first.

    In a confirmed study the finalists that stayed within the budget on the confirmation split
    come first, by their confirmed figures: in confirmation rank for ``latency_ms_p50`` and
    ``speedup`` (tie groups, the simplest first inside one; see :mod:`sweeper.confirmed`), else by
    ``confirmed_<objective>`` where there is such a column. The trials that were not finalists
    follow by their own figures, then the finalists the confirmation found over the budget.

    ``maximise`` defaults to :func:`maximised` (largest first for ``speedup``, ``accuracy`` and
    ``agreement``; smallest first otherwise). Ties go to the earlier trial.
    """
    if maximise is None:
        maximise = maximised(objective)
    ok = df[(df["state"] == "complete") & df["feasible"].fillna(False).astype(bool)]
    order = {"by": [objective, "trial_number"], "ascending": [not maximise, True]}
    if not confirmed_study(ok):
        return ok.sort_values(**order).head(k)
    import pandas as pd

    finalist = ok["confirmed_set"].notna()
    held = finalist & ok["confirmed_feasible"].astype("boolean").fillna(False).astype(bool)
    if objective in RANKED_BY_CONFIRMATION:
        first = ok[held].sort_values("confirmed_rank")
    else:
        column = f"confirmed_{objective}" if f"confirmed_{objective}" in ok.columns else objective
        first = ok[held].sort_values([column, "trial_number"], ascending=[not maximise, True])
    parts = [first, ok[~finalist].sort_values(**order), ok[finalist & ~held].sort_values(**order)]
    return pd.concat([p for p in parts if not p.empty] or [ok.head(0)]).head(k)


def confirmed_within_budget(row: Any) -> bool:
    """Whether a row (a Series or a named tuple) is a finalist confirmed within the budget."""
    value = row.get("confirmed_feasible") if hasattr(row, "get") else getattr(row, "confirmed_feasible", None)
    return isinstance(value, bool | np.bool_) and bool(value)


# The objectives a confirmation's rank orders (by confirmed median latency, with ties).
RANKED_BY_CONFIRMATION = frozenset({"latency_ms_p50", "speedup"})


def ties_of(df: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The other finalists in ``row``'s tie group (confirmed latencies within the timing noise),
    simplest first; empty for a trial that was not confirmed."""
    group = row.get("confirmed_tie_group")
    if not confirmed_study(df) or group is None or group != group:  # NaN: not a finalist
        return df.head(0)
    same = (df["study"] == row["study"]) & (df["confirmed_tie_group"] == group)
    return df[same & (df["trial_number"] != row["trial_number"])].sort_values("confirmed_rank")


# Accuracy budgets of the "what each point buys" table, in the study's drop units.
BUDGETS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)


def best_by_budget(df: pd.DataFrame, budgets: tuple[float, ...] = BUDGETS) -> pd.DataFrame:
    """For each accuracy budget, the fastest complete trial within it: by confirmed figures where
    the trial was confirmed (its confirmed drop and median latency), else by its own. A fastest
    finalist tied with a simpler one gives way to it, as the winner does.

    "Fastest" is the largest speedup over the FP32 model timed in the same rounds (the trial's own,
    or the confirmation's) when every trial within the budget has one: raw latencies of trials
    timed minutes apart, and of confirmation rounds, carry the machine's drift between them.
    Without speedups (an older study) it is the smallest latency.

    Columns: ``max_drop``, ``trial_number``, ``backend``, ``latency_ms_p50``, ``accuracy_drop``,
    ``speedup``, ``figures`` (``confirmed`` or ``trial``); a budget nothing meets has missing values.
    """
    import pandas as pd

    done = df[df["state"] == "complete"]
    confirmed = done["confirmed_latency_ms_p50"].notna() if "confirmed_latency_ms_p50" in done.columns else None
    pick = (lambda c: done[f"confirmed_{c}"].where(confirmed, done[c])) if confirmed is not None else done.get
    table = pd.DataFrame({
        "trial_number": done["trial_number"], "backend": done["backend"], "latency_ms_p50": pick("latency_ms_p50"),
        "accuracy_drop": pick("accuracy_drop"), "speedup": pick("speedup"),
        "figures": ["confirmed" if c else "trial" for c in (confirmed if confirmed is not None else [0] * len(done))],
    }).dropna(subset=["latency_ms_p50", "accuracy_drop"])
    # A finalist tied with the fastest and ranked before it (the simpler) stands for the group.
    no_group = pd.Series(np.nan, index=done.index)
    group = no_group if confirmed is None else done.get("confirmed_tie_group", no_group).where(confirmed, np.nan)
    order = done.get("confirmed_rank", pd.Series(np.nan, index=done.index))
    rows = []
    for budget in budgets:
        within = table[table["accuracy_drop"] <= budget]
        if within["speedup"].notna().all():
            within = within.sort_values(["speedup", "trial_number"], ascending=[False, True])
        else:
            within = within.sort_values(["latency_ms_p50", "trial_number"])
        if not within.empty and pd.notna(group[within.index[0]]):
            tied = within[group[within.index] == group[within.index[0]]]
            within = within.loc[[order[tied.index].idxmin()]]
        rows.append({"max_drop": budget, **(within.iloc[0].to_dict() if not within.empty else {})})
    return pd.DataFrame(rows, columns=["max_drop", *table.columns])


def closest_infeasible(df: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """The ``k`` complete trials with the smallest accuracy drop (for a 'nothing feasible' verdict)."""
    done = df[df["state"] == "complete"]
    return done.sort_values(["accuracy_drop", "latency_ms_p50"]).head(k)


def state_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of rows in each state."""
    return {state: int((df["state"] == state).sum()) for state in ("complete", "failed", "pruned")}


def pareto_front(
    df: pd.DataFrame, objectives: tuple[str, ...] = PARETO_OBJECTIVES, *, feasible_only: bool = False
) -> pd.DataFrame:
    """The complete trials no other complete trial dominates, all ``objectives`` minimised.

    A trial dominates another when it is no worse in every objective and better in at least one;
    trials with identical figures do not dominate each other, so both stay on the front. Rows
    missing any objective are left out. With ``feasible_only``, only feasible trials compete.
    The result is sorted by the first objective.
    """
    done = df[df["state"] == "complete"].dropna(subset=list(objectives))
    if feasible_only:
        done = done[done["feasible"].fillna(False).astype(bool)]
    points = done[list(objectives)].to_numpy(dtype=float)
    keep = ~dominated(points)
    return done[keep].sort_values([*objectives, "trial_number"])


def dominated(points: np.ndarray) -> np.ndarray:
    """For each row of ``points`` (minimised), whether another row dominates it."""
    # One row at a time keeps memory linear in the number of trials.
    out = np.zeros(len(points), dtype=bool)
    for i, point in enumerate(points):
        out[i] = bool(((points <= point).all(axis=1) & (points < point).any(axis=1)).any())
    return out


def backend_summary(df: pd.DataFrame, objective: str = "latency_ms_p50") -> pd.DataFrame:
    """One row per backend: trial counts, best feasible objective, median and best speedup, drops, size.

    Sorted by the best feasible objective, best first (backends with no feasible trial last);
    the objective's direction is :func:`maximised`'s.
    """
    import pandas as pd

    maximise = maximised(objective)
    rows = []
    for backend, group in df.groupby("backend", sort=True):
        done = group[group["state"] == "complete"]
        ok = done[done["feasible"].fillna(False).astype(bool)]
        rows.append({
            "backend": backend,
            "trials": len(group),
            "complete": len(done),
            "failed": int((group["state"] == "failed").sum()),
            "feasible": len(ok),
            f"best_feasible_{objective}": _best(ok[objective], maximise) if not ok.empty else np.nan,
            "median_latency_ms_p50": done["latency_ms_p50"].median(),
            "median_speedup": done["speedup"].median(),
            "best_feasible_speedup": ok["speedup"].max() if not ok.empty else np.nan,
            "min_accuracy_drop": done["accuracy_drop"].min(),
            "median_accuracy_drop": done["accuracy_drop"].median(),
            "min_size_bytes": done["size_bytes"].min(),
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(
        [f"best_feasible_{objective}", "backend"], ascending=[not maximise, True], na_position="last", ignore_index=True
    )


def _best(values: pd.Series, maximise: bool) -> float:
    return values.max() if maximise else values.min()


def load_sensitivity(study_dir: str | Path) -> pd.DataFrame | None:
    """Read ``<study>/sensitivity.parquet`` (a file or a folder of Parquet files), or ``None``.

    The layer-sensitivity table has one row per (backend, layer): ``layer``, ``op_type``,
    ``metric_drop``, ``output_error``, ``rank`` (1 = most sensitive), plus ``backend`` and the
    config it was measured with.

    Raises:
        ValueError: when the file lacks one of the required columns.
    """
    import pandas as pd

    path = Path(study_dir) / SENSITIVITY_FILE
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    missing = [c for c in SENSITIVITY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; it has {list(table.columns)}")
    order = [c for c in ("backend", "rank", "layer") if c in table.columns]
    return table.sort_values(order, ignore_index=True)


def excluded_layers(df: pd.DataFrame) -> pd.Series:
    """For each row, the set of layers its config left unquantized (empty when none)."""
    import pandas as pd

    values = df[EXCLUDED_COLUMN] if EXCLUDED_COLUMN in df.columns else [None] * len(df)
    sets = [set(value) if isinstance(value, tuple | list | np.ndarray) else set() for value in values]
    return pd.Series(sets, index=df.index, dtype=object)


def sensitivity_with_exclusions(
    sensitivity: pd.DataFrame, df: pd.DataFrame, objective: str = "latency_ms_p50"
) -> pd.DataFrame:
    """Join the sensitivity table with what the sweep found when it excluded each layer.

    For each sensitivity row, over the complete trials of the same backend (all backends when
    the table has no ``backend`` column): how many trials excluded the layer, how many of those
    were feasible, the median accuracy drop with and without the layer excluded, the best
    feasible ``objective`` among trials excluding it, and whether the overall best feasible trial
    excludes it.
    """
    done = df[df["state"] == "complete"]
    excluded = excluded_layers(done)
    feasible = done["feasible"].fillna(False).astype(bool)
    best = best_feasible(df, objective, k=1)
    best_excluded = excluded_layers(best).iloc[0] if not best.empty else set()
    best_backend = best["backend"].iloc[0] if not best.empty else None
    out = sensitivity.copy()
    columns: dict[str, list] = {
        "trials_excluding": [], "feasible_excluding": [], "median_accuracy_drop_excluding": [],
        "median_accuracy_drop_including": [], f"best_feasible_{objective}_excluding": [], "excluded_in_best": [],
    }  # fmt: skip
    for row in sensitivity.itertuples(index=False):
        backend = getattr(row, "backend", None)
        same = done["backend"] == backend if isinstance(backend, str) else done["backend"].notna()
        has = same & excluded.map(lambda layers, name=row.layer: name in layers).astype(bool)
        lacks = same & ~has
        columns["trials_excluding"].append(int(has.sum()))
        columns["feasible_excluding"].append(int((has & feasible).sum()))
        columns["median_accuracy_drop_excluding"].append(done.loc[has, "accuracy_drop"].median())
        columns["median_accuracy_drop_including"].append(done.loc[lacks, "accuracy_drop"].median())
        best_value = _best(done.loc[has & feasible, objective], maximised(objective))
        columns[f"best_feasible_{objective}_excluding"].append(best_value)
        in_best = row.layer in best_excluded and (not isinstance(backend, str) or backend == best_backend)
        columns["excluded_in_best"].append(bool(in_best))
    for name, values in columns.items():
        out[name] = values
    return out
