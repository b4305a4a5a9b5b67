"""The search benchmark's Markdown: the reference, its noise, the search table and the real sweeps."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pandas as pd
from _bench_sweeps import markdown_table
from _search_replay import Reference, RunOutcome

SUMMARY_HEAD = [
    "Budget (trials)", "Method", "Runs", "Median winner / best", "Worst winner / best", "Runs within 3 %",
    "Winner feasible on held-out", "Wall time (median)", "of which driver",
]  # fmt: skip


def short(params_json: str) -> str:
    """A configuration in a few words: its Optuna parameters without the backend prefix."""
    params = json.loads(params_json)
    return ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in params.items() if k != "backend")


def ratio_of(frame: pd.DataFrame, winner: str | None, best: float) -> float:
    return float(frame.at[winner, "latency_ms"]) / best if winner else float("inf")


def _grouped(runs: list[RunOutcome]) -> dict[tuple[int, str], list[RunOutcome]]:
    groups: dict[tuple[int, str], list[RunOutcome]] = {}
    for r in runs:
        groups.setdefault((r.budget, r.method), []).append(r)
    return groups


def summary_rows(runs: list[RunOutcome], frame: pd.DataFrame, best: float, distinct: int) -> list[list[str]]:
    """One row per budget and method: winner latency / exhaustive best (median, worst), held-out
    feasibility of the winners, and the median wall time (trials as the reference timed them,
    plus the driver's own time)."""
    rows = []
    for (budget, method), group in _grouped(runs).items():
        ratios = [ratio_of(frame, r.winner, best) for r in group]
        held = sum(bool(r.winner and frame.at[r.winner, "held_out_feasible"]) for r in group)
        walls = [r.trial_time_s + r.driver_s for r in group]
        rows.append([
            f"{budget} ({budget / distinct:.0%})", method, str(len(group)),
            f"{statistics.median(ratios):.3f}", f"{max(ratios):.3f}",
            f"{sum(x <= 1.03 for x in ratios)}/{len(group)}", f"{held}/{len(group)}",
            f"{statistics.median(walls):.0f} s", f"{statistics.median(r.driver_s for r in group):.1f} s",
        ])  # fmt: skip
    return rows


def whole_table_row(frame: pd.DataFrame, best: float) -> list[str]:
    """The pick of a search that measured everything once: the lowest first-pass p50 among feasible."""
    feasible = frame[(frame["state"] == "complete") & frame["feasible"]]
    pick = feasible["p50_first"].idxmin()
    ratio = feasible.at[pick, "latency_ms"] / best
    held = "1/1" if feasible.at[pick, "held_out_feasible"] else "0/1"
    return [f"{len(frame)} (100%)", "every configuration once", "1", f"{ratio:.3f}", f"{ratio:.3f}",
            f"{int(ratio <= 1.03)}/1", held, f"{frame['duration_s'].sum():.0f} s", "-"]  # fmt: skip


def medians(runs: list[RunOutcome], frame: pd.DataFrame, best: float) -> dict[tuple[int, str], float]:
    return {k: statistics.median(ratio_of(frame, r.winner, best) for r in g) for k, g in _grouped(runs).items()}


def reference_text(frame: pd.DataFrame, table: pd.DataFrame, meta: dict[str, Any], reference: Reference,
                   best: float, info: dict[str, Any]) -> str:  # fmt: skip
    """The reference's description: space, measurement, best configuration, ranges, feasibility."""
    space = reference.space
    first = table[table["measurement"] == "reference"].set_index("config_key")
    done = frame[frame["state"] == "complete"]
    feasible = done[done["feasible"]]
    winner = feasible["latency_ms"].idxmin()
    m = space.measure
    return "\n".join([
        f"Task `{reference.task_ref.name}` (the Fashion-MNIST CNN of `fashion_mnist_cnn`; its 10,000 test images "
        f"split once, stratified by class, seed 0, into a **search half** of {int(first['eval_samples'].max()):,} "
        f"that trials are scored on and a **held-out half** of {int(first['held_out_samples'].max()):,} that only "
        f"this benchmark reads). FP32 top-1: {reference.baseline.metric:.2f} % on the search half, "
        f"{first['held_out_accuracy_fp32'].dropna().iloc[0]:.2f} % on the held-out half (one image: 0.02 points).",
        "",
        f"Space (`search_spaces/search_benchmark.yaml`): backend `onnxruntime_static_int8`, {meta['combinations']} "
        f"parameter combinations, **{meta['distinct']} distinct configurations**, all measured ({len(done)} "
        f"complete, {meta['distinct'] - len(done)} failed). Constraint: drop <= {space.constraint.max_drop:g} "
        f"points ({space.constraint.mode}). Feasible on the search half: {len(feasible)}; on the held-out half: "
        f"{int(done['held_out_feasible'].sum())}; on both: "
        f"{int((done['feasible'] & done['held_out_feasible']).sum())}. Search-split accuracy identical in both "
        f"passes for {int(done['same_accuracy'].sum())} of {len(done)}.",
        "",
        f"Measurement (the space's): 1 trial in flight, {space.target_of(next(iter(space.backends))).num_cpus} "
        f"thread, batch {m.batch_size}; {m.warmup_runs} warm-up calls, then the candidate and the PyTorch FP32 "
        f"model in alternating rounds of {m.round_size} until >= {m.min_runs} calls and >= {m.min_time_s:g} s "
        f"(at most {m.max_runs}). Reference: {meta['wall_time_s'] / 60:.1f} min in all (passes "
        f"{meta['pass_s'][0] / 60:.1f} and {meta['pass_s'][1] / 60:.1f} min, held-out scoring included).",
        "",
        f"Confirmed latency over the complete configurations: {done['latency_ms'].min():.4f} to "
        f"{done['latency_ms'].max():.4f} ms (first-pass p50 {done['p50_first'].min():.4f} to "
        f"{done['p50_first'].max():.4f} ms; the FP32 model's p50 across all trials "
        f"{table['baseline_latency_ms_p50'].min():.4f} to {table['baseline_latency_ms_p50'].max():.4f} ms, median "
        f"{frame.attrs['fp32_p50']:.4f} ms). Feasible configurations within 3 % of the best: "
        f"{int((feasible['latency_ms'] <= 1.03 * best).sum())} of {len(feasible)}.",
        "",
        "**Exhaustive best** (lowest confirmed latency among configurations feasible on the search half): "
        f"{short(first.at[winner, 'optuna_params_json'])}: **{best:.4f} ms** (passes "
        f"{done.at[winner, 'p50_first']:.4f} / {done.at[winner, 'p50_second']:.4f} ms), drop "
        f"{done.at[winner, 'drop']:.2f} points on the search half, {done.at[winner, 'held_out_drop']:.2f} on "
        "the held-out half.",
        "",
        f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs (shared with other jobs), torch "
        f"{info['torch']}, onnxruntime {info['onnxruntime']}.",
    ])  # fmt: skip


def _spread(changes: pd.Series) -> str:
    size = changes.abs()
    return (f"median {size.median():.1%}, 90th percentile {size.quantile(0.9):.1%}, largest {size.max():.1%}; "
            f"{(size > 0.03).mean():.0%} of configurations moved more than 3 %")  # fmt: skip


def noise_text(frame: pd.DataFrame, best: float, fastest: int = 10) -> str:
    """The reference's noise: pass-to-pass changes (raw and FP32-scaled), the fastest feasible
    configurations with both passes, and what picking by one pass's p50 gives."""
    done = frame[frame["state"] == "complete"]
    feasible = done[done["feasible"]].sort_values("latency_ms")
    raw_pick = feasible["p50_first"].idxmin()
    rows = [
        [short(r.optuna_params_json), f"{r.p50_first:.4f}", f"{r.p50_second:.4f}", f"{r.latency_ms / best:.3f}",
         f"{r.scaled_first:.4f} / {r.scaled_second:.4f}", f"{r.drop:.2f}", f"{r.held_out_drop:.2f}"]
        for r in feasible.head(fastest).itertuples()
    ]  # fmt: skip
    head = ["Configuration", "p50, pass 1 (ms)", "pass 2 = confirmed (ms)", "Confirmed / best",
            "FP32-scaled, pass 1 / 2 (ms)", "Drop (search)", "Drop (held-out)"]  # fmt: skip
    return "\n".join([
        "Change from pass 1 to pass 2 of each configuration's p50: "
        f"{_spread(done['p50_second'] / done['p50_first'] - 1)}.",
        f"The same for the FP32-scaled figure: {_spread(done['scaled_second'] / done['scaled_first'] - 1)}.",
        "",
        f"The {fastest} fastest feasible configurations (by confirmed latency):",
        "",
        markdown_table(head, rows),
        f"Picking by one pass, as a search over the whole table would (the lowest first-pass p50 among "
        f"feasible configurations) gives {short(feasible.at[raw_pick, 'optuna_params_json'])}, confirmed "
        f"{feasible.at[raw_pick, 'latency_ms'] / best:.3f} x the best (the floor a single measurement leaves).",
        "",
    ])  # fmt: skip


def real_text(
    sweeps: list[dict[str, Any]], frame: pd.DataFrame, best: float, replay: dict[tuple[int, str], float]
) -> str:
    rows = []
    for s in sweeps:
        ratio = ratio_of(frame, s["winner"], best) if s["winner"] in frame.index else float("nan")
        own = s["own_p50_ms"] / best if s["own_p50_ms"] else float("nan")
        held = bool(s["winner"] in frame.index and frame.at[s["winner"], "held_out_feasible"])
        rows.append([str(s["seed"]), str(s["budget"]), str(s["rows"]), f"{ratio:.3f}", f"{own:.3f}",
                     "yes" if held else "no", f"{s['wall_time_s']:.0f} s"])  # fmt: skip
    if not rows:
        return "No real sweeps were run (--real-sweeps 0).\n"
    budget = sweeps[0]["budget"]
    head = ["Seed", "Trials", "Rows", "Winner / best (reference)", "Winner / best (its own trial's p50)",
            "Held-out feasible", "Wall time"]  # fmt: skip
    return markdown_table(head, rows) + (
        f"\nReplayed sweeper at {budget} trials: median winner / best "
        f"{replay.get((budget, 'sweeper (TPE)'), float('nan')):.3f}.\n"
    )


def verdict(runs: list[RunOutcome], frame: pd.DataFrame, best: float, distinct: int) -> str:
    meds = medians(runs, frame, best)
    budgets = sorted({b for b, _ in meds})
    budget = min(budgets, key=lambda b: abs(b / distinct - 0.25))
    tpe, rnd = meds[(budget, "sweeper (TPE)")], meds[(budget, "random search")]
    within = "within" if tpe <= 1.03 else "NOT within"
    versus = "no worse than" if tpe <= rnd else "WORSE than"
    low, high = median_difference_interval(runs, frame, best, budget)
    return (
        f"At {budget} trials ({budget / distinct:.0%}): the sweeper's median winner is {tpe:.3f} x the exhaustive best "
        f"({within} 3 %), random search's {rnd:.3f} x: by the medians the sweeper is {versus} random search. "
        f"Difference of the medians (sweeper - random) {tpe - rnd:+.3f}, 95 % bootstrap interval [{low:+.3f}, "
        f"{high:+.3f}] (runs resampled within each method, 10,000 times).\n"
    )


def median_difference_interval(
    runs: list[RunOutcome], frame: pd.DataFrame, best: float, budget: int, resamples: int = 10_000
) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of median(sweeper) - median(random) at ``budget``."""
    import numpy as np

    groups = _grouped(runs)
    a = np.array([ratio_of(frame, r.winner, best) for r in groups[(budget, "sweeper (TPE)")]])
    b = np.array([ratio_of(frame, r.winner, best) for r in groups[(budget, "random search")]])
    rng = np.random.default_rng(0)
    medians_a = np.median(rng.choice(a, (resamples, len(a))), axis=1)
    diffs = medians_a - np.median(rng.choice(b, (resamples, len(b))), axis=1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def report(frame: pd.DataFrame, table: pd.DataFrame, meta: dict[str, Any], reference: Reference,
           runs: list[RunOutcome], sweeps: list[dict[str, Any]], best: float, info: dict[str, Any],
           seeds: int, wall_s: float) -> str:  # fmt: skip
    distinct = len(reference.configs)
    return "\n".join([
        "### The exhaustive reference", "", reference_text(frame, table, meta, reference, best, info), "",
        "### The reference's noise", "", noise_text(frame, best),
        f"### Searches replayed over the reference ({seeds} seeds each)", "",
        markdown_table(SUMMARY_HEAD, [*summary_rows(runs, frame, best, distinct), whole_table_row(frame, best)]),
        verdict(runs, frame, best, distinct),
        "### Real sweeps (real Ray, real trials)", "", real_text(sweeps, frame, best, medians(runs, frame, best)),
        f"Benchmark wall time: {wall_s / 60:.1f} min.",
    ])  # fmt: skip
