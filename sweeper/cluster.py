"""Connecting to Ray: an embedded local instance by default, or an existing cluster.

Token authentication stays on. When ``RAY_AUTH_MODE`` is unset it is set to ``token`` here, before
Ray is imported (Ray reads it once, at import), so a local instance, its workers and every client
agree; the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
(which Ray creates for a new local instance). Where Ray was imported already, its own default
applies, which is token authentication for a new local instance too.

On an existing cluster the workers get the project's code through a runtime environment: the
``sweeper`` package as a py_module and the task's folder as the working directory. A driver that
runs inside a Ray job (``ray job submit --working-dir .``) already has a runtime environment;
Ray refuses to merge two that set the same field, so the driver adds only the fields the job's
lacks (see :func:`worker_launch`).

Without an address, a fresh local instance is started (``address="local"``): a ``ray start`` left
on the machine, or the stale pointer to one, is never joined by accident.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperInputError

# Files of a task folder that never need to travel to the workers.
RUNTIME_ENV_EXCLUDES = [".git", ".venv", "__pycache__", "results", "*.onnx", "*.pt", "*.parquet"]


# Set by Ray in the environment of a job's entrypoint: the job's config, with its runtime env.
JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class WorkerLaunch:
    """How a cluster's workers get the code: the runtime env to join with, and the task's path."""

    runtime_env: dict[str, Any] | None
    task_path: str


def job_runtime_env() -> dict[str, Any] | None:
    """The runtime env of the Ray job this process is the entrypoint of, or ``None`` outside a job."""
    raw = os.environ.get(JOB_CONFIG_ENV_VAR)
    if not raw:
        return None
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def worker_launch(address: str | None, task_file: Path) -> WorkerLaunch:
    """Plan how the workers of ``address`` find sweeper and the task file.

    Embedded local Ray: the workers share this machine, so nothing travels. An existing cluster:
    the task's folder becomes the working directory and sweeper a py_module. Inside a Ray job
    whose runtime env already sets a field (``working_dir``, ``py_modules``), that field is the
    job's: a task file inside the job's working directory is found there, relative to it, and a
    sweeper package inside it travels with it.

    Raises:
        SweeperInputError: when the task file cannot reach the workers of the job.
    """
    task_file = task_file.resolve()
    if address is None:
        return WorkerLaunch(runtime_env=None, task_path=str(task_file))
    job_env = job_runtime_env()
    if job_env is None:
        fresh: dict[str, Any] = {
            "working_dir": str(task_file.parent),
            "py_modules": [str(_package_dir())],
            "excludes": RUNTIME_ENV_EXCLUDES,
        }
        return WorkerLaunch(runtime_env=fresh, task_path=task_file.name)
    env: dict[str, Any] = {}
    cwd = Path.cwd().resolve()
    if "working_dir" in job_env:
        # The entrypoint runs in the job's unpacked working directory, and so do the workers.
        if not task_file.is_relative_to(cwd):
            raise SweeperInputError(
                f"task file '{task_file}' is outside the Ray job's working directory ({cwd}), so the "
                "cluster's workers cannot read it. Put the task in the folder given to "
                "'ray job submit --working-dir', or name it relative to that folder."
            )
        task_path = str(task_file.relative_to(cwd))
    else:
        env |= {"working_dir": str(task_file.parent), "excludes": RUNTIME_ENV_EXCLUDES}
        task_path = task_file.name
    package = _package_dir()
    in_job_dir = "working_dir" in job_env and package.is_relative_to(cwd)
    if not in_job_dir and "py_modules" not in job_env:
        env["py_modules"] = [str(package)]
    return WorkerLaunch(runtime_env=env or None, task_path=task_path)


def resolve_auto_address() -> str:
    """The GCS address that ``--address auto`` means here: ``RAY_ADDRESS``, else the last ``ray start``.

    Raises:
        SweeperInputError: when no cluster was started on this machine.
    """
    env_address = os.environ.get("RAY_ADDRESS")
    if env_address and env_address != "auto":
        return env_address
    from ray._common.utils import get_ray_address_file

    pointer = Path(get_ray_address_file(None))
    address = pointer.read_text().strip() if pointer.is_file() else ""
    if not address:
        raise SweeperInputError(
            "--address auto found no Ray cluster on this machine (no RAY_ADDRESS, no 'ray start' "
            "head). Start one with 'ray start --head', give its address, or leave --address out to "
            "start an embedded local Ray."
        )
    return address


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when nothing listens at a ``host:port`` address.

    ``auto`` is resolved as Ray would (``RAY_ADDRESS``, else the last ``ray start`` on this
    machine), so a stale pointer to a stopped head is an error here instead of a long hang.

    Raises:
        SweeperInputError: when the address is malformed or nothing answers there.
    """
    _default_token_auth()
    if address == "auto":
        resolved = resolve_auto_address()
        if resolved.startswith(("http://", "https://")):
            return
        try:
            check_address(resolved, timeout_s)
        except SweeperInputError:
            raise SweeperInputError(
                f"--address auto points at {resolved!r} (the last 'ray start' on this machine), but no "
                "Ray cluster answers there: it was stopped. Start one with 'ray start --head', or leave "
                "--address out to start an embedded local Ray."
            ) from None
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SweeperInputError(
            f"--address {address!r} is not an address; give 'auto', 'HOST:PORT' (the GCS port, "
            "usually 6379) or 'ray://HOST:PORT' (the Ray client port, usually 10001)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SweeperInputError(
            f"no Ray cluster answers at --address {address!r} ({exc.strerror or exc}). Give the address "
            "of a running cluster ('auto' on a cluster node, 'HOST:6379' or 'ray://HOST:10001'), or "
            "leave --address out to start an embedded local Ray."
        ) from None


def _default_token_auth() -> None:
    """Token authentication unless the user chose otherwise; Ray reads it once, when imported."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    env: dict[str, Any] | None = None,
    debug: bool = False,
) -> None:
    """Start an embedded Ray instance, or join the cluster at ``address``, unless already connected.

    Raises:
        SweeperInputError: when no cluster answers at ``address``.
    """
    _default_token_auth()
    if address is not None:
        check_address(address)
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if debug else logging.WARNING,
        "log_to_driver": debug,
    }
    if address is None:
        # "local" starts a new instance; plain ray.init() would join a running 'ray start' head
        # (or hang on the stale pointer one leaves behind).
        kwargs |= {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
    else:
        kwargs |= {"address": address, "runtime_env": env}
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError) as exc:
        if address is None:
            raise
        raise SweeperInputError(
            f"could not join the Ray cluster at --address {address!r}: {type(exc).__name__}: {exc}"
        ) from None


def cluster_cpus() -> int:
    """CPUs the connected cluster offers in total."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
