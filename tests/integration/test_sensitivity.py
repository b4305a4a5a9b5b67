"""Layer sensitivity on a real local Ray: failures become rows, rows are written as they arrive,
an interrupted ranking resumes where it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sweeper import results
from sweeper.errors import SensitivityError
from sweeper.sensitivity import cache_path, parts_dir, read_parts, run_sensitivity
from sweeper.space import load_space
from sweeper.spec import TaskRef
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_TASKS = ROOT / "tests" / "fixtures" / "tasks"
UNQUANTIZABLE = FIXTURE_TASKS / "digits_unquantizable_layer.py"
FAILING_LAYER = "/features/features.3/Conv"  # digits_unquantizable_layer.FAILING_LAYER
BACKEND = "onnxruntime_static_int8"
PARAMS = {"calibration_samples": 64}
DIGITS_UNITS = ["/features/features.0/Conv", "/features/features.3/Conv", "/features/features.7/Conv",
                "/classifier/classifier.1/Gemm", "/classifier/classifier.3/Gemm"]  # fmt: skip


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sensitivity cache of the test's own (the driver writes it; workers keep the shared one)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(path))
    return path


def test_an_unscorable_layer_ranks_first_and_the_sweep_completes(ray_local, private_cache, write_space, tmp_path: Path) -> None:
    space = load_space(write_space(f"""
        task: {UNQUANTIZABLE}
        trials: 3
        seed: 0
        max_concurrent: 2
        constraint: {{max_drop: 1.0}}
        backends:
          {BACKEND}:
            calibration_samples: 64
            exclude: {{top_k: {{low: 0, high: 2}}}}
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"))

    table = pd.read_parquet(summary.study_dir / "sensitivity.parquet")
    assert table["layer"].tolist()[0] == FAILING_LAYER and table["rank"].iloc[0] == 1
    assert "Failed to find proper ai.onnx domain" in table["error"].iloc[0]
    assert table["error"].iloc[1:].isna().all() and table["output_error"].iloc[1:].notna().all()
    assert sorted(table["layer"]) == sorted(DIGITS_UNITS)
    assert table["module"].iloc[0] == "features.3"
    assert list(table["members"].iloc[0]) == [FAILING_LAYER, "/features/features.5/Relu"]

    df = results.load(summary.study_dir).sort_values("trial_number")
    assert len(df) == 3
    # The ladder: excluding nothing quantizes the failing layer (a failed row), excluding the top
    # one or two leaves it in float.
    assert df["n_excluded"].tolist() == [0, 1, 2]
    assert df["state"].tolist() == ["failed", "complete", "complete"], df[["state", "error"]].to_string()
    assert "Failed to find proper ai.onnx domain" in df["error"].iloc[0]
    assert all(list(layers)[0] == FAILING_LAYER for layers in df["excluded_layers"].iloc[1:])
    assert json.loads(df["params_json"].iloc[1])["nodes_to_exclude"] == [FAILING_LAYER]


class _Interrupted(Exception):
    pass


def test_rows_are_written_as_they_arrive_and_a_rerun_scores_only_the_rest(ray_local, private_cache, digits_task_path: Path) -> None:
    task_ref = TaskRef(name="digits_cnn", path=str(digits_task_path))
    parts = parts_dir(cache_path(task_ref, BACKEND, PARAMS))

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        run_sensitivity(task_ref, BACKEND, PARAMS, ray_options={"num_cpus": 1}, num_threads=1, chunk_size=1,
                        on_progress=stop_after_two)  # fmt: skip
    written = read_parts(parts)
    assert written is not None and len(written) == 2 and set(written["layer"]) <= set(DIGITS_UNITS)
    assert not cache_path(task_ref, BACKEND, PARAMS).exists()

    progress: list[tuple[int, int]] = []
    table = run_sensitivity(task_ref, BACKEND, PARAMS, ray_options={"num_cpus": 1}, num_threads=1, chunk_size=1,
                            on_progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    assert progress[0] == (2, 5), "the two finished layers are read back"
    assert [done for done, _ in progress[1:]] == [3, 4, 5], "only the other three are scored"
    assert sorted(table["layer"]) == sorted(DIGITS_UNITS) and table["rank"].tolist() == [1, 2, 3, 4, 5]
    first = table.set_index("layer").loc[written["layer"], "output_error"]
    assert first.tolist() == written["output_error"].tolist()
    assert cache_path(task_ref, BACKEND, PARAMS).is_file() and not parts.exists()


def test_a_task_that_cannot_be_listed_is_a_clear_error(ray_local, private_cache) -> None:
    task_ref = TaskRef(name="digits_unexportable", path=str(FIXTURE_TASKS / "digits_unexportable.py"))
    with pytest.raises(SensitivityError) as info:
        run_sensitivity(task_ref, BACKEND, PARAMS, ray_options={"num_cpus": 1}, num_threads=1)
    message = str(info.value)
    assert "digits_unexportable" in message and BACKEND in message and "could not list" in message
    assert "OnnxExportError" in message


def test_cli_sensitivity_reports_an_unscorable_layer_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "SWEEPER_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "sweeper.cli", "sensitivity", "--task", str(UNQUANTIZABLE), "--backend", BACKEND,
         "--param", "calibration_samples=64", "--num-cpus", "1", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    assert f"{FAILING_LAYER} could not be scored" in run.stdout
    assert "features.3" in run.stdout and "5 layers; everything quantized: failed to build" in run.stdout
