"""Running trials as Ray tasks: placement on targets, concurrency, timeouts and attempts.

Each trial's Ray task asks for its target's resources (CPUs, GPUs, custom resources, node labels).
Ray retries a task whose worker or node died; an :class:`AttemptLedger` actor on the head node
counts the attempts so that the row can say how many it took. A trial still running after the
space's ``trial_timeout_s`` is cancelled and recorded as failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sweeper.space import Space
from sweeper.spec import TrialResult, TrialSpec, failed_result
from sweeper.worker import run_trial_with_ledger

# Ray retries a trial whose worker process or node died this many times before it is failed.
SYSTEM_RETRIES = 2


class AttemptLedger:
    """Counts the attempts of each trial (a Ray actor on the head node)."""

    def __init__(self) -> None:
        self.nodes: dict[str, list[str]] = {}

    def begin(self, key: str, node_id: str) -> int:
        self.nodes.setdefault(key, []).append(node_id)
        return len(self.nodes[key])


@dataclass
class _Flight:
    payload: Any
    spec: TrialSpec
    deadline: float | None


class Dispatcher:
    """Keeps up to ``max_concurrent`` trials in flight and hands back finished ones."""

    def __init__(self, space: Space, max_concurrent: int) -> None:
        import ray

        self.space = space
        self.max_concurrent = max_concurrent
        # On the head node, which lives as long as the cluster; restarted should that fail anyway.
        self.ledger = (
            ray.remote(AttemptLedger)
            .options(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_restarts=-1)
            .remote()
        )
        self._task = ray.remote(run_trial_with_ledger)
        self.inflight: dict[Any, _Flight] = {}

    def has_room(self) -> bool:
        return len(self.inflight) < self.max_concurrent

    def __len__(self) -> int:
        return len(self.inflight)

    def submit(self, spec: TrialSpec, payload: Any) -> None:
        """Start ``spec`` on its backend's target; ``payload`` comes back with its result."""
        target = self.space.target_of(spec.backend)
        ref = self._task.options(
            **target.ray_options(), max_retries=SYSTEM_RETRIES, retry_exceptions=False
        ).remote(spec, self.ledger)
        timeout = self.space.trial_timeout_s
        self.inflight[ref] = _Flight(payload, spec, time.monotonic() + timeout if timeout else None)

    def wait(self, max_wait_s: float | None = None) -> list[tuple[Any, TrialSpec, TrialResult]]:
        """Block until a trial finishes or times out, or ``max_wait_s`` passed; return those finished."""
        import ray

        deadlines = [f.deadline for f in self.inflight.values() if f.deadline is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if max_wait_s is not None:
            timeout = max_wait_s if timeout is None else min(timeout, max_wait_s)
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            flight = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                result = failed_result(
                    f"the trial's Ray task failed (after up to {SYSTEM_RETRIES} retries): {type(exc).__name__}: {exc}"
                )
            done.append((flight.payload, flight.spec, result))
        now = time.monotonic()
        for ref, flight in list(self.inflight.items()):
            if flight.deadline is not None and now >= flight.deadline:
                ray.cancel(ref, force=True)
                del self.inflight[ref]
                error = f"timed out: still running after trial_timeout_s={self.space.trial_timeout_s:g} s; cancelled"
                done.append((flight.payload, flight.spec, failed_result(error)))
        return done

    def cancel_all(self) -> list[tuple[Any, TrialSpec]]:
        """Cancel every trial in flight; return their payloads and specs."""
        import ray

        cancelled = []
        for ref, flight in self.inflight.items():
            ray.cancel(ref, force=True)
            cancelled.append((flight.payload, flight.spec))
        self.inflight.clear()
        return cancelled
