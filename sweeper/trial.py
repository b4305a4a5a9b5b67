"""One trial, as it runs inside a Ray task: build a candidate, then measure it honestly.

Nothing here talks to Optuna. The FP32 model, its evaluation outputs and the evaluation data are
prepared once per worker process and reused by every trial that process runs.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.spec import VERSIONED_PACKAGES, Environment, MeasureSettings, TaskRef, TrialResult, TrialSpec

if TYPE_CHECKING:
    import torch

    from sweeper.task import Task


@dataclass(frozen=True)
class Baseline:
    """The FP32 model of a task and what it gives on the evaluation split."""

    task: Task
    model: torch.nn.Module
    outputs: np.ndarray
    labels: np.ndarray
    metric: float
    size_bytes: int


def evaluate(predict: Any, task: Task, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict`` over the task's evaluation split; return (outputs, labels)."""
    outputs, labels = [], []
    for batch, y in task.eval_batches(batch_size):
        outputs.append(np.asarray(predict(batch), dtype=np.float32))
        labels.append(y)
    return np.concatenate(outputs), np.concatenate(labels)


@cache
def prepare_baseline(task_ref: TaskRef, eval_batch_size: int) -> Baseline:
    """Load the task and evaluate its FP32 model (once per process and task)."""
    import io

    import torch

    from sweeper.backends.torch.eager import TorchCandidate
    from sweeper.task import load_task

    task = load_task(task_ref.path, task_ref.attr)
    model = task.build_model().eval()
    fp32 = TorchCandidate(model, task.input_names, torch.get_num_threads())
    outputs, labels = evaluate(fp32.predict, task, eval_batch_size)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return Baseline(
        task=task,
        model=model,
        outputs=outputs,
        labels=labels,
        metric=task.metric(outputs, labels),
        size_bytes=buffer.getbuffer().nbytes,
    )


def baseline_summary(
    task_ref: TaskRef,
    measure: MeasureSettings,
    num_threads: int,
    preflight: list[tuple[str, dict[str, Any]]] = (),
) -> dict[str, Any]:
    """The FP32 figures a study needs once, after the backends' preflight checks.

    Returns the FP32 metric, its direction and the state dict's size. ``preflight`` lists
    (backend, params) pairs whose :meth:`~sweeper.backends.Backend.preflight` must pass.
    """
    from sweeper.backends import BuildContext, get_backend
    from sweeper.cache import cache_dir

    _set_threads(num_threads)
    baseline = prepare_baseline(task_ref, measure.eval_batch_size)
    with tempfile.TemporaryDirectory(prefix="sweeper-preflight-") as workdir:
        ctx = BuildContext(
            model=baseline.model, task=baseline.task, workdir=Path(workdir),
            cache_dir=cache_dir("models"), num_threads=num_threads,
        )
        for backend, params in preflight:
            get_backend(backend).preflight(ctx, get_backend(backend).config(params))
    return {
        "metric": baseline.metric,
        "metric_name": baseline.task.metric_name,
        "higher_is_better": baseline.task.higher_is_better,
        "size_bytes": baseline.size_bytes,
        "calibration_size": baseline.task.calibration_size,
        "eval_samples": int(baseline.labels.shape[0]),
        "environment": environment(),
    }


def run_trial(spec: TrialSpec) -> TrialResult:
    """Build and measure one candidate. Never raises: a failure is a ``failed`` result."""
    started = time.time()
    measured: dict[str, Any] = {"num_threads": spec.num_threads, "batch_size": spec.measure.batch_size}
    try:
        _set_threads(spec.num_threads)
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


def _build_and_measure(spec: TrialSpec, measured: dict[str, Any]) -> str:
    """Build, evaluate (cheap-first when asked) and time the candidate; return the trial's state."""
    from sweeper.backends import BuildContext, get_backend
    from sweeper.backends.torch.eager import TorchCandidate
    from sweeper.cache import cache_dir
    from sweeper.measure import agreement_pct, max_abs_error, time_interleaved

    baseline = prepare_baseline(spec.task, spec.measure.eval_batch_size)
    task = baseline.task
    measured["baseline_size_bytes"] = baseline.size_bytes
    backend = get_backend(spec.backend)
    config = backend.config(spec.params)
    with tempfile.TemporaryDirectory(prefix=f"sweeper-trial-{spec.trial_number}-") as workdir:
        ctx = BuildContext(
            model=baseline.model,
            task=task,
            workdir=Path(workdir),
            cache_dir=cache_dir("models"),
            num_threads=spec.num_threads,
            device=spec.device,
        )
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

        example = task.example_inputs(spec.measure.batch_size)
        fp32 = TorchCandidate(baseline.model, task.input_names, spec.num_threads)
        base_stats, cand_stats = time_interleaved(
            lambda: fp32.predict(example),
            lambda: candidate.predict(example),
            spec.measure,
        )
        measured["latency"] = cand_stats
        measured["baseline_latency"] = base_stats
    return "complete"


# Artifacts up to this size travel home with the result, through Ray's object store.
ARTIFACT_RETURN_LIMIT_BYTES = 2 * 1024**3


def ship_artifact(artifact: Path, destination: str) -> dict[str, Any]:
    """Send a saved artifact (file or folder) where the study keeps it; return the result's fields.

    A remote study folder (a URI) gets it uploaded from here. Otherwise its files go back with
    the result and the driver writes them into its study folder, so the nodes need no folder
    shared with the driver; one larger than :data:`ARTIFACT_RETURN_LIMIT_BYTES` is written here,
    at ``destination``, which must then be shared storage.
    """
    from sweeper.location import is_uri, location

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


def _evaluate_cheap_first(candidate: Any, baseline: Baseline, spec: TrialSpec, measured: dict[str, Any]) -> np.ndarray | None:
    """Evaluate on the whole split; with early stopping, score the first share before the rest.

    Returns ``None`` (and records the subset's figures) when the subset's drop already exceeds
    ``spec.prune_above_drop``.
    """
    from sweeper.measure import accuracy_drop

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
            if accuracy_drop(fp32, cand, higher_is_better=task.higher_is_better) > spec.prune_above_drop:
                return None
            n_subset = None
    return np.concatenate(outputs)


def _set_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


@cache
def environment() -> Environment:
    """Describe this process's node, hardware and library versions."""
    from importlib.metadata import PackageNotFoundError, version

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
