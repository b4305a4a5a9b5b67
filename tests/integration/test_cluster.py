"""Sweeps on a real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeper import results
from sweeper.events import Event, TrialStarted
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster() -> Iterator:
    """A head node (the driver's; runs no trial) plus whatever worker nodes the test adds."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the cluster's driver connection replaces any local instance of this process
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    yield c
    ray.shutdown()
    c.shutdown()


def test_trials_land_on_the_nodes_of_their_targets(cluster, write_space, tmp_path: Path) -> None:
    small = cluster.add_node(num_cpus=1, resources={"small_node": 1})
    large = cluster.add_node(num_cpus=1, resources={"large_node": 1}, labels={"tier": "large"})
    # A node that advertises one (logical) GPU: the GPU target's trials must land there. No CUDA
    # exists on this machine, so the backend placed there runs its CPU path (autocast bfloat16).
    gpu = cluster.add_node(num_cpus=1, num_gpus=1)
    space = load_space(write_space("""
        task: digits_cnn
        trials: 8
        seed: 0
        max_concurrent: 3
        constraint: {max_drop: 1.0}
        targets:
          small: {kind: cpu, num_cpus: 1, resources: {small_node: 1}}
          large: {kind: cpu, num_cpus: 1, labels: {tier: large}}
          gpu: {kind: gpu, num_cpus: 1, num_gpus: 1}
        backends:
          onnxruntime_fp32: {target: small, opset: {low: 14, high: 18}}
          torch_dynamic_int8: {target: large, engine: [x86, fbgemm]}
          torch_autocast: {target: gpu, device: cpu, dtype: [bfloat16, float16]}
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out", address=cluster.address))
    df = results.load(summary.study_dir)
    assert len(df) == 8 and set(df["state"]) == {"complete"}, df[["backend", "error"]].to_string()
    assert df["backend"].nunique() == 3
    expected = {"onnxruntime_fp32": small.node_id, "torch_dynamic_int8": large.node_id, "torch_autocast": gpu.node_id}
    targets = {"onnxruntime_fp32": "small", "torch_dynamic_int8": "large", "torch_autocast": "gpu"}
    for row in df.itertuples():
        assert row.node_id == expected[row.backend], (row.backend, row.node_id)
        assert row.target == targets[row.backend]
        assert row.device == "cpu", "the row names the device the candidate really ran on"


def test_a_worker_node_killed_mid_sweep_loses_nothing(cluster, write_space, tmp_path: Path) -> None:
    first = cluster.add_node(num_cpus=1, resources={"worker": 1})
    second = cluster.add_node(num_cpus=1, resources={"worker": 1})
    space = load_space(write_space("""
        task: digits_cnn
        trials: 6
        seed: 0
        max_concurrent: 2
        constraint: {max_drop: 1.0}
        hardware: {num_cpus: 1, resources: {worker: 1}}
        backends:
          onnxruntime_fp32: {opset: {low: 14, high: 18}}
          torch_dynamic_int8: {engine: [x86, fbgemm]}
          onnxruntime_dynamic_int8: {per_channel: [true, false], weight_type: [int8, uint8]}
    """))
    # Longer trials, so that the node dies while trials run on it.
    measure = space.measure.model_copy(update={"min_time_s": 2.0})
    space = dataclasses.replace(space, file=space.file.model_copy(update={"measure": measure}))
    killed: list[str] = []
    started: list[int] = []

    def kill_first_node_once_busy(event: Event) -> None:
        if not isinstance(event, TrialStarted):
            return
        started.append(event.trial_number)
        if len(started) == 3:  # the nodes' workers are warm by now

            def kill() -> None:
                # Kill the node while a trial holds its one "worker" slot (a trial holds it from
                # its lease to its end, several seconds here), so that a trial dies with it.
                from ray._private.state import available_resources_per_node

                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if available_resources_per_node().get(first.node_id, {}).get("worker", 0) < 1:
                        break
                    time.sleep(0.05)
                time.sleep(1.0)  # into the trial's build and timing (its attempt is counted when it begins)
                killed.append(first.node_id)
                cluster.remove_node(first, allow_graceful=False)

            threading.Thread(target=kill, daemon=True).start()

    summary = run_sweep(space, SweepOptions(out=tmp_path / "out", address=cluster.address), kill_first_node_once_busy)
    df = results.load(summary.study_dir)
    assert killed, "the node was killed during the sweep"
    assert len(df) == 6 and df["trial_number"].is_unique, "one row per trial"
    assert set(df["state"]) == {"complete"}, df[["trial_number", "state", "error"]].to_string()
    retried = df[df["attempt"] > 1]
    assert not retried.empty, "a trial on the killed node was retried"
    assert (retried["node_id"] == second.node_id).all(), "retries ran on the surviving node"


def _rows(study_dir: Path):
    try:
        return results.load(study_dir)
    except FileNotFoundError:
        return None


def test_a_killed_driver_resumes_without_duplicates(cluster, write_space, tmp_path: Path) -> None:
    cluster.add_node(num_cpus=2, resources={"worker": 2})
    space = write_space("""
        task: digits_cnn
        trials: 8
        seed: 0
        max_concurrent: 2
        constraint: {max_drop: 1.0}
        hardware: {num_cpus: 1, resources: {worker: 1}}
        backends:
          onnxruntime_fp32: {opset: {low: 14, high: 18}}
          torch_dynamic_int8: {engine: [x86, fbgemm]}
          onnxruntime_dynamic_int8: {per_channel: [true, false], weight_type: [int8, uint8]}
    """)
    out = tmp_path / "out"
    study_dir = out / "space"
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(space), "--out", str(out), "--address", cluster.address]
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        df = _rows(study_dir)
        if df is not None and len(df) >= 3:
            break
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = results.load(study_dir)
    assert 3 <= len(before) < 8, "the driver died mid-sweep"

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = results.load(study_dir)
    assert after["trial_number"].is_unique, "no row is duplicated"
    kept = after.set_index("trial_number").loc[before["trial_number"], "finished_at"].tolist()
    assert kept == before["finished_at"].tolist(), "finished rows are kept as they were"
    interrupted = after["error"].fillna("").str.startswith("interrupted:")
    assert (~interrupted).sum() == 8, "the study ends with its 8 trials done"
    assert set(after.loc[~interrupted, "state"]) == {"complete"}


def test_a_node_with_other_fp32_weights_fails_its_trials_clearly(
    cluster, write_space, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd_nodes = tmp_path / "odd-nodes.txt"
    monkeypatch.setenv("SWEEPER_TEST_ODD_NODES", str(odd_nodes))  # the nodes' workers inherit it
    monkeypatch.setenv("SWEEPER_TEST_DIGITS_TASK", str(ROOT / "tasks" / "digits_cnn.py"))
    cluster.add_node(num_cpus=1, resources={"worker": 1})
    odd = cluster.add_node(num_cpus=1, resources={"worker": 1})
    odd_nodes.write_text(odd.node_id)
    task = ROOT / "tests" / "fixtures" / "tasks" / "digits_node_weights.py"
    space = load_space(write_space(f"""
        task: {task}
        trials: 6
        seed: 0
        max_concurrent: 2
        constraint: {{max_drop: 1.0}}
        hardware: {{kind: cpu, num_cpus: 1, resources: {{worker: 1}}}}
        backends:
          onnxruntime_static_int8:
            calibration_method: [minmax, entropy, percentile]
            calibration_samples: {{low: 16, high: 256, log: true}}
            per_channel: [true, false]
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out", address=cluster.address))
    df = results.load(summary.study_dir)
    info = results.read_study_info(summary.study_dir)
    study_print = info["baseline"]["fingerprint"]
    by_node = {node: rows for node, rows in df.groupby("node_id")}
    assert len(by_node) == 2, "trials ran on both worker nodes"
    prints = {node: set(rows["fp32_fingerprint"]) for node, rows in by_node.items()}
    assert all(len(p) == 1 for p in prints.values()) and len(set().union(*prints.values())) == 2
    for node, rows in by_node.items():
        if prints[node] == {study_print}:
            assert set(rows["state"]) == {"complete"}, rows["error"].tolist()
        else:
            assert set(rows["state"]) == {"failed"}
            assert all("differ from the study's" in e and study_print in e for e in rows["error"])
    # Weights differ, the evaluation data do not: the fingerprints share their data half.
    assert len({p.split("-")[1] for p in set().union(*prints.values())}) == 1
    assert df["node_accuracy_fp32"].notna().all()
