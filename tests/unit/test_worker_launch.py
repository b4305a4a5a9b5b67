"""How a driver's workers get sweeper and the task: embedded, cluster, and inside a Ray job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sweeper
from sweeper.cluster import JOB_CONFIG_ENV_VAR, RUNTIME_ENV_EXCLUDES, worker_launch
from sweeper.errors import SweeperInputError

PACKAGE = Path(sweeper.__file__).resolve().parent


def _in_job(monkeypatch, runtime_env: dict) -> None:
    monkeypatch.setenv(JOB_CONFIG_ENV_VAR, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_embedded_ray_sends_nothing(tmp_path: Path) -> None:
    task = tmp_path / "my_task.py"
    launch = worker_launch(None, task)
    assert launch.runtime_env is None and launch.task_path == str(task.resolve())


def test_a_cluster_gets_the_task_folder_and_the_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(JOB_CONFIG_ENV_VAR, raising=False)
    launch = worker_launch("auto", tmp_path / "my_task.py")
    assert launch.runtime_env == {
        "working_dir": str(tmp_path.resolve()), "py_modules": [str(PACKAGE)], "excludes": RUNTIME_ENV_EXCLUDES,
    }
    assert launch.task_path == "my_task.py"


def test_inside_a_job_with_a_working_dir_the_driver_adds_only_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tasks").mkdir()
    monkeypatch.chdir(tmp_path)  # a job's entrypoint runs in the job's unpacked working directory
    _in_job(monkeypatch, {"working_dir": "gcs://_ray_pkg_abc.zip"})
    launch = worker_launch("auto", tmp_path / "tasks" / "my_task.py")
    # sweeper is not inside this working dir, so it travels as a py_module; no working_dir of ours.
    assert launch.runtime_env == {"py_modules": [str(PACKAGE)]}
    assert launch.task_path == "tasks/my_task.py"


def test_inside_a_job_that_ships_py_modules_nothing_is_added(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _in_job(monkeypatch, {"working_dir": "gcs://_ray_pkg_abc.zip", "py_modules": ["gcs://_ray_pkg_def.zip"]})
    launch = worker_launch("auto", tmp_path / "my_task.py")
    assert launch.runtime_env is None and launch.task_path == "my_task.py"


def test_inside_a_job_without_a_working_dir_the_task_folder_becomes_one(tmp_path: Path, monkeypatch) -> None:
    _in_job(monkeypatch, {"env_vars": {"A": "1"}})
    launch = worker_launch("auto", tmp_path / "my_task.py")
    assert launch.runtime_env["working_dir"] == str(tmp_path.resolve())
    assert launch.task_path == "my_task.py"


def test_a_task_outside_the_jobs_working_dir_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    _in_job(monkeypatch, {"working_dir": "gcs://_ray_pkg_abc.zip"})
    with pytest.raises(SweeperInputError, match="outside the Ray job's working directory"):
        worker_launch("auto", tmp_path / "elsewhere.py")
