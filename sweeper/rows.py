"""Turning a trial's spec and result into its result row (see :mod:`sweeper.results`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sweeper.backends import get_backend
from sweeper.errors import ConfigError
from sweeper.measure import accuracy_drop
from sweeper.spec import VERSIONED_PACKAGES, TrialResult, TrialSpec

if TYPE_CHECKING:
    from sweeper.space import Space

# Error text of trials a stopped driver left running. They are asked again on resume and do not
# count toward the study's trial budget.
INTERRUPTED = "interrupted:"


def counts_toward_budget(row: dict[str, Any]) -> bool:
    """Whether a row uses up one of the study's trials (interrupted trials do not)."""
    return not (row["state"] == "failed" and (row.get("error") or "").startswith(INTERRUPTED))


def _exclusion_field(backend: str) -> str | None:
    try:
        return get_backend(backend).exclusion_field
    except (ConfigError, ImportError):
        return None


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def make_row(space: Space, spec: TrialSpec, result: TrialResult, baseline: dict[str, Any]) -> dict[str, Any]:
    """Build the row of one trial: what was asked, what was measured, and whether it is feasible."""
    fp32 = baseline["metric"]
    row: dict[str, Any] = {
        "study": spec.study,
        "trial_number": spec.trial_number,
        "state": result.state,
        "task": spec.task.name,
        "backend": spec.backend,
        "params_json": json.dumps(spec.params, sort_keys=True),
        "attempt": result.attempt,
        "target": spec.target,
        "started_at": _ts(result.started_at),
        "finished_at": _ts(result.finished_at),
        "duration_s": result.finished_at - result.started_at,
        "metric_name": baseline["metric_name"],
        "accuracy_fp32": fp32,
        "accuracy": result.accuracy,
        "drop_mode": space.constraint.mode,
        "max_drop": space.constraint.max_drop,
        "subset_accuracy": result.subset_accuracy,
        "subset_accuracy_fp32": result.subset_accuracy_fp32,
        "subset_samples": result.subset_samples,
        "agreement": result.agreement,
        "output_max_abs_error": result.output_max_abs_error,
        "size_bytes": result.size_bytes,
        "baseline_size_bytes": result.baseline_size_bytes or baseline["size_bytes"],
        "num_threads": result.num_threads,
        "batch_size": result.batch_size,
        "artifact_path": result.artifact_path,
        "error": result.error,
    }
    field = _exclusion_field(spec.backend)
    if field is not None:
        excluded = list(spec.params.get(field) or ())
        row["excluded_layers"] = excluded
        row["n_excluded"] = len(excluded)
    if result.accuracy is not None:
        drop = accuracy_drop(
            fp32, result.accuracy, higher_is_better=baseline["higher_is_better"], mode=space.constraint.mode
        )
        row["accuracy_drop"] = drop
        row["feasible"] = result.state == "complete" and drop <= space.constraint.max_drop
    else:
        row["feasible"] = False
    if result.latency is not None:
        lat = result.latency
        row |= {
            "latency_ms_p50": lat.p50,
            "latency_ms_p90": lat.p90,
            "latency_ms_p99": lat.p99,
            "latency_ms_mean": lat.mean,
            "latency_ms_std": lat.std,
            "latency_runs": lat.runs,
        }
    if result.baseline_latency is not None:
        row["baseline_latency_ms_p50"] = result.baseline_latency.p50
        row["baseline_latency_ms_p90"] = result.baseline_latency.p90
        if result.latency is not None and result.latency.p50 > 0:
            row["speedup"] = result.baseline_latency.p50 / result.latency.p50
    env = result.environment
    if env is not None:
        row |= {
            "device": env.device,
            "node_id": env.node_id,
            "hostname": env.hostname,
            "cpu_model": env.cpu_model,
            **{f"{dist}_version": env.versions.get(dist, "") for dist in VERSIONED_PACKAGES},
        }
    return row
