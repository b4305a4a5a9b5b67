"""Finalists confirmed on real Ray: re-timed together with more runs than a trial, re-scored on the
held-out third of the evaluation split, the winner and its ties chosen from the confirmed figures
in `sweeper run`, `show` and `export --best`, and kept across a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sweeper import results
from sweeper.measure import tied

pytestmark = pytest.mark.integration

SPACE = """
task: digits_cnn
trials: 5
seed: 0
constraint: {max_drop: 1.0}
hardware: {num_cpus: 1}
measure: {warmup_runs: 3, min_runs: 20, max_runs: 100, min_time_s: 0.05}
confirm: {finalists: 3, min_runs: 200, min_rounds: 10}
backends:
  onnxruntime_fp32: {opset: [15, 16, 17]}
  onnxruntime_dynamic_int8: {per_channel: [true, false]}
"""


def _sweeper(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _finalist_rows(stdout: str) -> list[list[str]]:
    """(rank, tie, trial) of each row of the printed finalists table."""
    table = stdout.split("Finalists, confirmed together")[1].split("Best feasible trials")[0]
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in table.splitlines() if line.startswith("│")]
    return [c[:3] for c in cells]


def test_finalists_are_confirmed_and_the_winner_comes_from_them(tmp_path: Path, root: Path) -> None:
    space = tmp_path / "finalists.yaml"
    space.write_text(textwrap.dedent(SPACE))
    out = tmp_path / "out"
    run = _sweeper("run", str(space), "--out", str(out), "--study", "fin", cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    study = out / "fin"
    df = results.load(study)
    info = json.loads((study / "study.json").read_text())["baseline"]
    # The trials saw two thirds of the 360 evaluation samples; the finalists were re-scored on the rest.
    assert info["eval_samples"] == 240 and info["confirm_samples"] == 120 and info["confirm_split"] == "held_out"
    assert (df["eval_samples"] == 240).all()

    finalists = df[df["confirmed_set"].notna()].sort_values("confirmed_rank")
    fp32 = df[df["backend"] == "onnxruntime_fp32"].sort_values("latency_ms_p50").iloc[0]
    top3 = set(df[df["feasible"]].sort_values(["latency_ms_p50", "trial_number"]).head(3)["trial_number"])
    assert set(finalists["trial_number"]) == top3 | {fp32["trial_number"]}, "the best 3 and the FP32 ORT reference"
    assert finalists["confirmed_rank"].tolist() == list(range(1, len(finalists) + 1))
    assert (finalists["confirmed_samples"] == 120).all() and (finalists["confirmed_split"] == "held_out").all()
    assert (finalists["confirmed_latency_runs"] >= 200).all() and (finalists["latency_runs"] <= 100).all(), (
        "more runs than a trial")
    assert (finalists["confirmed_rounds"] >= 10).all() and (finalists["confirmed_concurrent_timings"] == 0).all()
    assert (finalists["confirmed_speedup"] > 0).all() and finalists["confirmed_accuracy"].notna().all()
    held = finalists[finalists["confirmed_feasible"].astype(bool)]
    assert not held.empty, "FP32 ONNX Runtime matches PyTorch FP32 on any split"
    assert (held["confirmed_accuracy_drop"] <= 1.0).all()
    assert (held["confirmed_accuracy_drop_low"] <= held["confirmed_accuracy_drop"]).all()

    # Tie groups agree with the tie test on the stored per-round medians.
    for _, group in held.groupby("confirmed_tie_group"):
        leader = group.sort_values("confirmed_latency_ms_p50").iloc[0]
        for member in group.itertuples():
            assert tied(member.confirmed_round_ms, leader["confirmed_round_ms"], margin=0.02)  # the default tie_margin
    leaders = [g.sort_values("confirmed_latency_ms_p50").iloc[0] for _, g in held.groupby("confirmed_tie_group")]
    for first, second in zip(leaders, leaders[1:], strict=False):
        assert not tied(second["confirmed_round_ms"], first["confirmed_round_ms"], margin=0.02), "distinct groups differ"

    winner = held.iloc[0]
    assert winner["confirmed_rank"] == 1
    assert f"Best feasible: trial {winner['trial_number']} {winner['backend']}:" in run.stdout
    assert "ms p50 confirmed" in run.stdout and "120 held-out samples no trial saw" in run.stdout
    printed = _finalist_rows(run.stdout)
    assert printed == [[str(int(r.confirmed_rank)), "-" if np.isnan(r.confirmed_tie_group) else
                        str(int(r.confirmed_tie_group)), str(r.trial_number)] for r in finalists.itertuples()]
    mates = held[(held["confirmed_tie_group"] == winner["confirmed_tie_group"])
                 & (held["trial_number"] != winner["trial_number"])]
    for mate in mates.itertuples():
        assert f"trial {mate.trial_number} {mate.backend} (" in run.stdout.split("tied within the timing noise")[1]
    if mates.empty:
        assert "no other finalist is within the timing noise of it" in run.stdout

    show = _sweeper("show", str(study), cwd=root)
    assert show.returncode == 0, show.stderr
    assert f"Best feasible: trial {winner['trial_number']} {winner['backend']}:" in show.stdout
    assert _finalist_rows(show.stdout) == printed

    exported = _sweeper("export", str(study), "--best", "--to", str(tmp_path / "best"), cwd=root)
    assert exported.returncode == 0, exported.stderr
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["trial_number"] == winner["trial_number"] and config["confirmed"]["confirmed_rank"] == 1
    assert config["confirmed"]["confirmed_latency_ms_p50"] == winner["confirmed_latency_ms_p50"]
    assert "Chosen from the confirmed figures" in exported.stdout

    # A resume of the finished study keeps its confirmation: no trial to run, the set covers the finalists.
    again = _sweeper("run", str(space), "--out", str(out), "--study", "fin", "--resume", cwd=root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already confirmed" in again.stdout
    assert [p.name for p in (study / "confirmations").iterdir()] == ["confirmation-000001.parquet"]
    assert f"Best feasible: trial {winner['trial_number']} {winner['backend']}:" in again.stdout
