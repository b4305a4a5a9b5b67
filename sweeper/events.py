"""What a running sweep reports to its caller (the CLI's progress bars, a test, a notebook).

``run_sweep(space, options, on_event)`` calls ``on_event(event)`` with one of the events below;
each names its ``kind`` too, for a handler that only logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class SweepStarted:
    """The study is open: ``done`` trials are already recorded, ``trials`` more will run."""

    kind: ClassVar[str] = "start"
    study: str
    study_dir: str
    trials: int
    done: int
    max_concurrent: int
    accuracy_fp32: float


@dataclass(frozen=True, kw_only=True)
class SensitivityProgress:
    """Layer sensitivity of ``backend``: ``done`` of ``total`` layers scored."""

    kind: ClassVar[str] = "sensitivity"
    backend: str
    done: int
    total: int


@dataclass(frozen=True, kw_only=True)
class TrialStarted:
    """A trial was sent to a Ray task."""

    kind: ClassVar[str] = "started"
    trial_number: int
    backend: str
    params: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TrialFinished:
    """A trial's row was written (complete, failed or pruned)."""

    kind: ClassVar[str] = "finished"
    row: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TrialRecovered:
    """A trial left unfinished (by a stopped driver, or cancelled on a stop) was recorded as
    interrupted; it is asked again."""

    kind: ClassVar[str] = "recovered"
    row: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class SweepPhase:
    """What the sweep is doing before its trials start (starting Ray, measuring the FP32 baseline)."""

    kind: ClassVar[str] = "phase"
    text: str


@dataclass(frozen=True, kw_only=True)
class ConfirmationStarted:
    """The budget is spent: the finalists (``trials``) are re-timed together, at least ``min_runs``
    runs each, and re-scored on the confirmation ``split`` of ``samples`` samples."""

    kind: ClassVar[str] = "confirming"
    trials: tuple[int, ...]
    split: str
    samples: int | None
    min_runs: int


@dataclass(frozen=True, kw_only=True)
class ConfirmationFinished:
    """The finalists' confirmation rows, ranked (``confirmed_rank`` 1 is the winner)."""

    kind: ClassVar[str] = "confirmed"
    rows: tuple[dict[str, Any], ...]


Event = (
    SweepPhase | SweepStarted | SensitivityProgress | TrialStarted | TrialFinished | TrialRecovered
    | ConfirmationStarted | ConfirmationFinished
)
EventHandler = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The handler of a sweep nobody watches."""
