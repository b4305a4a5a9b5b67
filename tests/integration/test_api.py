"""The Python API: sweeper.run on a dict space and a ModelTask task file, then the Study it returns."""

from __future__ import annotations

from pathlib import Path

import pytest

import sweeper
from sweeper.errors import ConfigError, SweeperInputError

pytestmark = pytest.mark.integration

TASK = Path(__file__).resolve().parents[1] / "fixtures" / "tasks" / "digits_trained_mlp.py"
SPACE = {
    "task": str(TASK),
    "trials": 4,
    "seed": 0,
    "constraint": {"max_drop": 1.0},
    "hardware": {"num_cpus": 1},
    "measure": {"warmup_runs": 3, "min_runs": 20, "min_time_s": 0.05},
    "backends": {
        "onnxruntime_fp32": {},
        "onnxruntime_dynamic_int8": {"per_channel": [True, False], "weight_type": ["int8", "uint8"]},
    },
}


def test_run_a_dict_space_on_a_model_task_and_read_the_winner(ray_local, tmp_path: Path) -> None:
    study = sweeper.run(SPACE, out=tmp_path / "out", study="api", progress=False)
    assert study.dir == tmp_path / "out" / "api"
    rows = study.rows
    assert len(rows) == 4 and set(rows["state"]) == {"complete"}, rows[["backend", "error"]].to_string()
    assert set(rows["task"]) == {"digits_trained_mlp"}
    best = study.best
    assert best is not None and best["feasible"]
    # The winner is chosen from the finalists' confirmed figures: rank 1, and no finalist outside
    # its tie group was confirmed faster (trials' own figures: see tests/integration/test_finalists.py).
    held = rows[rows["confirmed_feasible"].fillna(False).astype(bool)]
    assert best["confirmed_rank"] == 1 and best["trial_number"] in set(held["trial_number"])
    group = held["confirmed_tie_group"] == best["confirmed_tie_group"]
    assert (held[~group]["confirmed_latency_ms_p50"] > held[group]["confirmed_latency_ms_p50"].min()).all()
    assert f"trial {best['trial_number']} {best['backend']}" in study.verdict
    exported = study.export(tmp_path / "shipped")
    assert exported.trial_number == best["trial_number"] and exported.artifact.is_file()
    assert study.report().html.is_file()
    assert sweeper.open_study(study.dir).best["trial_number"] == best["trial_number"]
    assert len(sweeper.load(study.dir)) == 4


def test_errors_name_the_arguments(ray_local, tmp_path: Path) -> None:
    with pytest.raises(SweeperInputError, match=r"resume=True") as caught:
        sweeper.run(SPACE, out=tmp_path / "out", study="missing", resume=True, progress=False)
    assert "--" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"space: key 'constraint.max_drop'"):
        sweeper.run({**SPACE, "constraint": {"max_drop": -1}}, out=tmp_path / "out", progress=False)
    with pytest.raises(SweeperInputError, match=r"trials=0"):
        sweeper.run(SPACE, trials=0, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing left behind"
