"""Connecting to Ray: an embedded local instance by default, or an existing cluster.

Token authentication stays on. When ``RAY_AUTH_MODE`` is unset it is set to ``token`` here, before
Ray is imported (Ray reads it once, at import), so a local instance, its workers and every client
agree; the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
(which Ray creates for a new local instance). Where Ray was imported already, its own default
applies, which is token authentication for a new local instance too.
"""

from __future__ import annotations

import logging
import os
import sys

from sweeper.errors import SweeperInputError


def connect(address: str | None = None, *, num_cpus: int | None = None, debug: bool = False) -> None:
    """Start an embedded Ray instance, or join the cluster at ``address``, unless already connected.

    Raises:
        SweeperInputError: when no cluster answers at ``address``.
    """
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {
        "logging_level": logging.INFO if debug else logging.WARNING,
        "log_to_driver": debug,
        "configure_logging": True,
    }
    if address is None:
        kwargs |= {"num_cpus": num_cpus, "include_dashboard": False}
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        if address is None:
            raise
        raise SweeperInputError(
            f"no Ray cluster answers at --address {address!r} ({type(exc).__name__}: {exc}). "
            "Give the address of a running cluster (e.g. 'auto' on a cluster node, or "
            "'ray://HOST:10001'), or leave --address out to start an embedded local Ray."
        ) from None


def cluster_cpus() -> int:
    """CPUs the connected cluster offers in total."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
