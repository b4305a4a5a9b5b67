"""Turning a trial's spec and result into its result row (see :mod:`sweeper.results`)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from sweeper.backends import get_backend
from sweeper.errors import ConfigError
from sweeper.measure import DropCounts, accuracy_drop, drop_interval
from sweeper.results import COLUMN_NAMES
from sweeper.space import Space
from sweeper.spec import (
    INTERRUPTED,
    REJECTED,
    VERSIONED_PACKAGES,
    Environment,
    FP32Baseline,
    LatencyStats,
    TrialResult,
    TrialSpec,
)


def counts_toward_budget(row: dict[str, Any]) -> bool:
    """Whether a row uses up one of the study's trials (interrupted and rejected ones do not)."""
    return not (row["state"] == "failed" and (row.get("error") or "").startswith((INTERRUPTED, REJECTED)))


def _exclusion_field(backend: str) -> str | None:
    try:
        return get_backend(backend).exclusion_field
    except (ConfigError, ImportError):
        return None


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def make_row(space: Space, spec: TrialSpec, result: TrialResult, baseline: FP32Baseline) -> dict[str, Any]:
    """Build the row of one trial: what was measured, what was asked, and whether it is feasible.

    The measured part is :func:`flatten` of the result, so a new :class:`TrialResult` field becomes
    a column by adding it to :data:`sweeper.results.COLUMNS` under its flattened name.
    """
    row = {k: v for k, v in flatten(result).items() if k in COLUMN_NAMES}
    row |= _asked(spec)
    row |= _judged(space, result, baseline)
    return row


def flatten(result: TrialResult) -> dict[str, Any]:
    """The result's fields as row columns: latency figures as ``latency_ms_<stat>`` (and
    ``latency_runs``), the FP32 baseline's as ``baseline_latency_ms_<stat>``, the environment's
    fields and one ``<package>_version`` per versioned package."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, LatencyStats):
            for stat in dataclasses.fields(value):
                column = "latency_runs" if stat.name == "runs" else f"latency_ms_{stat.name}"
                flat[f"baseline_{column}" if f.name == "baseline_latency" else column] = getattr(value, stat.name)
        elif isinstance(value, Environment):
            flat |= {k: v for k, v in vars(value).items() if k != "versions"}
            flat |= {f"{dist}_version": value.versions.get(dist, "") for dist in VERSIONED_PACKAGES}
        else:
            flat[f.name] = value
    return flat


def _asked(spec: TrialSpec) -> dict[str, Any]:
    row: dict[str, Any] = {
        "study": spec.study,
        "trial_number": spec.trial_number,
        "task": spec.task.name,
        "backend": spec.backend,
        "params_json": json.dumps(spec.params, sort_keys=True),
        "target": spec.target,
    }
    field = _exclusion_field(spec.backend)
    if field is not None:
        excluded = list(spec.params.get(field) or ())
        row["excluded_layers"] = excluded
        row["n_excluded"] = len(excluded)
    return row


def _judged(space: Space, result: TrialResult, baseline: FP32Baseline) -> dict[str, Any]:
    """The figures relative to the FP32 baseline and the constraint."""
    fp32 = baseline.metric
    row: dict[str, Any] = {
        "started_at": _ts(result.started_at),
        "finished_at": _ts(result.finished_at),
        "duration_s": result.finished_at - result.started_at,
        "metric_name": baseline.metric_name,
        "accuracy_fp32": fp32,
        "drop_mode": space.constraint.mode,
        "max_drop": space.constraint.max_drop,
        "baseline_size_bytes": result.baseline_size_bytes or baseline.size_bytes,
        "feasible": False,
    }
    if result.accuracy is not None:
        drop = accuracy_drop(
            fp32, result.accuracy, higher_is_better=baseline.higher_is_better, mode=space.constraint.mode
        )
        row["accuracy_drop"] = drop
        row["feasible"] = result.state == "complete" and drop <= space.constraint.max_drop
        row |= _drop_interval(space, result, baseline)
    if result.baseline_latency is not None and result.latency is not None and result.latency.p50 > 0:
        row["speedup"] = result.baseline_latency.p50 / result.latency.p50
    if result.state == "complete":
        row["objective_value"] = objective_value(space.objective, result, baseline)
    return row


def objective_value(objective: str, result: TrialResult, baseline: FP32Baseline) -> float | None:
    """What Optuna is told. A latency objective is the candidate's latency relative to the FP32
    model timed interleaved with it in the same trial, times the study's reference FP32 latency
    (timed once on the same device), so that machine drift between trials cancels; without a
    reference (older studies, another device) it is the latency as measured."""
    if not objective.startswith("latency_ms_") or result.latency is None:
        return float(result.size_bytes) if objective == "size_bytes" and result.size_bytes is not None else None
    stat = objective.removeprefix("latency_ms_")
    measured = float(getattr(result.latency, stat))
    reference = (baseline.reference_latency_ms or {}).get(stat)
    base = getattr(result.baseline_latency, stat) if result.baseline_latency is not None else None
    same_device = (result.baseline_device or "cpu") == baseline.reference_device
    if reference is None or not base or not same_device:
        return measured
    return measured / float(base) * reference


def _drop_interval(space: Space, result: TrialResult, baseline: FP32Baseline) -> dict[str, Any]:
    """The drop's 95 % interval from the discordant counts, in the constraint's mode."""
    if result.discordant_worse is None or result.discordant_better is None or not result.eval_samples:
        return {}
    counts = DropCounts(n=result.eval_samples, worse=result.discordant_worse, better=result.discordant_better)
    low, high = drop_interval(counts)
    if space.constraint.mode == "relative":  # points to percent of the FP32 metric
        low, high = (100.0 * v / abs(baseline.metric) if baseline.metric else float("nan") for v in (low, high))
    return {"accuracy_drop_low": low, "accuracy_drop_high": high}
