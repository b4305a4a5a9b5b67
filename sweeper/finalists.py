"""The finalists' confirmation on the driver's side: pick them, time them together, rank, store.

When a sweep's budget is spent, the best ``confirm.finalists`` feasible configurations by the
study's objective (and the best FP32 ONNX Runtime trial, when the space has that backend) are
sent to one Ray task per hardware target (:func:`sweeper.confirmation.confirm_finalists`), which
re-times them round-robin with the FP32 baseline and re-scores them on the held-out split. Their
confirmed figures are ranked with ties (:func:`sweeper.confirmed.rank`) and written as the study's
next confirmation set; trial rows are never touched.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sweeper import confirmed
from sweeper.confirmation import confirm_finalists
from sweeper.events import ConfirmationFinished, ConfirmationStarted, EventHandler, SweepPhase
from sweeper.location import StudyPath
from sweeper.measure import DropCounts, accuracy_drop, drop_interval
from sweeper.space import Space
from sweeper.spec import ConfirmResult, ConfirmSpec, FinalistResult, FinalistSpec, FP32Baseline, TaskRef

# The backend whose best trial is always a finalist when the space has it: the FP32 reference.
FP32_REFERENCE = "onnxruntime_fp32"


def pick(rows: list[dict[str, Any]], space: Space) -> list[dict[str, Any]]:
    """The finalists: the ``confirm.finalists`` best complete, feasible rows by the objective
    (every objective of a space is minimised; the earlier trial first on a tie), then the fastest
    complete FP32 ONNX Runtime row when the space has that backend and it is not among them."""
    objective = space.objective
    ok = sorted(
        (r for r in rows if r["state"] == "complete" and r.get("feasible") and r.get(objective) is not None),
        key=lambda r: (r[objective], r["trial_number"]),
    )
    chosen = ok[: space.confirm.finalists]
    if FP32_REFERENCE in space.backends and chosen:
        reference = sorted(
            (r for r in rows if r["backend"] == FP32_REFERENCE and r["state"] == "complete"
             and r.get("latency_ms_p50") is not None),
            key=lambda r: (r["latency_ms_p50"], r["trial_number"]),
        )
        if reference and all(r["trial_number"] != reference[0]["trial_number"] for r in chosen):
            chosen.append(reference[0])
    return chosen


def settings_json(space: Space) -> str:
    """The confirmation's settings as stored with each set (a set with other settings is stale)."""
    timing = space.confirm.timing(space.measure)
    return json.dumps({"confirm": space.confirm.model_dump(), "timing": timing.model_dump()}, sort_keys=True)


def up_to_date(study_dir: StudyPath, chosen: list[dict[str, Any]], space: Space) -> bool:
    """Whether the newest confirmation set already covers these finalists with these settings."""
    latest = confirmed.read_latest(study_dir)
    if latest is None or latest.num_rows == 0:
        return False
    numbers = sorted(latest.column("trial_number").to_pylist())
    stored = set(latest.column("confirmed_settings").to_pylist())
    return numbers == sorted(r["trial_number"] for r in chosen) and stored == {settings_json(space)}


def confirm(
    space: Space, study: str, study_dir: StudyPath, task_ref: TaskRef, baseline: FP32Baseline,
    rows: list[dict[str, Any]], emit: EventHandler,
) -> list[dict[str, Any]] | None:
    """Confirm the study's finalists and write the set; return its rows, ranked (``None`` when
    confirmation is off, nothing is feasible, or the newest set already covers the finalists)."""
    import ray

    chosen = pick(rows, space) if space.confirm.finalists else []
    if not chosen:
        if space.confirm.finalists:
            emit(SweepPhase(text="no feasible trial to confirm"))
        return None
    if up_to_date(study_dir, chosen, space):
        emit(SweepPhase(text="the finalists are already confirmed (newest confirmation set kept)"))
        return None
    timing = space.confirm.timing(space.measure)
    emit(ConfirmationStarted(
        trials=tuple(r["trial_number"] for r in chosen), split=baseline.confirm_split or "held_out",
        samples=baseline.confirm_samples, min_runs=timing.min_runs,
    ))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in chosen:
        groups.setdefault(space.backend_targets.get(row["backend"], next(iter(space.targets))), []).append(row)
    task = ray.remote(confirm_finalists)
    refs = {}
    for target_name, members in groups.items():
        target = space.targets[target_name]
        spec = ConfirmSpec(
            study=study, task=task_ref, measure=timing, min_rounds=space.confirm.min_rounds,
            num_threads=target.num_cpus, device="cuda" if target.kind == "gpu" else "cpu",
            finalists=tuple(
                FinalistSpec(trial_number=r["trial_number"], backend=r["backend"],
                             params=json.loads(r["params_json"] or "{}"), artifact_path=r.get("artifact_path"))
                for r in members
            ),
        )
        refs[target_name] = task.options(**target.ray_options(), max_retries=1).remote(spec)
    made: list[dict[str, Any]] = []
    for target_name, ref in refs.items():
        error = None
        try:
            result: ConfirmResult | None = ray.get(ref)
        except ray.exceptions.RayError as exc:
            result, error = None, f"the confirmation's Ray task failed: {type(exc).__name__}: {exc}"
        found = {f.trial_number: f for f in result.finalists} if result is not None else {}
        for row in groups[target_name]:
            made.append(_row(space, study, row, found.get(row["trial_number"]), result, baseline, error))
    ranked = confirmed.rank(made, margin=space.confirm.tie_margin)
    confirmed.write_set(study_dir, [{k: v for k, v in r.items() if k in confirmed.CONFIRMED_NAMES} for r in ranked])
    emit(ConfirmationFinished(rows=tuple(ranked)))
    return ranked


def _row(
    space: Space, study: str, trial: dict[str, Any], found: FinalistResult | None, result: ConfirmResult | None,
    baseline: FP32Baseline, error: str | None,
) -> dict[str, Any]:
    """One finalist's confirmation row, with the trial's fields :func:`sweeper.confirmed.rank` orders ties by."""
    row: dict[str, Any] = {
        "study": study, "trial_number": trial["trial_number"], "backend": trial["backend"],
        "n_excluded": trial.get("n_excluded"), "size_bytes": trial.get("size_bytes"),
        "confirmed_feasible": False, "confirmed_settings": settings_json(space),
        "confirmed_at": datetime.now(tz=UTC), "confirmed_error": error,
    }
    if result is None or found is None:
        return row
    row |= {
        "confirmed_at": datetime.fromtimestamp(result.finished_at, tz=UTC), "confirmed_split": result.split,
        "confirmed_samples": result.samples, "confirmed_accuracy_fp32": result.accuracy_fp32,
        "confirmed_baseline_latency_ms_p50": result.baseline_latency.p50, "confirmed_source": found.source,
        "confirmed_concurrent_timings": result.concurrent_timings, "confirmed_error": found.error,
    }
    if found.latency is not None:
        row |= {
            "confirmed_latency_ms_p50": found.latency.p50, "confirmed_latency_ms_p90": found.latency.p90,
            "confirmed_latency_runs": found.latency.runs, "confirmed_rounds": len(found.round_ms),
            "confirmed_round_ms": list(found.round_ms),
            "confirmed_speedup": result.baseline_latency.p50 / found.latency.p50 if found.latency.p50 > 0 else None,
        }
    if found.accuracy is not None:
        mode = space.constraint.mode
        drop = accuracy_drop(
            result.accuracy_fp32, found.accuracy, higher_is_better=baseline.higher_is_better, mode=mode
        )
        row |= {"confirmed_accuracy": found.accuracy, "confirmed_accuracy_drop": drop,
                "confirmed_feasible": found.latency is not None and drop <= space.constraint.max_drop}
        if found.discordant_worse is not None and found.discordant_better is not None and result.samples:
            low, high = drop_interval(DropCounts(n=result.samples, worse=found.discordant_worse,
                                                 better=found.discordant_better))
            if mode == "relative":  # points to percent of the FP32 metric
                low, high = (100.0 * v / abs(result.accuracy_fp32) if result.accuracy_fp32 else float("nan")
                             for v in (low, high))
            row |= {"confirmed_accuracy_drop_low": low, "confirmed_accuracy_drop_high": high}
    return row
