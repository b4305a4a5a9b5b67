"""Finalists: the held-out split, round-robin timing, confirmation sets joined onto the rows, the
winner and its ties chosen from the confirmed figures, in every view (no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from synthetic_study import STATIC, TORCH, make_study

from sweeper import analysis, confirmed, export, report, results, views
from sweeper.confirmation import time_round_robin
from sweeper.errors import ConfigError
from sweeper.holdout import held_out_batches, trial_part
from sweeper.measure import MIN_TRIAL_SAMPLES, held_out_indices
from sweeper.space import parse_space
from sweeper.spec import MeasureSettings
from sweeper.task import load_task


def test_the_held_out_third_is_stratified_seeded_and_never_starves_the_trials() -> None:
    labels = np.repeat(np.arange(10), 36)  # 360 samples, 36 per class
    held = held_out_indices(labels)
    assert len(held) == 120 and np.array_equal(held, held_out_indices(labels)), "a third, the same every time"
    assert set(Counter(labels[held]).values()) == {12}, "each class gives a third"
    assert len(held_out_indices(np.repeat(np.arange(5), 50))) == 250 - MIN_TRIAL_SAMPLES  # 83 would leave 167
    assert len(held_out_indices(np.arange(220) % 4)) == 0, "too small to hold 30 out and keep 200"
    floats = held_out_indices(np.linspace(0, 1, 600))  # not class labels: a seeded random third
    assert len(floats) == 200 and np.array_equal(floats, np.unique(floats))


def test_the_trial_part_and_the_held_out_part_divide_the_evaluation_split(digits_task_path: Path) -> None:
    task = load_task(str(digits_task_path))
    everything = np.concatenate([y for _, y in task.eval_batches(64)])
    keep = trial_part(task, 64)
    assert keep is not None and len(keep) == 240
    trial_labels = np.concatenate([y for _, y in held_out_batches(task, None, 64)])
    assert len(trial_labels) == 360, "without a trial part the confirmation re-scores on the whole split"
    held = [(b["input"], y) for b, y in held_out_batches(task, keep, 64)]
    held_inputs = np.concatenate([x for x, _ in held])
    all_inputs = np.concatenate([b["input"] for b, _ in task.eval_batches(64)])
    assert len(held_inputs) == 120
    assert np.array_equal(held_inputs, np.delete(all_inputs, keep, axis=0)), "exactly the samples trials never see"
    assert Counter(everything[keep]) + Counter(np.concatenate([y for _, y in held])) == Counter(everything)


def test_round_robin_rotates_the_order_and_times_every_model_alike() -> None:
    calls: list[int] = []
    ticks = iter(range(10**6))
    settings = MeasureSettings(warmup_runs=2, min_runs=30, max_runs=1000, min_time_s=0.0, round_size=5)
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    rounds = time_round_robin(fns, settings, min_rounds=4, clock=lambda: float(next(ticks)))
    assert calls[:6] == [0, 1, 2, 0, 1, 2], "warm-up calls every model in turn"
    assert [len(r) for r in rounds] == [6, 6, 6], "min_runs 30 in rounds of 5: six rounds each"
    assert all(len(times) == 5 and all(t == 1.0 for t in times) for r in rounds for times in r)
    timed = calls[6:]
    firsts = [timed[i * 15] for i in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2], "each round starts one model later"
    capped = time_round_robin(fns, settings.model_copy(update={"min_time_s": 1e9, "max_runs": 20}), min_rounds=2,
                              clock=lambda: float(next(ticks)))
    assert [sum(len(t) for t in r) for r in capped] == [20, 20, 20], "max_runs ends timing"


def _confirmation(number: int, latency: float, *, feasible: bool = True, seed: int = 0, rounds: list | None = None,
                  drop: float = 0.0, backend: str = STATIC, excluded: int = 0, size: int = 70_000) -> dict:
    rounds = rounds if rounds is not None else list(np.random.default_rng(seed).normal(latency, 0.005, 20))
    # confirmed_speedup: against an FP32 at 0.5 ms, as in the trials of make_study
    return {
        "study": "syn", "trial_number": number, "backend": backend, "n_excluded": excluded, "size_bytes": size,
        "confirmed_feasible": feasible, "confirmed_latency_ms_p50": float(np.median(rounds)),
        "confirmed_round_ms": rounds, "confirmed_accuracy_drop": drop, "confirmed_accuracy_drop_low": drop - 2,
        "confirmed_accuracy_drop_high": drop + 2, "confirmed_speedup": 0.5 / float(np.median(rounds)),
        "confirmed_split": "held_out", "confirmed_samples": 120, "confirmed_latency_runs": 200, "confirmed_rounds": 20,
        "confirmed_settings": "{}",
    }


def _confirmed_rows() -> list[dict]:
    """Trial 0 (one layer excluded) and trial 2 (none) are tied; 5 and 8 are slower; 6 failed the
    held-out budget. By the trials' own figures trial 0 was the best."""
    base = list(np.random.default_rng(1).normal(0.21, 0.005, 20))
    return confirmed.rank([
        _confirmation(0, 0.21, rounds=base, excluded=1),
        _confirmation(2, 0.21, rounds=[v * 1.001 for v in base]),
        _confirmation(6, 0.19, feasible=False, drop=1.5, excluded=2),
        _confirmation(5, 0.30, seed=2),
        _confirmation(8, 0.40, seed=3, backend=TORCH, size=240_000),
    ])


def test_rank_groups_ties_and_puts_the_simpler_first() -> None:
    ranked = {r["trial_number"]: r for r in _confirmed_rows()}
    assert [ranked[n]["confirmed_rank"] for n in (2, 0, 5, 8, 6)] == [1, 2, 3, 4, 5]
    assert ranked[2]["confirmed_tie_group"] == ranked[0]["confirmed_tie_group"] == 1, "within the noise"
    assert ranked[5]["confirmed_tie_group"] == 2 and ranked[8]["confirmed_tie_group"] == 3
    assert ranked[6]["confirmed_tie_group"] is None, "over the budget on the held-out split: no group"
    fp32 = confirmed.rank([
        _confirmation(1, 0.2, rounds=base, backend=STATIC) for base in [list(np.linspace(0.19, 0.21, 15))]
    ] + [_confirmation(4, 0.2, rounds=list(np.linspace(0.19, 0.21, 15)), backend="onnxruntime_fp32", size=250_000)])
    assert [r["trial_number"] for r in fp32] == [4, 1], "FP32 before INT8 at equal speed, though larger"


def _confirmed_study(tmp_path: Path) -> Path:
    study = make_study(tmp_path)
    confirmed.write_set(study, [{k: v for k, v in r.items() if k in confirmed.CONFIRMED_NAMES}
                                for r in confirmed.rank([_confirmation(0, 0.5), _confirmation(2, 0.6, seed=4)])])
    confirmed.write_set(study, [{k: v for k, v in r.items() if k in confirmed.CONFIRMED_NAMES}
                                for r in _confirmed_rows()])
    return study


def test_sets_are_kept_and_the_newest_joins_the_rows(tmp_path: Path) -> None:
    plain = results.load(make_study(tmp_path / "plain"))
    assert not any(c.startswith("confirmed_") for c in plain.columns), "an unconfirmed study reads as before"
    study = _confirmed_study(tmp_path)
    assert sorted(p.name for p in (study / "confirmations").iterdir()) == [
        "confirmation-000001.parquet", "confirmation-000002.parquet"], "a new set never overwrites an old one"
    df = results.load(study)
    assert set(confirmed.JOINED) <= set(df.columns) and len(df) == 12
    finalists = df[df["confirmed_set"].notna()]
    assert sorted(finalists["trial_number"]) == [0, 2, 5, 6, 8] and set(finalists["confirmed_set"]) == {2}
    assert df.loc[df["trial_number"] == 2, "confirmed_latency_ms_p50"].iloc[0] == pytest.approx(0.21, abs=0.01)
    both = results.load([study, tmp_path / "plain" / "syn"])
    assert len(both) == 24 and both["confirmed_set"].notna().sum() == 5, "only the confirmed study's finalists"


def test_the_winner_comes_from_the_confirmed_figures(tmp_path: Path) -> None:
    study = _confirmed_study(tmp_path)
    df = results.load(study)
    best = analysis.best_feasible(df, k=12)
    assert best["trial_number"].tolist()[:4] == [2, 0, 5, 8], "confirmed rank first"
    assert best["trial_number"].tolist()[-1] == 6, "the finalist over budget on the held-out split comes last"
    unconfirmed = analysis.best_feasible(results.load(make_study(tmp_path / "plain")), k=1)
    assert unconfirmed["trial_number"].iloc[0] == 0, "the trials' own figures favour trial 0"
    assert analysis.ties_of(df, best.iloc[0])["trial_number"].tolist() == [0]
    assert export.choose_trial(df, trial=None, best=True)["trial_number"] == 2
    written = export.export_trial(study, tmp_path / "exported", best=True)
    held = json.loads(written.config.read_text())["confirmed"]
    assert written.trial_number == 2 and held["confirmed_rank"] == 1 and held["confirmed_tie_group"] == 1
    assert held["confirmed_samples"] == 120 and isinstance(held["confirmed_samples"], int)


def test_the_summary_shows_the_confirmed_winner_and_its_ties(tmp_path: Path) -> None:
    console = Console(width=200, record=True, color_system=None)
    views.print_summary(console, results.load(_confirmed_study(tmp_path)), "latency_ms_p50")
    text = console.export_text()
    assert "Best feasible: trial 2 onnxruntime_static_int8:" in text and "ms p50 confirmed" in text
    assert "tied within the timing noise with trial 0 onnxruntime_static_int8" in text
    assert "on 120 held-out samples no trial saw" in text
    assert "by the trials' own figures trial 0 onnxruntime_static_int8 was the best" in text
    finalists = [line.split() for line in text.splitlines() if line.startswith("│")]
    rows = [cells for cells in finalists if len(cells) > 10 and cells[5] in {"0", "2", "5", "6", "8"}]
    assert [(r[1], r[3], r[5]) for r in rows[:5]] == [
        ("1", "1", "2"), ("2", "1", "0"), ("3", "2", "5"), ("4", "3", "8"), ("5", "-", "6")]
    plain = Console(width=200, record=True, color_system=None)
    views.print_summary(plain, results.load(make_study(tmp_path / "plain")), "latency_ms_p50")
    assert "not confirmed: the study has no confirmation set" in plain.export_text()


def test_the_report_shows_intervals_finalists_and_what_each_point_buys(tmp_path: Path) -> None:
    written = report.write_report(_confirmed_study(tmp_path), importance_min_trials=100)
    page = written.markdown.read_text()
    assert "Best feasible: trial 2, onnxruntime_static_int8, chosen from the confirmed figures" in page
    assert "Tied within the timing noise with trial(s) 0" in page
    assert "drop_95%_interval" in page and "confirmed_drop_95%_interval" in page
    budgets = page.split("## What each point of accuracy buys")[1].split("##")[0]
    lines = [line.split(" | ") for line in budgets.splitlines() if line.startswith("| ") and "max_drop" not in line]
    by_budget = {cells[0].strip("| "): cells for cells in lines}
    assert set(by_budget) == {"0.5", "1", "2", "5"}
    assert by_budget["1"][1] == "2" and by_budget["1"][-1].strip(" |") == "confirmed", "the confirmed winner"
    assert by_budget["2"][1] == "6", "trial 6's confirmed drop 1.5 fits a budget of 2"
    assert by_budget["5"][1] == "3" and by_budget["5"][-1].strip(" |") == "trial", "trial 3 (drop 2.5) at 5 points"


def test_the_budgets_table_prefers_confirmed_figures(tmp_path: Path) -> None:
    df = results.load(_confirmed_study(tmp_path))
    table = analysis.best_by_budget(df, (0.1, 1.0, 3.0))
    # Trial 0 is a hair faster than trial 2 but tied with it; trial 2, the simpler, stands for both.
    assert table["trial_number"].tolist() == [2, 2, 3]
    assert table["figures"].tolist() == ["confirmed", "confirmed", "trial"]
    assert (table["accuracy_drop"] <= table["max_drop"]).all()
    assert pd.isna(analysis.best_by_budget(df, (-1.0,)).loc[0, "latency_ms_p50"]), "nothing meets a negative budget"


def test_the_budgets_table_ranks_by_speedup_over_fp32_timed_in_the_same_rounds(tmp_path: Path) -> None:
    df = results.load(make_study(tmp_path))  # no confirmation: the trials' own figures
    # Trial 9 was timed while the whole machine ran fast: its FP32 took 0.1 ms, not 0.5. Its raw
    # latency is the lowest of the drop-0 trials, but it is no faster than FP32 (speedup 1.0).
    at = df["trial_number"] == 9
    df.loc[at, ["latency_ms_p50", "baseline_latency_ms_p50", "speedup"]] = [0.1, 0.1, 1.0]
    table = analysis.best_by_budget(df, (0.0,))
    assert table["trial_number"].tolist() == [8], "trial 8: 0.40 ms against its FP32's 0.5 (1.25x) beats 1.0x"
    without = analysis.best_by_budget(df.assign(speedup=np.nan), (0.0,))
    assert without["trial_number"].tolist() == [9], "with no speedups, the raw latency decides"


def test_confirmation_settings_must_time_more_than_a_trial() -> None:
    body = {"task": "digits_cnn", "constraint": {"max_drop": 1}, "measure": {"min_runs": 50, "min_time_s": 1.0},
            "backends": {"onnxruntime_fp32": {}}}
    with pytest.raises(ConfigError, match=r"key 'confirm.min_runs': 40 must exceed measure.min_runs \(50\)"):
        parse_space({**body, "confirm": {"min_runs": 40}}, Path("s.yaml"), "")
    with pytest.raises(ConfigError, match=r"key 'confirm.min_time_s'"):
        parse_space({**body, "confirm": {"min_time_s": 0.5}}, Path("s.yaml"), "")
    space = parse_space(body, Path("s.yaml"), "")
    timing = space.confirm.timing(space.measure)
    assert space.confirm.finalists == 5 and timing.min_runs == 150 and timing.min_time_s == 2.0
