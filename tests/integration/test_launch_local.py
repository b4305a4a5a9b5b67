"""Launching as a user does on one machine: which Ray a plain run uses, stopping with a signal,
and artifacts that come home when the workers share no folder with the driver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import start_head

from sweeper import results

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "tasks" / "digits_cnn.py"


def _space(tmp_path: Path, trials: int, min_time_s: float) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(f"""
        task: {DIGITS}
        trials: {trials}
        seed: 0
        max_concurrent: 2
        constraint: {{max_drop: 1.0}}
        hardware: {{num_cpus: 1}}
        measure: {{warmup_runs: 3, min_runs: 20, min_time_s: {min_time_s}}}
        backends:
          onnxruntime_fp32: {{opset: {{low: 14, high: 18}}}}
          torch_dynamic_int8: {{engine: [x86, fbgemm]}}
          onnxruntime_dynamic_int8: {{per_channel: [true, false], weight_type: [int8, uint8]}}
    """))
    return path


def _sweeper(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def own_tmpdir() -> Iterator[Path]:
    """A short TMPDIR: Ray's default folder (and its ``ray_current_cluster`` pointer) moves into it."""
    path = Path(tempfile.mkdtemp(prefix="st", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_plain_run_starts_its_own_ray_despite_a_stale_pointer(own_tmpdir: Path, tmp_path: Path) -> None:
    pointer = own_tmpdir / "ray" / "ray_current_cluster"
    pointer.parent.mkdir()
    pointer.write_text("127.0.0.1:9\n")  # a head that was stopped: nothing listens there
    env = {"TMPDIR": str(own_tmpdir)}
    space = _space(tmp_path, trials=2, min_time_s=0.05)
    done = _sweeper("run", str(space), "--out", str(tmp_path / "out"), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(results.load(tmp_path / "out" / "space")) == 2

    started = time.monotonic()
    auto = _sweeper("run", str(space), "--out", str(tmp_path / "out2"), "--address", "auto", cwd=tmp_path, env=env)
    assert auto.returncode == 2, auto.stdout + auto.stderr
    assert "no Ray cluster answers there" in auto.stderr and "Traceback" not in auto.stderr
    assert time.monotonic() - started < 60, "a stale pointer is an error, not a long hang"
    assert not (tmp_path / "out2" / "space").exists(), "nothing left behind"


def test_a_running_head_is_joined_only_with_address_auto(own_tmpdir: Path, tmp_path: Path) -> None:
    from ray.util.state import list_jobs

    head = start_head(num_cpus=2, temp_dir=own_tmpdir / "ray")
    try:
        env = {"TMPDIR": str(own_tmpdir)}
        space = _space(tmp_path, trials=2, min_time_s=0.05)
        plain = _sweeper("run", str(space), "--out", str(tmp_path / "plain"), cwd=tmp_path, env=env)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        assert list_jobs(address=head.dashboard_url) == [], "a plain run did not join the running head"

        joined = _sweeper("run", str(space), "--out", str(tmp_path / "auto"), "--address", "auto", cwd=tmp_path, env=env)
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert len(list_jobs(address=head.dashboard_url)) == 1, "--address auto joined the running head"
    finally:
        head.stop()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_driver_stops_cleanly_and_resume_completes(sig: int, code: int, tmp_path: Path) -> None:
    space = _space(tmp_path, trials=6, min_time_s=1.5)
    out = tmp_path / "out"
    study_dir = out / "space"
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(space), "--out", str(out)]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not results.row_path(study_dir, 0).exists():
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    os.kill(driver.pid, sig)  # the driver alone, as `kill` or a notebook's interrupt does
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == code, stdout + stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "--resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    before = results.load(study_dir)
    interrupted = before["error"].fillna("").str.startswith("interrupted:")
    assert interrupted.any(), "the trials in flight are recorded as interrupted"
    assert (~interrupted).sum() < 6, "the sweep stopped early"

    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = results.load(study_dir)
    assert after["trial_number"].is_unique
    finished = after[~after["error"].fillna("").str.startswith("interrupted:")]
    assert len(finished) == 6 and set(finished["state"]) == {"complete"}


@pytest.fixture
def cluster() -> Iterator:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    yield c
    c.shutdown()


def test_artifacts_come_home_when_workers_share_no_folder_with_the_driver(cluster, tmp_path: Path) -> None:
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    space = _space(tmp_path, trials=4, min_time_s=0.05)
    # A relative --out: the workers run in their own working folders (the task folder as Ray
    # unpacks it on each node), where a path relative to the driver's folder means nothing.
    run = _sweeper("run", str(space), "--out", "out", "--address", cluster.address, cwd=driver_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    df = results.load(driver_dir / "out" / "space")
    assert len(df) == 4 and set(df["state"]) == {"complete"}
    assert df["node_id"].nunique() == 2, "trials ran on both worker nodes"
    for row in df.itertuples():
        artifact = Path(row.artifact_path)
        assert artifact.is_file() and artifact.stat().st_size == row.size_bytes, row.artifact_path
        assert artifact.is_relative_to(driver_dir / "out" / "space" / "artifacts")
    exported = _sweeper("export", "out/space", "--best", "--to", "shipped", cwd=driver_dir)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (driver_dir / "shipped" / "config.json").is_file()
