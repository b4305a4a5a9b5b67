"""What crosses the Ray boundary: plain frozen dataclasses, nothing Optuna-typed.

The driver sends a :class:`TrialSpec` to a Ray task; the task returns a :class:`TrialResult`. The
study's FP32 figures (:class:`FP32Baseline`, measured once in a Ray task) and what ``study.json``
holds (:class:`StudyInfo`) are typed here too.
"""

from __future__ import annotations

import dataclasses
import platform
import socket
import time
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# A trial's outcome as its row records it (Optuna's own TrialState is a different thing).
Outcome = Literal["complete", "failed", "pruned"]

# The libraries whose versions every row records (``<name>_version`` columns).
# A batch of a task's inputs (input name -> array, batch first), and one with its labels.
Batch = dict[str, np.ndarray]
LabeledBatch = tuple[Batch, np.ndarray]

VERSIONED_PACKAGES = ("torch", "onnxruntime", "optuna", "ray", "sweeper")


@dataclass(frozen=True, kw_only=True)
class TaskRef:
    """Where a worker finds the task: the task module's file and the attribute holding it."""

    name: str
    path: str
    attr: str = "TASK"


class MeasureSettings(BaseModel):
    """How latency and accuracy are measured (a space file's ``measure`` block, sent to each trial).

    Latency: ``warmup_runs`` untimed calls, then timed runs of each model (candidate and FP32
    baseline in alternating rounds of ``round_size``) until both ``min_runs`` runs and
    ``min_time_s`` seconds are reached, or ``max_runs`` runs, whichever comes first: ``max_runs``
    is a cap that ends timing even before ``min_time_s`` has passed (a fast model has stable
    percentiles long before then).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=1, ge=1)
    warmup_runs: int = Field(default=10, ge=0)
    min_runs: int = Field(default=50, ge=1)
    max_runs: int = Field(default=2000, ge=1)
    min_time_s: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    round_size: int = Field(default=10, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _min_runs_within_cap(self) -> MeasureSettings:
        if self.min_runs > self.max_runs:
            raise ValueError(
                f"min_runs ({self.min_runs}) must be at most max_runs ({self.max_runs}): timing stops at "
                "max_runs runs even if min_runs or min_time_s is not reached yet"
            )
        return self


class ConfirmSettings(BaseModel):
    """The finalists' confirmation, once the trial budget is spent (a space file's ``confirm`` block).

    The ``finalists`` best feasible configurations (plus the best FP32 ONNX Runtime trial, when
    the space has that backend) are re-timed together in one Ray task, round-robin with the FP32
    baseline, and re-scored on the held-out split. Each model gets at least ``min_runs`` timed
    calls (default three times a trial's ``measure.min_runs``) in at least ``min_rounds`` rounds,
    and ``min_time_s`` seconds of timed calls (default twice a trial's). ``finalists: 0`` turns
    the confirmation off. Finalists whose latencies differ by less than ``tie_margin`` (a share,
    default 2 %) beyond the rounds' noise are tied.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    finalists: int = Field(default=5, ge=0)
    min_runs: int | None = Field(default=None, ge=1)
    min_time_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    min_rounds: int = Field(default=10, ge=2)
    # Finalists whose confirmed latencies differ by less than this share (and whatever the
    # rounds' noise adds) tie: on a shared 2-core machine a configuration's p50 moved by a median
    # 1.3 % between two runs (benchmarks/benchmark_search.py), more than one run's rounds show.
    tie_margin: float = Field(default=0.02, ge=0, le=0.5)

    def problems(self, measure: MeasureSettings) -> list[tuple[str, str]]:
        """(key, message) for each setting that would time the finalists less than a trial."""
        found = []
        if self.min_runs is not None and self.min_runs <= measure.min_runs:
            found.append(("confirm.min_runs", f"{self.min_runs} must exceed measure.min_runs ({measure.min_runs}): "
                          "the finalists are timed with more runs than a trial"))
        if self.min_time_s is not None and self.min_time_s < measure.min_time_s:
            found.append(("confirm.min_time_s", f"{self.min_time_s:g} must be at least measure.min_time_s "
                          f"({measure.min_time_s:g}): the finalists are timed for longer than a trial"))
        return found

    def timing(self, measure: MeasureSettings) -> MeasureSettings:
        """How the finalists are timed: the trials' settings with more runs and more time."""
        min_runs = self.min_runs or 3 * measure.min_runs
        return measure.model_copy(update={
            "min_runs": min_runs,
            "max_runs": max(min_runs, 3 * measure.max_runs),
            "min_time_s": self.min_time_s if self.min_time_s is not None else 2 * measure.min_time_s,
        })


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
    # For a top-1 task the subset decides through a bound: prune only when the whole split's drop
    # (points) exceeds max_drop_points with prune_confidence. The subset is drawn with subset_seed.
    max_drop_points: float | None = None
    prune_confidence: float = 0.95
    subset_seed: int = 0
    # The study's FP32 fingerprint (weights and evaluation data); a node whose own differs fails.
    fp32_fingerprint: str | None = None


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


@cache
def environment() -> Environment:
    """Describe this process's node, hardware and library versions."""
    versions = {}
    for dist in VERSIONED_PACKAGES:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = ""
    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker the node id stays empty
        node_id = ""
    return Environment(
        node_id=node_id,
        hostname=socket.gethostname(),
        cpu_model=cpu_model(),
        device="cpu",
        versions=versions,
    )

def cpu_model() -> str:
    """The CPU's model name as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """What one trial measured. Failed trials carry ``error`` and whatever was measured before."""

    state: Outcome
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
    # What the FP32 baseline ran on ("pytorch" eager, or "keras" for a Keras task), and where.
    baseline_runtime: str | None = None
    baseline_device: str | None = None
    # This node's FP32 model: its fingerprint and its metric, measured where the trial ran.
    fp32_fingerprint: str | None = None
    node_accuracy_fp32: float | None = None
    # The timed phase held the machine's timing lock: how long it waited, and how many other timed
    # phases overlapped it (0 by construction, counted from the machine's ledger).
    timing_wait_s: float | None = None
    concurrent_timings: int | None = None
    # The paired counts behind the drop (top-1 tasks): samples scored, and those FP32 got right and
    # the candidate wrong (worse) or the other way round (better).
    eval_samples: int | None = None
    discordant_worse: int | None = None
    discordant_better: int | None = None
    # An artifact travelling home with the result: its name, and its files (relative path -> bytes).
    artifact_name: str | None = None
    artifact_files: dict[str, bytes] | None = None
    attempt: int | None = 1
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class FinalistSpec:
    """One finalist to confirm: its trial, configuration and saved artifact."""

    trial_number: int
    backend: str
    params: dict[str, Any]
    artifact_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConfirmSpec:
    """The finalists of a study, re-timed together in one Ray task and re-scored on the held-out split."""

    study: str
    task: TaskRef
    finalists: tuple[FinalistSpec, ...]
    measure: MeasureSettings  # the confirmation's timing: more runs than a trial's
    min_rounds: int
    num_threads: int
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class FinalistResult:
    """What the confirmation measured of one finalist (``error`` when it could not be rebuilt)."""

    trial_number: int
    latency: LatencyStats | None = None
    round_ms: tuple[float, ...] = ()  # the median of each round, milliseconds
    accuracy: float | None = None
    discordant_worse: int | None = None
    discordant_better: int | None = None
    source: str | None = None  # "artifact" (the trial's saved model) or "rebuilt"
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConfirmResult:
    """The confirmation of a study's finalists: each finalist's figures, the FP32 model's on the
    same split and in the same rounds, and where and how exclusively it was timed."""

    finalists: tuple[FinalistResult, ...]
    split: str  # "held_out" (of the evaluation split), "task" (the task's own), "evaluation" (none held out)
    samples: int
    accuracy_fp32: float
    baseline_latency: LatencyStats
    baseline_round_ms: tuple[float, ...]
    environment: Environment | None = None
    timing_wait_s: float | None = None
    concurrent_timings: int | None = None
    started_at: float = 0.0
    finished_at: float = 0.0


# Error text of trials a stopped driver left running: asked again on resume, not counted in the budget.
INTERRUPTED = "interrupted:"
# Error text of configurations their backend rejected before any build: not counted in the budget.
REJECTED = "rejected:"


def failed_result(error: str) -> TrialResult:
    """A failed result for a trial that never produced one of its own."""
    now = time.time()
    return TrialResult(state="failed", started_at=now, finished_at=now, error=error)


@dataclass(frozen=True, kw_only=True)
class FP32Baseline:
    """What a study measures once of the FP32 model (``study.json``'s ``baseline``): its metric
    (name, direction), the state dict's size, the task's calibration and evaluation sizes, and the
    node it was measured on. Only ``metric`` is required, so hand-written study files load too."""

    metric: float
    metric_name: str = ""
    higher_is_better: bool = True
    runtime: str = "pytorch"
    size_bytes: int | None = None
    calibration_size: int | None = None
    eval_samples: int | None = None
    environment: Environment | None = None
    # Hash of the FP32 weights and evaluation data ("<weights>-<data>"); every trial checks its own.
    fingerprint: str | None = None
    # The FP32 model's latency (ms per call: p50, p90, p99, mean) timed once on reference_device:
    # a latency objective is told to Optuna as candidate / same-trial baseline x this.
    reference_latency_ms: dict[str, float] | None = None
    reference_device: str = "cpu"
    # The finalists' confirmation split: "held_out" (a part of the evaluation split the trials never
    # see; eval_samples counts the trial part), "task" (the task's own), "evaluation" (too small to
    # hold a part out); its size and the FP32 metric on it. None: a study begun before confirmation.
    confirm_split: str | None = None
    confirm_samples: int | None = None
    confirm_metric: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["runtime"] == "pytorch":  # the default; study files written before it was recorded lack it
            del data["runtime"]
        # Recorded since schema 3; a study that began without them keeps its file's format.
        for key in ("fingerprint", "reference_latency_ms", "confirm_split", "confirm_samples", "confirm_metric"):
            if data[key] is None:
                del data[key]
        if "reference_latency_ms" not in data:
            del data["reference_device"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FP32Baseline:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("environment"), dict):
            values["environment"] = Environment(**values["environment"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class StudyInfo:
    """What ``study.json`` holds: the study, its task, the space file (path and text) and the FP32
    baseline. :meth:`to_json` writes the file's format, which :meth:`from_json` reads back."""

    study: str
    task: str | None = None
    task_path: str | None = None
    space_path: str | None = None
    space: str = ""
    baseline: FP32Baseline | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.baseline is not None:
            data["baseline"] = self.baseline.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, default_study: str = "") -> StudyInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("study", default_study)
        if isinstance(values.get("baseline"), dict):
            values["baseline"] = FP32Baseline.from_json(values["baseline"]) if "metric" in values["baseline"] else None
        return cls(**values)
