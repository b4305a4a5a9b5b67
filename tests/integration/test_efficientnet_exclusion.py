"""A layer-exclusion sweep on the real pretrained EfficientNet-Lite0 (tasks/efficientnet_lite0.py):
the study-level ranking scores each of its 50 layers without a failure, and the ladder leaves the
top ones of that ranking in float."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from sweeper import results
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep
from sweeper.task import load_task

# About 5.5 minutes on 2 cores (the 50-layer ranking on 720 views), too long for the default run: pytest -m slow.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
TASK = Path(__file__).resolve().parents[2] / "tasks" / "efficientnet_lite0.py"


@pytest.fixture(scope="module")
def available() -> None:
    import sys

    task = load_task(str(TASK))
    reason = sys.modules[type(task).__module__].unavailable_reason()
    if reason:
        pytest.skip(reason)
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")


def test_efficientnet_lite0_exclusion_sweep_completes(available, ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space(f"""
        task: {TASK}
        trials: 2
        seed: 0
        max_concurrent: 2
        constraint: {{max_drop: 1.0}}
        early_stop: {{fraction: 0.25, margin: 2.0}}
        confirm: {{finalists: 0}}
        backends:
          onnxruntime_static_int8:
            per_channel: true
            calibration_samples: 32
            exclude: {{top_k: {{low: 0, high: 1}}}}
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"), lambda event: None)

    table = pd.read_parquet(summary.study_dir / "sensitivity.parquet")
    # 49 Conv and 1 Gemm, each with what belongs to it (its ReLU6 Clip): layers, not activations.
    assert len(table) == 50 and set(table["op_type"]) == {"Conv", "Gemm"}
    assert table["error"].isna().all(), table.loc[table["error"].notna(), ["layer", "error"]].to_string()
    assert table["module"].notna().all()
    ranking = table.sort_values("rank")["layer"].tolist()

    df = results.load(summary.study_dir).sort_values("trial_number")
    assert len(df) == 2 and set(df["state"]) <= {"complete", "pruned"}, df[["state", "error"]].to_string()
    assert df["n_excluded"].tolist() == [0, 1]
    for row in df.itertuples():
        assert json.loads(row.params_json)["nodes_to_exclude"] == ranking[: row.n_excluded]
