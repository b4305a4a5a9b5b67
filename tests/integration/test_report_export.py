"""One real small sweep, then what a user does with its results: load it three ways, find the
Pareto front, rank parameters, render the report, export models and re-evaluate them."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sweeper import analysis, export, report, results
from sweeper.cli import app
from sweeper.importance import param_importance
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration

STATIC, TORCH = "onnxruntime_static_int8", "torch_dynamic_int8"
# Six trials over two backends whose artifacts differ in kind (an ONNX file, a state dict);
# measured as tests/integration/conftest.py's FAST_MEASURE does.
SPACE = f"""
task: digits_cnn
trials: 6
seed: 3
max_concurrent: 2
constraint: {{max_drop: 1.0}}
measure: {{warmup_runs: 3, min_runs: 20, min_time_s: 0.05}}
backends:
  {STATIC}:
    calibration_method: [minmax, entropy]
    calibration_samples: {{low: 16, high: 128, log: true}}
    per_channel: [true, false]
  {TORCH}: {{}}
"""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    from sweeper.cluster import connect

    connect(num_cpus=2)  # as the ray_local fixture does: a local Ray, kept if one is running
    root = tmp_path_factory.mktemp("sweep")
    space_file = root / "space.yaml"
    space_file.write_text(SPACE)
    summary = run_sweep(load_space(space_file), SweepOptions(out=root / "out"))
    return summary.study_dir


@pytest.fixture(scope="module")
def df(study_dir: Path) -> pd.DataFrame:
    frame = results.load(study_dir)
    assert set(frame["state"]) == {"complete"}, frame[["backend", "error"]].to_string()
    assert set(frame["backend"]) == {STATIC, TORCH}, "the seed gives both backends"
    return frame


def test_pandas_duckdb_and_polars_read_the_same_rows(study_dir: Path, df: pd.DataFrame) -> None:
    import duckdb
    import polars as pl

    pattern = str(study_dir / "trials" / "*.parquet")
    [(count, total)] = duckdb.sql(f"SELECT count(*), sum(trial_number) FROM read_parquet('{pattern}')").fetchall()
    lazy = pl.scan_parquet(pattern).select(pl.len(), pl.col("trial_number").sum()).collect()
    assert count == lazy.item(0, 0) == len(df) == 6
    assert total == lazy.item(0, 1) == df["trial_number"].sum()
    static = df[df["backend"] == STATIC]
    assert static["param.calibration_method"].isin(["minmax", "entropy"]).all()
    assert static["param.calibration_samples"].between(16, 128).all()


def test_pareto_front_is_non_dominated(df: pd.DataFrame) -> None:
    front = analysis.pareto_front(df)
    assert not front.empty
    points = df[list(analysis.PARETO_OBJECTIVES)].to_numpy(dtype=float)
    for row in front[list(analysis.PARETO_OBJECTIVES)].to_numpy(dtype=float):
        assert not ((points <= row).all(axis=1) & (points < row).any(axis=1)).any()
    rest = df[~df["trial_number"].isin(front["trial_number"])]
    front_points = front[list(analysis.PARETO_OBJECTIVES)].to_numpy(dtype=float)
    for row in rest[list(analysis.PARETO_OBJECTIVES)].to_numpy(dtype=float):
        assert ((front_points <= row).all(axis=1) & (front_points < row).any(axis=1)).any()


def test_importance_reads_the_stored_journal(study_dir: Path) -> None:
    result = param_importance(study_dir, min_trials=2)
    assert not result.table.empty or result.notes, "either importances or the reason there are none"
    if not result.table.empty:
        assert set(result.table["scope"]) <= {"all", STATIC, TORCH}
        for _, part in result.table.groupby("scope"):
            assert part["importance"].sum() == pytest.approx(1.0, abs=1e-6)


def test_report_renders_with_every_image(study_dir: Path) -> None:
    written = report.write_report(study_dir)
    assert {"pareto", "speedup", "history"} <= set(written.images)
    page = written.html.read_text()
    embedded = dict((name, base64.b64decode(data)) for data, name in re.findall(
        r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" data-file="([^"]+)"', page))
    on_disk = {p.name: p.read_bytes() for p in written.html.parent.glob("*.png")}
    assert embedded == on_disk, "every PNG written is embedded in the HTML, byte for byte"
    for name, data in on_disk.items():
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR", name
        assert f"]({name})" in written.markdown.read_text()
    assert "Best feasible" in page or "No configuration met" in page


def test_export_then_reevaluate_matches_the_recorded_accuracy(
    study_dir: Path, df: pd.DataFrame, tmp_path: Path
) -> None:
    # The CLI path with --best, re-evaluated by running the exported load_model.py as a user would.
    best = analysis.best_feasible(df, k=1).iloc[0]
    result = CliRunner().invoke(app, ["export", str(study_dir), "--best", "--to", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    run = subprocess.run([sys.executable, "load_model.py"], cwd=tmp_path / "best", capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed["trial"] == best["trial_number"]
    # CPU backends are deterministic for a fixed thread count and batch size: exact equality.
    assert printed["top1_accuracy_pct"] == best["accuracy"] == printed["recorded"]

    # One trial of each backend, reloaded in-process through get_backend(...).load(...). Accuracy
    # alone barely tells models apart on digits (most candidates score as FP32 does), so the
    # largest output difference from FP32 must match the row too: to the last bit, since the
    # reload runs the same artifact with the same threads and batches.
    for backend in (STATIC, TORCH):
        row = df[df["backend"] == backend].iloc[0]
        written = export.export_trial(study_dir, tmp_path / backend, trial=int(row["trial_number"]))
        assert written.artifact.suffix == (".onnx" if backend == STATIC else ".pt")
        measured = export.evaluate_exported(written.directory)
        assert measured == {c: row[c] for c in ("accuracy", "agreement", "output_max_abs_error")}, backend
