"""What every Ray task of a study runs on its worker: the FP32 baseline, build contexts, evaluation.

Nothing here talks to Optuna. The FP32 model, its evaluation outputs and the evaluation data are
prepared once per worker process and reused by every trial (and sensitivity task) it runs.
"""

from __future__ import annotations

import io
import platform
import socket
import tempfile
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.backends import BuildContext, Candidate, get_backend
from sweeper.backends.onnx.tf2onnx import KerasCandidate, is_keras_model, keras_weights_bytes
from sweeper.backends.torch.eager import TorchCandidate
from sweeper.cache import cache_dir
from sweeper.spec import VERSIONED_PACKAGES, Environment, FP32Baseline, MeasureSettings, TaskRef
from sweeper.task import Task, load_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Baseline:
    """The FP32 model of a task and what it gives on the evaluation split.

    ``runtime`` says what runs it: ``"pytorch"`` (eager) for a torch model, ``"keras"`` for a
    Keras one (a task whose ONNX backends export it with tf2onnx).
    """

    task: Task
    model: torch.nn.Module
    outputs: np.ndarray
    labels: np.ndarray
    metric: float
    size_bytes: int
    runtime: str = "pytorch"


def fp32_candidate(model: Any, task: Task, num_threads: int) -> Candidate:
    """The FP32 model as a candidate in its own framework: PyTorch eager, or Keras."""
    if is_keras_model(model):
        return KerasCandidate(model, task)
    return TorchCandidate(model, task.input_names, num_threads)


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
    import torch

    task = load_task(task_ref.path, task_ref.attr)
    model = task.build_model()
    if not is_keras_model(model):
        model = model.eval()
    fp32 = fp32_candidate(model, task, torch.get_num_threads())
    outputs, labels = evaluate(fp32.predict, task, eval_batch_size)
    return Baseline(
        task=task,
        model=model,
        outputs=outputs,
        labels=labels,
        metric=task.metric(outputs, labels),
        size_bytes=_state_bytes(model),
        runtime="keras" if is_keras_model(model) else "pytorch",
    )


def baseline_summary(
    task_ref: TaskRef,
    measure: MeasureSettings,
    num_threads: int,
    preflight: list[tuple[str, dict[str, Any]]] | tuple[()] = (),
) -> FP32Baseline:
    """The FP32 figures a study needs once, after the backends' preflight checks.

    Returns the FP32 metric, its direction and the state dict's size. ``preflight`` lists
    (backend, params) pairs whose :meth:`~sweeper.backends.Backend.preflight` must pass.
    """
    set_threads(num_threads)
    baseline = prepare_baseline(task_ref, measure.eval_batch_size)
    with tempfile.TemporaryDirectory(prefix="sweeper-preflight-") as workdir:
        ctx = build_context(baseline.model, baseline.task, Path(workdir), num_threads)
        for backend, params in preflight:
            get_backend(backend).preflight(ctx, get_backend(backend).config(params))
    return FP32Baseline(
        metric=baseline.metric,
        metric_name=baseline.task.metric_name,
        higher_is_better=baseline.task.higher_is_better,
        runtime=baseline.runtime,
        size_bytes=baseline.size_bytes,
        calibration_size=baseline.task.calibration_size,
        eval_samples=int(baseline.labels.shape[0]),
        environment=environment(),
    )


def set_threads(num_threads: int) -> None:
    """Let this process's PyTorch use the cores its Ray task reserved."""
    import torch

    torch.set_num_threads(num_threads)


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

