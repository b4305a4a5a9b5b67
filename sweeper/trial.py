"""One trial, as it runs inside a Ray task: build a candidate, then measure it honestly.

Nothing here talks to Optuna. What trials share on a worker (the FP32 baseline, the build context,
evaluation) is in :mod:`sweeper.worker`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.backends import get_backend
from sweeper.location import is_uri, location
from sweeper.measure import accuracy_drop, agreement_pct, max_abs_error, time_interleaved
from sweeper.spec import Outcome, TrialResult, TrialSpec
from sweeper.timing_lock import exclusive_timing
from sweeper.uncertainty import DropCounts
from sweeper.worker import Baseline, build_context, environment, fp32_candidate, prepare_baseline, set_threads


def run_trial_with_ledger(spec: TrialSpec, ledger: Any) -> TrialResult:
    """The Ray task body: note the attempt, run the trial, and return the result with it."""
    import ray

    key = f"{spec.study}/{spec.trial_number}"
    try:
        attempt = ray.get(ledger.begin.remote(key, ray.get_runtime_context().get_node_id()), timeout=60)
    except (ray.exceptions.RayError, TimeoutError):  # the count is lost, the trial is not
        attempt = None
    return dataclasses.replace(run_trial(spec), attempt=attempt)


def run_trial(spec: TrialSpec) -> TrialResult:
    """Build and measure one candidate. Never raises: a failure is a ``failed`` result."""
    started = time.time()
    measured: dict[str, Any] = {"num_threads": spec.num_threads, "batch_size": spec.measure.batch_size}
    try:
        set_threads(spec.num_threads)
        measured["environment"] = dataclasses.replace(environment(), device=spec.device)
        state = _build_and_measure(spec, measured)
    except Exception as exc:  # the trial failed; the sweep goes on and the row records why
        tb = traceback.format_exc(limit=-6)
        return TrialResult(
            state="failed",
            started_at=started,
            finished_at=time.time(),
            error=f"{type(exc).__name__}: {exc}\n{tb}",
            **measured,
        )
    return TrialResult(state=state, started_at=started, finished_at=time.time(), **measured)


def _build_and_measure(spec: TrialSpec, measured: dict[str, Any]) -> Outcome:
    """Build, evaluate (cheap-first when asked) and time the candidate; return the trial's state."""
    baseline = prepare_baseline(spec.task, spec.measure.eval_batch_size)
    task = baseline.task
    measured["baseline_size_bytes"] = baseline.size_bytes
    backend = get_backend(spec.backend)
    config = backend.config(spec.params)
    with tempfile.TemporaryDirectory(prefix=f"sweeper-trial-{spec.trial_number}-") as workdir:
        ctx = build_context(baseline.model, task, Path(workdir), spec.num_threads, spec.device)
        candidate = backend.build(ctx, config)
        measured["environment"] = dataclasses.replace(measured["environment"], device=candidate.device)
        artifact = candidate.save(Path(workdir) / "artifact")
        measured["size_bytes"] = candidate.size_bytes()
        measured |= ship_artifact(artifact, spec.artifact_dir)

        outputs = _evaluate_cheap_first(candidate, baseline, spec, measured)
        if outputs is None:
            return "pruned"
        measured["accuracy"] = task.metric(outputs, baseline.labels)
        measured["agreement"] = agreement_pct(baseline.outputs, outputs)
        measured["output_max_abs_error"] = max_abs_error(baseline.outputs, outputs)
        measured |= _drop_counts(task, baseline, outputs)

        example = task.example_inputs(spec.measure.batch_size)
        fp32 = fp32_candidate(baseline.model, task, spec.num_threads)
        measured["baseline_runtime"] = baseline.runtime
        # Builds and evaluations of other trials on this machine may overlap; timed phases may not.
        with exclusive_timing() as phase:
            base_stats, cand_stats = time_interleaved(
                lambda: fp32.predict(example),
                lambda: candidate.predict(example),
                spec.measure,
            )
        measured |= {"timing_wait_s": phase.wait_s, "concurrent_timings": phase.concurrent}
        measured["latency"] = cand_stats
        measured["baseline_latency"] = base_stats
    return "complete"


def _drop_counts(task: Any, baseline: Baseline, outputs: np.ndarray) -> dict[str, Any]:
    """The evaluation size and, for a top-1 task, the discordant counts the drop rests on."""
    counts: dict[str, Any] = {"eval_samples": int(len(baseline.labels))}
    fp32_correct = task.correct(baseline.outputs, baseline.labels)
    if fp32_correct is not None:
        paired = DropCounts.from_predictions(fp32_correct, task.correct(outputs, baseline.labels))
        counts |= {"discordant_worse": paired.worse, "discordant_better": paired.better}
    return counts


# Artifacts up to this size travel home with the result, through Ray's object store.
ARTIFACT_RETURN_LIMIT_BYTES = 2 * 1024**3


def ship_artifact(artifact: Path, destination: str) -> dict[str, Any]:
    """Send a saved artifact (file or folder) where the study keeps it; return the result's fields.

    A remote study folder (a URI) gets it uploaded from here. Otherwise its files go back with
    the result and the driver writes them into its study folder, so the nodes need no folder
    shared with the driver; one larger than :data:`ARTIFACT_RETURN_LIMIT_BYTES` is written here,
    at ``destination``, which must then be shared storage.
    """
    files = [artifact] if artifact.is_file() else sorted(p for p in artifact.rglob("*") if p.is_file())
    relative = {p.relative_to(artifact.parent).as_posix(): p for p in files}
    if is_uri(destination):
        target = location(destination)
        for name, path in relative.items():
            (target / name).write_bytes(path.read_bytes())
        return {"artifact_path": str(target / artifact.name)}
    if sum(p.stat().st_size for p in files) <= ARTIFACT_RETURN_LIMIT_BYTES:
        return {"artifact_name": artifact.name, "artifact_files": {n: p.read_bytes() for n, p in relative.items()}}
    target = Path(destination)
    for name, path in relative.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / name)
    return {"artifact_path": str(target / artifact.name)}


def _evaluate_cheap_first(
    candidate: Any, baseline: Baseline, spec: TrialSpec, measured: dict[str, Any]
) -> np.ndarray | None:
    """Evaluate on the whole split; with early stopping, score the first share before the rest.

    Returns ``None`` (and records the subset's figures) when the subset's drop already exceeds
    ``spec.prune_above_drop``.
    """
    task, labels = baseline.task, baseline.labels
    fraction = spec.early_stop_fraction
    n_subset = max(1, int(len(labels) * fraction)) if fraction else None
    outputs: list[np.ndarray] = []
    seen = 0
    for batch, _ in task.eval_batches(spec.measure.eval_batch_size):
        outputs.append(np.asarray(candidate.predict(batch), dtype=np.float32))
        seen += len(outputs[-1])
        if n_subset is not None and seen >= n_subset:
            subset = np.concatenate(outputs)[:n_subset]
            cand = task.metric(subset, labels[:n_subset])
            fp32 = task.metric(baseline.outputs[:n_subset], labels[:n_subset])
            measured |= {"subset_accuracy": cand, "subset_accuracy_fp32": fp32, "subset_samples": n_subset}
            limit = spec.prune_above_drop if spec.prune_above_drop is not None else float("inf")
            if accuracy_drop(fp32, cand, higher_is_better=task.higher_is_better) > limit:
                return None
            n_subset = None
    return np.concatenate(outputs)
