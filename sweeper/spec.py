"""What crosses the Ray boundary: plain frozen dataclasses, nothing Optuna-typed.

The driver sends a :class:`TrialSpec` to a Ray task; the task returns a :class:`TrialResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TrialState = Literal["complete", "failed", "pruned"]


@dataclass(frozen=True, kw_only=True)
class TaskRef:
    """Where a worker finds the task: the task module's file and the attribute holding it."""

    name: str
    path: str
    attr: str = "TASK"


@dataclass(frozen=True, kw_only=True)
class MeasureSettings:
    """How latency and accuracy are measured.

    Latency: ``warmup_runs`` untimed calls each, then timed calls of candidate and FP32 baseline
    in alternating rounds until both have at least ``min_runs`` and ``min_time_s`` has passed, or
    ``max_runs`` is reached.
    """

    batch_size: int = 1
    warmup_runs: int = 10
    min_runs: int = 50
    max_runs: int = 2000
    min_time_s: float = 1.0
    round_size: int = 10
    eval_batch_size: int = 256


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """One trial to run: a backend, its config values, and how to measure."""

    study: str
    trial_number: int
    task: TaskRef
    backend: str
    params: dict[str, Any]
    measure: MeasureSettings
    num_threads: int
    artifact_dir: str
    target: str = "default"
    device: str = "cpu"
    # Cheap-first evaluation: score this share of the evaluation split first, and stop (pruned)
    # when its drop, in the metric's units, exceeds prune_above_drop.
    early_stop_fraction: float | None = None
    prune_above_drop: float | None = None


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Per-call latency of one model in milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    runs: int


@dataclass(frozen=True, kw_only=True)
class Environment:
    """Where a trial ran and with which library versions."""

    node_id: str
    hostname: str
    cpu_model: str
    device: str
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """What one trial measured. Failed trials carry ``error`` and whatever was measured before."""

    state: TrialState
    started_at: float
    finished_at: float
    environment: Environment | None = None
    accuracy_fp32: float | None = None
    accuracy: float | None = None
    subset_accuracy: float | None = None
    subset_accuracy_fp32: float | None = None
    subset_samples: int | None = None
    agreement: float | None = None
    output_max_abs_error: float | None = None
    latency: LatencyStats | None = None
    baseline_latency: LatencyStats | None = None
    size_bytes: int | None = None
    baseline_size_bytes: int | None = None
    num_threads: int | None = None
    batch_size: int | None = None
    artifact_path: str | None = None
    # An artifact travelling home with the result: its name, and its files (relative path -> bytes).
    artifact_name: str | None = None
    artifact_files: dict[str, bytes] | None = None
    attempt: int | None = 1
    error: str | None = None
