"""The README's cluster launch, for real: ``ray start --head`` and a job through the Ray Jobs SDK.

The job's working directory is a copy of the project, as ``ray job submit --working-dir .`` makes
it, and its entrypoint is the README's ``sweeper run ... --address auto``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import RayHead, start_head

from sweeper import results

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROJECT_IGNORE = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "*.egg-info", ".pytest_cache", "tests")

SLOW_SPACE = """
task: digits_cnn
trials: 10
seed: 0
max_concurrent: 2
constraint: {max_drop: 1.0}
hardware: {num_cpus: 1}
measure: {warmup_runs: 3, min_runs: 20, min_time_s: 2.0}
backends:
  onnxruntime_fp32: {opset: {low: 14, high: 18}}
  torch_dynamic_int8: {engine: [x86, fbgemm]}
  onnxruntime_dynamic_int8: {per_channel: [true, false], weight_type: [int8, uint8]}
"""


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    started = start_head(num_cpus=2)
    yield started
    started.stop()


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=PROJECT_IGNORE)
    (project / "search_spaces" / "slow.yaml").write_text(SLOW_SPACE)
    return project


def _wait(client, job_id: str, until, timeout_s: float = 420):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if until(status) or status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)}")


def _rows(study_dir: Path):
    return results.load(study_dir) if results.trials_dir(study_dir).is_dir() else None


def test_the_readme_job_submit_command_runs_a_sweep(head: RayHead, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = _project_copy(tmp_path)
    out = tmp_path / "out"
    client = JobSubmissionClient(head.dashboard_url)
    job_id = client.submit_job(
        entrypoint=f"sweeper run search_spaces/quickstart.yaml --address auto --trials 4 --out {out}",
        runtime_env={"working_dir": str(project)},
    )
    status = _wait(client, job_id, lambda s: False)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "Traceback" not in logs, logs
    df = results.load(out / "quickstart")
    assert len(df) == 4 and df["trial_number"].is_unique
    assert set(df["state"]) == {"complete"}, df[["backend", "error"]].to_string()
    for path in df["artifact_path"]:
        assert Path(path).is_file() and Path(path).is_relative_to(out / "quickstart"), path


def test_a_stopped_job_resubmitted_with_resume_loses_and_duplicates_nothing(head: RayHead, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = _project_copy(tmp_path)
    out = tmp_path / "out"
    study_dir = out / "slow"
    command = f"sweeper run search_spaces/slow.yaml --address auto --out {out}"
    client = JobSubmissionClient(head.dashboard_url)
    first = client.submit_job(entrypoint=command, runtime_env={"working_dir": str(project)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        df = _rows(study_dir)
        if df is not None and len(df) >= 2:
            break
        assert client.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(first)
        time.sleep(0.5)
    client.stop_job(first)
    assert _wait(client, first, lambda s: False, timeout_s=120) == JobStatus.STOPPED
    before = results.load(study_dir)
    done_before = before[~before["error"].fillna("").str.startswith("interrupted:")]
    assert 2 <= len(done_before) < 10, "the job was stopped mid-sweep"

    second = client.submit_job(entrypoint=f"{command} --resume", runtime_env={"working_dir": str(project)})
    status = _wait(client, second, lambda s: False)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(second)
    after = results.load(study_dir)
    assert after["trial_number"].is_unique, "no row is duplicated"
    kept = after.set_index("trial_number").loc[before["trial_number"], "finished_at"].tolist()
    assert kept == before["finished_at"].tolist(), "rows written before the stop are kept as they were"
    finished = after[~after["error"].fillna("").str.startswith("interrupted:")]
    assert len(finished) == 10 and set(finished["state"]) == {"complete"}
