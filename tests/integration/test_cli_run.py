"""The CLI as a user runs it: a separate process that starts its own embedded Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeper import results

pytestmark = pytest.mark.integration


def _sweeper(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_run_then_show(write_space, tmp_path: Path, root: Path) -> None:
    space = write_space("""
        task: digits_cnn
        trials: 4
        seed: 0
        constraint: {max_drop: 1.0}
        backends:
          onnxruntime_fp32: {opset: {low: 14, high: 18}}
          torch_dynamic_int8: {engine: [x86, fbgemm]}
          onnxruntime_dynamic_int8: {per_channel: [true, false], weight_type: [int8, uint8]}
    """, name="cli_space.yaml")
    out = tmp_path / "out"
    run = _sweeper("run", str(space), "--out", str(out), "--study", "cli", cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Best feasible" in run.stdout
    df = results.load(out / "cli")
    assert len(df) == 4 and df["trial_number"].is_unique
    best = df[df["feasible"]].sort_values("latency_ms_p50").iloc[0]
    assert f"trial {best.trial_number} {best.backend}" in run.stdout

    show = _sweeper("show", str(out / "cli"), cwd=root)
    assert show.returncode == 0, show.stderr
    assert "Trials: 4" in show.stdout and f"trial {best.trial_number} {best.backend}" in show.stdout


def test_cli_task_without_task_object_leaves_nothing(write_space, tmp_path: Path, root: Path) -> None:
    task_file = tmp_path / "no_task.py"
    task_file.write_text("VALUE = 1\n")
    space = write_space(f"""
        task: {task_file}
        constraint: {{max_drop: 1.0}}
        backends: {{onnxruntime_fp32: {{}}}}
    """)
    out = tmp_path / "out"
    run = _sweeper("run", str(space), "--out", str(out), cwd=root)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "defines no 'TASK'" in run.stderr and "Traceback" not in run.stderr
    assert not (out / "space").exists()
