"""What runs inside a Ray task: the FP32 baseline, build contexts, evaluation, and one trial.

Nothing here talks to Optuna. The FP32 model, its evaluation outputs and the evaluation data are
prepared once per worker process and reused by every trial (and sensitivity task) it runs.
:func:`run_trial` builds one candidate with its backend, evaluates it against the FP32 outputs and
times it interleaved with the FP32 model (:mod:`sweeper.measure`); its :class:`TrialResult` goes
back to the driver, which writes the row.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.backends import BuildContext, Candidate, get_backend, is_keras_model, model_fingerprint
from sweeper.backends.onnx.tf2onnx import KerasCandidate, keras_weights_bytes
from sweeper.backends.torch.eager import TorchCandidate
from sweeper.location import cache_dir, ship_artifact
from sweeper.measure import (
    DropCounts,
    EvalData,
    accuracy_drop,
    agreement_pct,
    exclusive_timing,
    max_abs_error,
    predict_rows,
    should_prune,
    stratified_subset,
    time_interleaved,
    trial_indices,
)
from sweeper.spec import (
    Outcome,
    TaskRef,
    TrialResult,
    TrialSpec,
    environment,
)
from sweeper.task import Task, load_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Baseline:
    """The FP32 model of a task and what it gives on the trial part of the evaluation split.

    ``runtime`` says what runs it: ``"pytorch"`` (eager) for a torch model, ``"keras"`` for a
    Keras one (a task whose ONNX backends export it with tf2onnx). ``keep`` lists the samples of
    the evaluation split (in ``eval_batches`` order) that trials are scored on, ``None`` all of
    them; the rest is held out for the finalists' confirmation (:func:`held_out_reference`).
    """

    task: Task
    model: torch.nn.Module
    data: EvalData
    outputs: np.ndarray
    metric: float
    size_bytes: int
    runtime: str = "pytorch"
    # The FP32 weights' hash and the evaluation data's hash, "<weights>-<data>": a study stores the
    # one its baseline was measured with, and every trial checks its own against it.
    fingerprint: str = ""
    keep: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels


def fp32_candidate(model: Any, task: Task, num_threads: int, device: str = "cpu") -> Candidate:
    """The FP32 model as a candidate in its own framework: PyTorch eager (on ``device``), or Keras."""
    if is_keras_model(model):
        return KerasCandidate(model, task)
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    return TorchCandidate(model, task.input_names, num_threads, device=device)


def _state_bytes(model: Any) -> int:
    """Bytes of the FP32 weights: the torch state dict as saved, or the Keras weights."""
    if is_keras_model(model):
        return keras_weights_bytes(model)
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def build_context(
    model: Any, task: Task, workdir: Path, num_threads: int, device: str = "cpu", models_cache: Path | None = None
) -> BuildContext:
    """What a backend gets to build one candidate: the FP32 model, the task, a private ``workdir``
    and the machine's model cache (``models_cache``, by default the user's cache folder)."""
    return BuildContext(
        model=model, task=task, workdir=Path(workdir), cache_dir=models_cache or cache_dir("models"),
        num_threads=num_threads, device=device,
    )


def evaluate(
    predict: Any, task: Task, batch_size: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``predict`` over the task's evaluation split (only the samples ``keep`` lists, when
    given); return (outputs, labels)."""
    data = EvalData.of(task.eval_batches(batch_size))
    data = data if keep is None else data.select(keep)
    return predict_rows(predict, data), data.labels


@cache
def prepare_baseline(task_ref: TaskRef, eval_batch_size: int) -> Baseline:
    """Load the task and evaluate its FP32 model (once per process and task)."""
    import torch

    task = load_task(task_ref.path, task_ref.attr)
    model = task.build_model()
    if not is_keras_model(model):
        model = model.eval()
    fp32 = fp32_candidate(model, task, torch.get_num_threads())
    full = EvalData.of(task.eval_batches(eval_batch_size))
    keep = trial_indices(full.labels, task.has_confirmation_split)
    data = full if keep is None else full.select(keep)
    outputs = predict_rows(fp32.predict, data)
    return Baseline(
        task=task,
        model=model,
        data=data,
        outputs=outputs,
        metric=task.metric(outputs, data.labels),
        size_bytes=_state_bytes(model),
        runtime="keras" if is_keras_model(model) else "pytorch",
        fingerprint=f"{model_fingerprint(model)}-{full.digest()}",
        keep=keep,
    )


def set_threads(num_threads: int) -> None:
    """Let this process's PyTorch use the cores its Ray task reserved."""
    import torch

    torch.set_num_threads(num_threads)


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
    _check_fingerprint(spec, baseline, measured)
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
        measured |= _timed(spec, baseline, candidate)
    return "complete"


class FingerprintMismatchError(RuntimeError):
    """This node's FP32 model or evaluation data differ from those the study's baseline used."""


def _check_fingerprint(spec: TrialSpec, baseline: Baseline, measured: dict[str, Any]) -> None:
    """Record this node's FP32 figures; fail when its model or data are not the study's."""
    measured |= {"fp32_fingerprint": baseline.fingerprint, "node_accuracy_fp32": baseline.metric}
    if spec.fp32_fingerprint and baseline.fingerprint and spec.fp32_fingerprint != baseline.fingerprint:
        raise FingerprintMismatchError(
            f"the FP32 model or evaluation data on this node (fingerprint {baseline.fingerprint}, "
            f"{baseline.task.metric_name} {baseline.metric:.4g}) differ from the study's "
            f"(fingerprint {spec.fp32_fingerprint}); every node must train or load the same weights "
            "and data (fingerprint = weights hash - data hash): clear this node's task cache or "
            "ship the weights with the task"
        )


def _timed(spec: TrialSpec, baseline: Baseline, candidate: Candidate) -> dict[str, Any]:
    """Time the candidate interleaved with the FP32 model on the candidate's device, holding the
    machine's timing lock: builds and evaluations of other trials may overlap, timed phases not."""
    example = baseline.task.example_inputs(spec.measure.batch_size)
    device = candidate.device if baseline.runtime == "pytorch" else "cpu"
    fp32 = fp32_candidate(baseline.model, baseline.task, spec.num_threads, device)
    with exclusive_timing() as phase:
        base_stats, cand_stats = time_interleaved(
            lambda: fp32.predict(example), lambda: candidate.predict(example), spec.measure
        )
    return {
        "timing_wait_s": phase.wait_s, "concurrent_timings": phase.concurrent, "latency": cand_stats,
        "baseline_latency": base_stats, "baseline_runtime": baseline.runtime, "baseline_device": device,
    }


def _drop_counts(task: Any, baseline: Baseline, outputs: np.ndarray) -> dict[str, Any]:
    """The evaluation size and, for a top-1 task, the discordant counts the drop rests on."""
    counts: dict[str, Any] = {"eval_samples": int(len(baseline.labels))}
    fp32_correct = task.correct(baseline.outputs, baseline.labels)
    if fp32_correct is not None:
        paired = DropCounts.from_predictions(fp32_correct, task.correct(outputs, baseline.labels))
        counts |= {"discordant_worse": paired.worse, "discordant_better": paired.better}
    return counts


def _evaluate_cheap_first(
    candidate: Any, baseline: Baseline, spec: TrialSpec, measured: dict[str, Any]
) -> np.ndarray | None:
    """Evaluate on the whole split; with early stopping, score a seeded stratified subset first.

    Returns ``None`` (and records the subset's figures) when the subset says the drop on the whole
    split exceeds the constraint (:func:`_hopeless`); otherwise the outputs on the whole split.
    """
    data, fraction = baseline.data, spec.early_stop_fraction
    if not fraction:
        return predict_rows(candidate.predict, data)
    subset = stratified_subset(data.labels, fraction, seed=spec.subset_seed)
    sub_outputs = predict_rows(candidate.predict, data, subset)
    task, labels = baseline.task, data.labels[subset]
    cand, fp32 = task.metric(sub_outputs, labels), task.metric(baseline.outputs[subset], labels)
    measured |= {"subset_accuracy": cand, "subset_accuracy_fp32": fp32, "subset_samples": len(subset)}
    if _hopeless(spec, task, baseline.outputs[subset], sub_outputs, labels, (fp32, cand)):
        return None
    rest = np.setdiff1d(np.arange(len(data.labels)), subset)
    outputs = np.empty((len(data.labels), *sub_outputs.shape[1:]), dtype=np.float32)
    outputs[subset] = sub_outputs
    if len(rest):
        outputs[rest] = predict_rows(candidate.predict, data, rest)
    return outputs


def _hopeless(
    spec: TrialSpec, task: Task, fp32_out: np.ndarray, cand_out: np.ndarray, labels: np.ndarray,
    metrics: tuple[float, float],
) -> bool:
    """Whether a subset's result condemns the candidate.

    A top-1 task is pruned only when a one-sided exact bound on the discordant predictions says the
    whole split's drop exceeds ``max_drop`` with ``spec.prune_confidence``; so a candidate at the
    limit is pruned at most ``1 - confidence`` of the time. Any other metric falls back to the
    subset's drop against ``max_drop`` plus the space's margin (``spec.prune_above_drop``).
    """
    fp32_correct, cand_correct = task.correct(fp32_out, labels), task.correct(cand_out, labels)
    if fp32_correct is not None and cand_correct is not None and spec.max_drop_points is not None:
        counts = DropCounts.from_predictions(fp32_correct, cand_correct)
        return should_prune(counts, spec.max_drop_points, spec.prune_confidence)
    limit = spec.prune_above_drop if spec.prune_above_drop is not None else float("inf")
    return accuracy_drop(metrics[0], metrics[1], higher_is_better=task.higher_is_better) > limit
