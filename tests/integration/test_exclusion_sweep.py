from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sweeper import results
from sweeper.events import Event, SensitivityProgress
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration


def test_exclusion_sweep_ranks_layers_then_searches_them(ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space("""
        task: digits_cnn
        trials: 6
        seed: 0
        max_concurrent: 2
        constraint: {max_drop: 1.0}
        early_stop: {fraction: 0.25, margin: 2.0}
        backends:
          onnxruntime_static_int8:
            calibration_samples: [64, 128]
            exclude: {top_k: {low: 0, high: 4}}
    """))
    events: list[Event] = []
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"), events.append)

    table = pd.read_parquet(summary.study_dir / "sensitivity.parquet")
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert table["output_error"].is_monotonic_decreasing
    assert {"layer", "op_type", "metric_drop", "output_error", "sqnr_db"} <= set(table.columns)
    ranking = table["layer"].tolist()
    assert any(isinstance(e, SensitivityProgress) and e.done == e.total == len(ranking) for e in events)

    df = results.load(summary.study_dir)
    assert len(df) == 6 and set(df["state"]) == {"complete"}, df[["state", "error"]].to_string()
    # The warm-start ladder comes first: no exclusion, then the top 1, 2 and 4 layers.
    ladder = df.sort_values("trial_number").head(4)
    assert ladder["n_excluded"].tolist() == [0, 1, 2, 4]
    for row in df.itertuples():
        excluded = list(row.excluded_layers)
        assert excluded == ranking[: len(excluded)], "top-k exclusion takes a prefix of the ranking"
        assert json.loads(row.params_json)["nodes_to_exclude"] == excluded
        assert row.n_excluded == len(excluded)
        # A quarter of the trial part (360 evaluation samples less the 120 held out for confirmation).
        assert row.subset_samples == 60 and row.subset_accuracy is not None

    # A resumed study keeps its ranking (read back from the study folder, not recomputed).
    before = (summary.study_dir / "sensitivity.parquet").stat().st_mtime_ns
    run_sweep(space, SweepOptions(out=tmp_path / "out", resume=True, trials=7))
    assert (summary.study_dir / "sensitivity.parquet").stat().st_mtime_ns == before
    assert len(results.load(summary.study_dir)) == 7
