"""Reading a study's rows: the best feasible trials, and the closest miss when none is feasible."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def best_feasible(df: pd.DataFrame, objective: str = "latency_ms_p50", k: int = 5) -> pd.DataFrame:
    """The ``k`` complete, feasible trials with the smallest ``objective``."""
    ok = df[(df["state"] == "complete") & df["feasible"].fillna(False).astype(bool)]
    return ok.sort_values([objective, "trial_number"]).head(k)


def closest_infeasible(df: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """The ``k`` complete trials with the smallest accuracy drop (for a 'nothing feasible' verdict)."""
    done = df[df["state"] == "complete"]
    return done.sort_values(["accuracy_drop", "latency_ms_p50"]).head(k)


def state_counts(df: pd.DataFrame) -> dict[str, int]:
    """Number of rows in each state."""
    return {state: int((df["state"] == state).sum()) for state in ("complete", "failed", "pruned")}
