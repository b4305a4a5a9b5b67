"""The layer-sensitivity table: its rows, its ranking, and where it is written.

One row per exclusion unit (``layer``). ``metric``, ``metric_drop``, ``output_error`` and
``sqnr_db`` are measured on ``eval_samples`` samples of the evaluation split, and ``metric_fp32``
is the FP32 model's metric on the same samples: the whole split for a layer scored on it
(``rescored``, or every layer when there was no subset pass), the subset otherwise. The
``subset_*`` columns keep what the subset pass saw for every layer (NaN without one):
its samples, output error with its bootstrap interval, metric drop with its interval
(:mod:`sweeper.triage`). ``full_*`` describe the model with every layer quantized, on the whole
split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import results
from sweeper.analysis import SENSITIVITY_FILE
from sweeper.errors import SweeperInputError
from sweeper.measure import DropCounts, accuracy_drop
from sweeper.spec import StudyInfo, TaskRef
from sweeper.triage import drop_bounds, sqnr_db

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["task", "backend", "params_json", "layer", "module", "op_type", "members", "metric_fp32", "metric",
           "metric_drop", "output_error", "sqnr_db", "error", "eval_samples", "rescored", "subset_samples",
           "subset_output_error", "subset_output_error_low", "subset_output_error_high", "subset_metric_drop",
           "subset_drop_low", "subset_drop_high", "rank", "full_metric_drop", "full_output_error"]  # fmt: skip
# The columns of a scored chunk's rows as a Ray task returns them (see sweeper.scoring).
SCORE_COLUMNS = ["layer", "metric_fp32", "metric", "output_error", "output_error_low", "output_error_high",
                 "samples", "worse", "better", "correct", "noise", "signal", "error"]  # fmt: skip



def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _counts(r: dict[str, Any]) -> DropCounts | None:
    """The discordant counts of a scored row, ``None`` when it has none (failed, or not top-1)."""
    if any(_missing(r.get(key)) for key in ("worse", "better", "samples")):
        return None
    return DropCounts(n=int(r["samples"]), worse=int(r["worse"]), better=int(r["better"]))


def merge_scores(first: pd.DataFrame, rest: pd.DataFrame) -> pd.DataFrame:
    """Whole-split scores of a top-1 task's units from their scores on the subset (``first``) and
    on the rest of the split (``rest``): counts and squared-error sums add up over disjoint samples,
    and the metric is the share of samples classified right. A unit that failed on the rest keeps
    that row."""
    import pandas as pd

    subset = {r["layer"]: r for r in first.to_dict("records")}
    merged = []
    for r in rest.to_dict("records"):
        s = subset[r["layer"]]
        if not _missing(r["error"]) or _missing(r["correct"]) or _missing(s["correct"]):
            merged.append(r)
            continue
        n, noise, signal = s["samples"] + r["samples"], s["noise"] + r["noise"], s["signal"] + r["signal"]
        sums = {key: s[key] + r[key] for key in ("worse", "better", "correct")}
        merged.append({
            **r, **sums, "samples": n, "noise": noise, "signal": signal, "output_error": noise / (signal or 1.0),
            "output_error_low": math.nan, "output_error_high": math.nan, "metric": 100.0 * sums["correct"] / n,
            "metric_fp32": 100.0 * (sums["correct"] + sums["worse"] - sums["better"]) / n,
        })  # fmt: skip
    return pd.DataFrame(merged, columns=rest.columns)


def table_rows(
    task_ref: TaskRef, backend: str, params: dict[str, Any], info: dict[str, Any],
    first: pd.DataFrame, rescored: pd.DataFrame | None, confidence: float = 0.95,
) -> pd.DataFrame:
    """The table rows (unranked) of the units scored in ``first`` (``info``: what
    :func:`sweeper.scoring.list_layers` returned). ``rescored``: ``None`` when ``first`` scored the
    whole split; otherwise ``first`` is the subset pass and ``rescored`` the units scored again on
    the whole split."""
    import pandas as pd

    units = {u["name"]: u for u in info["units"]}
    again = {} if rescored is None else {r["layer"]: r for r in rescored.to_dict("records")}

    def drop(r: dict[str, Any]) -> float:
        fp32 = info["metric_fp32"] if _missing(r.get("metric_fp32")) else r["metric_fp32"]
        return accuracy_drop(fp32, r["metric"], higher_is_better=info["higher_is_better"])

    rows = []
    for r in first.to_dict("records"):
        final, unit = again.get(r["layer"], r), units[r["layer"]]
        low, high = drop_bounds(_counts(r), confidence)
        subset = {
            "subset_samples": r["samples"], "subset_output_error": r["output_error"],
            "subset_output_error_low": r["output_error_low"], "subset_output_error_high": r["output_error_high"],
            "subset_metric_drop": drop(r), "subset_drop_low": low, "subset_drop_high": high,
        }  # fmt: skip
        rows.append({
            "task": task_ref.name, "backend": backend, "params_json": json.dumps(params, sort_keys=True, default=list),
            "layer": r["layer"], "module": unit["module"], "op_type": unit["op_type"], "members": list(unit["members"]),
            "metric_fp32": info["metric_fp32"] if _missing(final.get("metric_fp32")) else final["metric_fp32"],
            "metric": final["metric"], "metric_drop": drop(final), "output_error": final["output_error"],
            "sqnr_db": sqnr_db(final["output_error"]), "error": final["error"], "eval_samples": final["samples"],
            "rescored": r["layer"] in again,
            **(dict.fromkeys(subset, math.nan) if rescored is None else subset),
            "full_metric_drop": accuracy_drop(info["metric_fp32"], info["full_metric"],
                                              higher_is_better=info["higher_is_better"]),
            "full_output_error": info["full_error"],
        })  # fmt: skip
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])


def rank_table(table: pd.DataFrame, model_order: list[str]) -> pd.DataFrame:
    """Sort ``table`` most sensitive first and number it: units that failed to score first, then
    by output error, then metric drop, then model order."""
    order = {name: i for i, name in enumerate(model_order)}
    table = table.assign(_failed=table["error"].notna(), _order=table["layer"].map(order))
    table = table.sort_values(
        ["_failed", "output_error", "metric_drop", "_order"], ascending=[False, False, False, True], na_position="last"
    )
    table = table.drop(columns=["_failed", "_order"]).reset_index(drop=True)
    table.insert(table.columns.get_loc("full_metric_drop"), "rank", range(1, len(table) + 1))
    return table


def ranking(table: pd.DataFrame) -> list[str]:
    """Layer names, most sensitive first."""
    return table.sort_values("rank")["layer"].tolist()


def output_path(out: Path, task: str, backend: str) -> Path:
    """Where ``sweeper sensitivity --out OUT`` writes the table.

    A study folder (one holding ``trials/`` or ``study.json``) gets ``OUT/sensitivity.parquet``:
    the file its report shows and a resumed sweep's exclusion search reads. Any other folder gets
    ``OUT/TASK-BACKEND-sensitivity.parquet``.

    Raises:
        SweeperInputError: when ``out`` is a file, or a study of another task.
    """
    if out.exists() and not out.is_dir():
        raise SweeperInputError(f"--out '{out}' is a file; give a folder (a study folder adds the table to its report)")
    if results.trials_dir(out).is_dir() or (out / "study.json").is_file():
        studied = StudyInfo.from_json(results.read_study_info(out) or {}).task
        if studied not in (None, task):
            raise SweeperInputError(
                f"--out '{out}' is a study of task '{studied}', not '{task}'; give --task {studied}, "
                "or another --out folder"
            )
        return out / SENSITIVITY_FILE
    return out / f"{task}-{backend}-sensitivity.parquet"


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` atomically, making its folder; a study's table keeps the rows of
    the other backends and replaces this backend's."""
    import pandas as pd

    if path.name == SENSITIVITY_FILE and path.is_file():
        kept = pd.read_parquet(path)
        if "backend" in kept.columns:
            kept = kept[~kept["backend"].isin(table["backend"].unique())]
            table = pd.concat([kept, table], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
