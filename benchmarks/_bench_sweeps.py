"""Helpers of the sweep benchmarks (overhead, scaling): a small trial, a timed sweep, a table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from _catalog import ROOT

from sweeper.spec import MeasureSettings, TaskRef, TrialSpec

TASK = TaskRef(name="digits_cnn", path=str(ROOT / "tasks" / "digits_cnn.py"))
# One untimed-warm-up-free timed call: the trial is build + evaluation + one call.
TINY = MeasureSettings(warmup_runs=0, min_runs=1, max_runs=1, min_time_s=0.0, round_size=1, eval_batch_size=512)
# About half a second of timed calls: the trial is dominated by measurement work, as real ones are.
SMALL = MeasureSettings(warmup_runs=10, min_runs=50, max_runs=100_000, min_time_s=0.5, round_size=10,
                        eval_batch_size=512)  # fmt: skip


def describe_machine() -> str:
    from _harness import machine

    info = machine()
    return (
        f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, flags: "
        f"{', '.join(info['cpu_flags']) or 'none listed'}; torch {info['torch']}, onnxruntime "
        f"{info['onnxruntime']}. Trials: task digits_cnn, backend onnxruntime_fp32, 1 CPU each."
    )


def tiny_spec(artifact_dir: Path, measure: MeasureSettings = TINY) -> TrialSpec:
    """The spec of one trial as the driver would send it (study ``direct``)."""
    return TrialSpec(
        study="direct", trial_number=0, task=TASK, backend="onnxruntime_fp32", params={}, measure=measure,
        num_threads=1, artifact_dir=str(artifact_dir),
    )  # fmt: skip


def direct_trials(spec: TrialSpec, n: int) -> list[float]:
    """Seconds of ``n`` in-process :func:`sweeper.worker.run_trial` calls, after one warm-up call."""
    from sweeper.worker import run_trial

    first = run_trial(spec)
    if first.state != "complete":
        raise RuntimeError(f"the warm-up trial failed: {first.error}")
    times = []
    for i in range(n):
        numbered = replace(spec, trial_number=i + 1, artifact_dir=f"{spec.artifact_dir}-{i + 1}")
        t0 = time.perf_counter()
        result = run_trial(numbered)
        times.append(time.perf_counter() - t0)
        if result.state != "complete":
            raise RuntimeError(f"direct trial {i + 1} failed: {result.error}")
    return times


def space_file(folder: Path, study: str, trials: int, measure: MeasureSettings) -> Path:
    """A space file for ``trials`` trials of the benchmark trial (the quickstart's format)."""
    path = folder / f"{study}.yaml"
    path.write_text(
        f"task: {TASK.path}\n"
        f"study: {study}\n"
        f"trials: {trials}\n"
        "seed: 0\n"
        "objective: latency_ms_p50\n"
        "constraint: {max_drop: 100.0, mode: absolute}\n"
        "hardware: {target: cpu, num_cpus: 1}\n"
        f"measure: {{batch_size: 1, warmup_runs: {measure.warmup_runs}, min_runs: {measure.min_runs}, "
        f"max_runs: {measure.max_runs}, min_time_s: {measure.min_time_s}, round_size: {measure.round_size}, "
        f"eval_batch_size: {measure.eval_batch_size}}}\n"
        "backends:\n  onnxruntime_fp32: {}\n"
    )
    return path


def timed_sweep(
    folder: Path, study: str, trials: int, *, max_concurrent: int, measure: MeasureSettings = TINY
) -> dict[str, Any]:
    """Run a sweep on a fresh embedded Ray; return event times and the rows' ``duration_s``.

    Keys: ``t0`` (call), ``start`` (the driver's start event), ``finished`` (each trial's
    finished event, in order), ``end`` (return, Ray shut down), ``durations`` (seconds inside
    each trial's Ray task, in finishing order), ``failed`` (count).
    """
    import sys

    from sweeper.events import Event, SweepStarted, TrialFinished
    from sweeper.space import load_space
    from sweeper.study import SweepOptions, run_sweep

    # Import Ray only after the first sweep: sweeper.cluster sets its authentication mode first.
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    space = load_space(space_file(folder, study, trials, measure))
    times: dict[str, Any] = {"finished": [], "durations": [], "failed": 0}

    def on_event(event: Event) -> None:
        if isinstance(event, SweepStarted):
            times["start"] = time.perf_counter()
        elif isinstance(event, TrialFinished):
            times["finished"].append(time.perf_counter())
            times["durations"].append(float(event.row.get("duration_s") or 0.0))
            times["failed"] += event.row.get("state") != "complete"

    times["t0"] = time.perf_counter()
    options = SweepOptions(out=folder / "results", study=study, trials=trials, max_concurrent=max_concurrent)
    run_sweep(space, options, on_event)
    import ray

    ray.shutdown()
    times["end"] = time.perf_counter()
    if times["failed"]:
        raise RuntimeError(f"{times['failed']} of {trials} benchmark trials failed; see {folder / 'results'}")
    return times


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(out: Path, name: str, text: str) -> Path:
    from datetime import UTC, datetime

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    return path
