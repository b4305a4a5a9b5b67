"""Connecting to Ray: an embedded local instance by default, or an existing cluster.

Token authentication stays on. When ``RAY_AUTH_MODE`` is unset it is set to ``token`` here, before
Ray is imported (Ray reads it once, at import), so a local instance, its workers and every client
agree; the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
(which Ray creates for a new local instance). Where Ray was imported already, its own default
applies, which is token authentication for a new local instance too.

On an existing cluster the workers get the project's code through a runtime environment: the
``sweeper`` package as a py_module and the task's folder as the working directory.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from sweeper.errors import SweeperInputError

# Files of a task folder that never need to travel to the workers.
RUNTIME_ENV_EXCLUDES = [".git", ".venv", "__pycache__", "results", "*.onnx", "*.pt", "*.parquet"]


def runtime_env(task_dir: Path) -> dict[str, Any]:
    """The runtime environment that brings sweeper and the task folder to a cluster's workers."""
    import sweeper

    return {
        "working_dir": str(task_dir),
        "py_modules": [str(Path(sweeper.__file__).parent)],
        "excludes": RUNTIME_ENV_EXCLUDES,
    }


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when nothing listens at a ``host:port`` address.

    ``auto`` is left to Ray, which looks for a cluster started on this machine.

    Raises:
        SweeperInputError: when the address is malformed or nothing answers there.
    """
    if address == "auto":
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
    if address is not None:
        check_address(address)
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if debug else logging.WARNING,
        "log_to_driver": debug,
    }
    if address is None:
        kwargs |= {"num_cpus": num_cpus, "include_dashboard": False}
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
