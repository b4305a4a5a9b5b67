"""PNG plots of a study's rows, drawn with matplotlib's Agg backend (no display needed).

Each function writes one PNG and returns its path, or ``None`` when there is nothing to draw
(no complete trial, no importances, no sensitivity table).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.analysis import best_feasible, maximised, pareto_front

if TYPE_CHECKING:
    import pandas as pd

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(backends: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.get_cmap("tab10")
    return {name: cycle(i % 10) for i, name in enumerate(sorted(backends))}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _log_if_wide(ax: Any, values: Any, axis: str) -> None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 5:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def pareto_scatter(df: pd.DataFrame, path: Path, objective: str = "latency_ms_p50") -> Path | None:
    """Latency against accuracy drop for every complete trial, by backend, with the feasible
    region (drop <= max_drop) shaded, the two-objective Pareto front drawn and the best feasible
    trial starred."""
    done = df[df["state"] == "complete"].dropna(subset=["latency_ms_p50", "accuracy_drop"])
    if done.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    colors = _colors(list(done["backend"].unique()))
    drops = done["accuracy_drop"].to_numpy(dtype=float)
    max_drop = float(done["max_drop"].dropna().iloc[0]) if done["max_drop"].notna().any() else None
    low = min(drops.min(), 0.0)
    high = max(drops.max(), max_drop or 0.0)
    pad = max(0.1, 0.08 * (high - low))
    ax.set_ylim(low - pad, high + pad)
    if max_drop is not None:
        ax.axhspan(low - pad, max_drop, color="tab:green", alpha=0.10, label=f"feasible (drop <= {max_drop:g})")
        ax.axhline(max_drop, color="tab:green", lw=1, ls="--")
    for backend, group in done.groupby("backend"):
        feasible = group["feasible"].fillna(False).astype(bool)
        ax.scatter(group.loc[feasible, "latency_ms_p50"], group.loc[feasible, "accuracy_drop"],
                   color=colors[backend], label=backend, s=36, alpha=0.85, edgecolor="white", linewidth=0.5)
        ax.scatter(group.loc[~feasible, "latency_ms_p50"], group.loc[~feasible, "accuracy_drop"],
                   color=colors[backend], marker="x", s=36, alpha=0.85)
    front = pareto_front(done, ("latency_ms_p50", "accuracy_drop"))
    if len(front) > 1:
        ax.step(front["latency_ms_p50"], front["accuracy_drop"], where="post", color="0.3", lw=1,
                label="Pareto front (all trials)")
    best = best_feasible(df, objective, k=1)
    if not best.empty:
        top = best.iloc[0]
        ax.scatter([top["latency_ms_p50"]], [top["accuracy_drop"]], marker="*", s=320, color="gold",
                   edgecolor="black", linewidth=1, zorder=5, label=f"best feasible (trial {top['trial_number']})")
    _log_if_wide(ax, done["latency_ms_p50"], "x")
    ax.set_xlabel("latency per call, p50 (ms)")
    ax.set_ylabel(f"accuracy drop ({'points' if done['drop_mode'].iloc[0] != 'relative' else '% of FP32'})")
    ax.set_title("Latency vs accuracy drop (x: infeasible)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def speedup_by_backend(df: pd.DataFrame, path: Path) -> Path | None:
    """Speedup over the FP32 PyTorch baseline per backend: a box per backend and every trial."""
    done = df[df["state"] == "complete"].dropna(subset=["speedup"])
    if done.empty:
        return None
    plt = _pyplot()
    order = done.groupby("backend")["speedup"].median().sort_values(ascending=False).index.tolist()
    colors = _colors(order)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(order) + 2.2))
    data = [done.loc[done["backend"] == b, "speedup"].to_numpy(dtype=float) for b in order]
    ax.boxplot(data, orientation="horizontal", widths=0.5, showfliers=False, medianprops={"color": "black"})
    rng = np.random.default_rng(0)
    for i, (backend, values) in enumerate(zip(order, data, strict=True), start=1):
        ax.scatter(values, i + rng.uniform(-0.15, 0.15, len(values)), color=colors[backend], s=20, zorder=3)
    ax.set_yticks(range(1, len(order) + 1), order)
    ax.invert_yaxis()
    ax.axvline(1.0, color="0.4", ls="--", lw=1, label="FP32 PyTorch")
    _log_if_wide(ax, done["speedup"], "x")
    ax.set_xlabel("speedup vs FP32 PyTorch (x, higher is faster)")
    ax.set_title("Speedup by backend")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def optimization_history(df: pd.DataFrame, path: Path, objective: str = "latency_ms_p50") -> Path | None:
    """The objective of each trial in trial order (x: infeasible, red ticks: failed) and the best
    feasible value so far."""
    if df.empty or df[objective].isna().all():
        return None
    plt = _pyplot()
    ordered = df.sort_values("trial_number")
    done = ordered[ordered["state"] == "complete"]
    feasible = done["feasible"].fillna(False).astype(bool)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = _colors(list(done["backend"].unique()))
    for backend, group in done.groupby("backend"):
        ok = feasible.loc[group.index]
        ax.scatter(group.loc[ok, "trial_number"], group.loc[ok, objective], color=colors[backend], s=28, label=backend)
        ax.scatter(group.loc[~ok, "trial_number"], group.loc[~ok, objective], color=colors[backend], marker="x", s=28)
    so_far = done[objective].where(feasible)
    best = (so_far.cummax() if maximised(objective) else so_far.cummin()).ffill()
    ax.step(done["trial_number"], best, where="post", color="black", lw=1.2, label="best feasible so far")
    failed = ordered[ordered["state"] == "failed"]
    if not failed.empty:
        ax.plot(failed["trial_number"], np.zeros(len(failed)), "|", color="tab:red", ms=12,
                transform=ax.get_xaxis_transform(), label="failed")
    _log_if_wide(ax, done[objective], "y")
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.set_title("Optimization history (x: infeasible)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def param_importance(table: pd.DataFrame, path: Path) -> Path | None:
    """Horizontal bars of parameter importance, one panel per scope (``all`` and each backend)."""
    if table.empty:
        return None
    plt = _pyplot()
    scopes = sorted(table["scope"].unique(), key=lambda s: (s != "all", s))
    sizes = [int((table["scope"] == s).sum()) for s in scopes]
    fig, axes = plt.subplots(len(scopes), 1, figsize=(8, 1.0 + 0.35 * sum(sizes) + 0.8 * len(scopes)),
                             gridspec_kw={"height_ratios": sizes}, squeeze=False)
    for ax, scope in zip(axes[:, 0], scopes, strict=True):
        part = table[table["scope"] == scope].sort_values("importance")
        labels = [p.split(".", 1)[1] if scope != "all" and "." in p else p for p in part["param"]]
        ax.barh(labels, part["importance"], color="tab:blue")
        ax.set_xlim(0, 1)
        n = int(part["trials"].iloc[0])
        ax.set_title(f"{'all trials' if scope == 'all' else scope} ({n} trials)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("importance (PED-ANOVA, share of total)")
    return _save(fig, path)


def sensitivity_bars(sensitivity: pd.DataFrame | None, path: Path, top: int = 30) -> Path | None:
    """Per-layer metric drop (and output error) bars, most sensitive first, one panel per backend."""
    if sensitivity is None or sensitivity.empty:
        return None
    plt = _pyplot()
    groups = list(sensitivity.groupby("backend")) if "backend" in sensitivity.columns else [("", sensitivity)]
    heights = [min(top, len(g)) for _, g in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 1.2 + 0.3 * sum(heights) + 0.8 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for (backend, group), (left, right) in zip(groups, axes, strict=True):
        part = group.sort_values("rank").head(top).iloc[::-1]
        labels = [f"{layer} ({op})" for layer, op in zip(part["layer"], part["op_type"], strict=True)]
        left.barh(labels, part["metric_drop"], color="tab:red")
        left.set_title(f"{backend + ': ' if backend else ''}metric drop per layer", fontsize=10)
        right.barh(labels, part["output_error"], color="tab:purple")
        right.set_title("output error per layer", fontsize=10)
        right.set_yticks([])
        for ax in (left, right):
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
