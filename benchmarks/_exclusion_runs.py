"""Methods (a), (b), (d) and the calibration-cache A/B of benchmark_exclusion.

Every method starts from a cold sweeper cache of its own (:class:`CacheRoots`): calibration
ranges and sensitivity tables are recomputed inside its wall time, never inherited from an earlier
method or an earlier run. Only the trained task weights, downloaded data and the FP32 ONNX export
are shared (linked from the user's cache / exported once up front), since every method starts
from them alike.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.spec import MeasureSettings, TaskRef

BACKEND = "onnxruntime_static_int8"
# What a method's own cold cache does not inherit: the things under test.
PRIVATE_CACHE_PARTS = ("models", "sensitivity")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """One benchmark run: the task, the budget and the fixed INT8 settings of (a), (b), (c)."""

    task_ref: TaskRef
    budget: float
    trials: int
    top_k: int
    threads: int
    quick: bool
    calibration_method: str
    calibration_samples: int
    per_channel: bool
    measure: MeasureSettings
    cache_builds: int
    max_concurrent: int
    out: Path
    space: Path | None = None  # (d) runs this space file instead of the generated one
    max_steps: int | None = None  # (b)'s revert loop stops after this many re-quantizations

    def int8_params(self, excluded: tuple[str, ...] = ()) -> dict[str, Any]:
        return {
            "calibration_method": self.calibration_method, "calibration_samples": self.calibration_samples,
            "per_channel": self.per_channel, "nodes_to_exclude": excluded,
        }  # fmt: skip


@dataclass(kw_only=True)
class Outcome:
    """A method's final model and what it took to find it."""

    method: str
    candidate: Any = None  # something with .predict(batch)
    accuracy: float | None = None
    accuracy_drop: float | None = None
    accuracy_held_out: float | None = None
    accuracy_drop_held_out: float | None = None
    held_out_samples: int | None = None
    excluded: list[str] = field(default_factory=list)
    evaluations: int | None = None
    evaluations_note: str = ""
    trials: int | None = None
    pruned: int | None = None
    wall_time_s: float | None = None
    setup_s: float | None = None
    error: str | None = None


class CacheRoots:
    """Private ``SWEEPER_CACHE_DIR`` roots under one temporary folder.

    Each root links every entry of the user's cache (task weights, data) except the models and
    sensitivity caches; its ``models/onnx`` links one folder shared by all roots, so the FP32
    export is made once and every root starts with cold calibration and sensitivity caches.
    """

    def __init__(self, base: Path) -> None:
        from sweeper.location import cache_dir

        self.base = base
        self.user_root = cache_dir()
        self.onnx = base / "shared-onnx"
        self.onnx.mkdir(parents=True)

    def fresh(self, name: str) -> Path:
        root = self.base / name
        root.mkdir()
        for entry in self.user_root.iterdir():
            if entry.name not in PRIVATE_CACHE_PARTS:
                (root / entry.name).symlink_to(entry)
        (root / "models").mkdir()
        (root / "models" / "onnx").symlink_to(self.onnx)
        return root

    @staticmethod
    @contextlib.contextmanager
    def using(root: Path) -> Any:
        """Point sweeper's cache (this process and Ray workers started meanwhile) at ``root``."""
        saved = os.environ.get("SWEEPER_CACHE_DIR")
        os.environ["SWEEPER_CACHE_DIR"] = str(root)
        try:
            yield root
        finally:
            if saved is None:
                os.environ.pop("SWEEPER_CACHE_DIR", None)
            else:
                os.environ["SWEEPER_CACHE_DIR"] = saved


class Builder:
    """Builds and evaluates ONNX Runtime static INT8 candidates in this process."""

    def __init__(self, settings: Settings, baseline: Any, scratch: Path) -> None:
        self.settings = settings
        self.baseline = baseline
        self.scratch = scratch
        self._count = 0

    def build(self, params: dict[str, Any], cache_root: Path) -> Any:
        """Build one candidate, in a workdir of its own (the backend names its ranges file
        ``calibration.json`` in the workdir, so a reused workdir could feed it stale ranges)."""
        from sweeper.backends import get_backend
        from sweeper.worker import build_context

        self._count += 1
        workdir = self.scratch / f"build-{self._count:04d}"
        workdir.mkdir(parents=True)
        ctx = build_context(self.baseline.model, self.baseline.task, workdir, self.settings.threads,
                            models_cache=cache_root / "models")
        return get_backend(BACKEND).build(ctx, get_backend(BACKEND).config(params))

    def drop(self, candidate: Any) -> tuple[float, float]:
        """(metric, drop against the PyTorch FP32 metric) on the trial part of the evaluation split:
        the samples a sweep's trials are scored on (the whole split when nothing is held out)."""
        from sweeper.measure import accuracy_drop, predict_rows

        task, data = self.baseline.task, self.baseline.data
        metric = task.metric(predict_rows(candidate.predict, data), data.labels)
        return metric, accuracy_drop(self.baseline.metric, metric, higher_is_better=task.higher_is_better)

    def held_out_drop(self, candidate: Any) -> tuple[float, float, int]:
        """(metric, drop against the PyTorch FP32 model, samples) on the held-out part of the
        evaluation split, which no method's search scored (a sweep confirms its finalists on it)."""
        from sweeper.confirmation import held_out_reference
        from sweeper.holdout import held_out_batches, predict_all
        from sweeper.measure import accuracy_drop

        task, bs = self.baseline.task, self.settings.measure.eval_batch_size
        reference = held_out_reference(self.settings.task_ref, bs)
        outputs, labels = predict_all(candidate.predict, held_out_batches(task, self.baseline.keep, bs))
        metric = task.metric(outputs, labels)
        drop = accuracy_drop(reference.metric, metric, higher_is_better=task.higher_is_better)
        return metric, drop, len(labels)


def full_int8(builder: Builder, roots: CacheRoots) -> Outcome:
    """(a) Every quantizable layer in INT8."""
    with roots.using(roots.fresh("a-full-int8")) as root:
        started = time.perf_counter()
        candidate = builder.build(builder.settings.int8_params(), root)
        metric, drop = builder.drop(candidate)
    return Outcome(
        method="(a) ORT static INT8, no exclusion", candidate=candidate, accuracy=metric, accuracy_drop=drop,
        evaluations=1, evaluations_note="1 build + evaluation", wall_time_s=time.perf_counter() - started,
    )  # fmt: skip


def greedy_revert(builder: Builder, roots: CacheRoots) -> tuple[Outcome, list[str]]:
    """(b) Rank layers by sweeper's sensitivity, then leave the next most sensitive layer in
    float until the drop is within budget. Returns the outcome and the ranking."""
    from sweeper.measure import accuracy_drop
    from sweeper.scoring import list_layers, score_layers

    s = builder.settings
    params = {k: v for k, v in s.int8_params().items() if k != "nodes_to_exclude"}
    with roots.using(roots.fresh("b-greedy")) as root:
        started = time.perf_counter()
        # sweeper.sensitivity's task bodies, run here in one process (as NNCF's ranking runs).
        info = list_layers(s.task_ref, BACKEND, params, s.measure.eval_batch_size, s.threads)
        names = [unit["name"] for unit in info["units"]]
        scored = score_layers(s.task_ref, BACKEND, params, info["units"], info["names"], s.measure.eval_batch_size,
                              s.threads)  # fmt: skip
        ranking = rank(scored, names, builder)
        ranked_at = time.perf_counter()
        excluded: list[str] = []
        drop = accuracy_drop(builder.baseline.metric, info["full_metric"],
                             higher_is_better=builder.baseline.task.higher_is_better)
        candidate, metric, steps = None, info["full_metric"], 0
        while drop > s.budget and len(excluded) < len(ranking) and (s.max_steps is None or steps < s.max_steps):
            excluded.append(ranking[len(excluded)])
            candidate = builder.build(s.int8_params(tuple(excluded)), root)
            metric, drop = builder.drop(candidate)
            steps += 1
        if candidate is None:  # full INT8 was already within budget
            candidate = builder.build(s.int8_params(), root)
        wall = time.perf_counter() - started
    outcome = Outcome(
        method="(b) greedy revert loop (sweeper sensitivity ranking)", candidate=candidate, accuracy=metric,
        accuracy_drop=drop, excluded=excluded, evaluations=1 + len(names) + steps,
        evaluations_note=f"{1 + len(names) + steps} (1 full INT8 + {len(names)} ranking + {steps} loop"
        + (f", stopped at --max-steps {s.max_steps}" if drop > s.budget and steps == s.max_steps else "") + ")",
        wall_time_s=wall, setup_s=ranked_at - started,
    )  # fmt: skip
    return outcome, ranking


def rank(scored: list[dict[str, Any]], names: list[str], builder: Builder) -> list[str]:
    """Most sensitive first, ordered as :func:`sweeper.sensitivity.run_sensitivity` orders them."""
    from sweeper.measure import accuracy_drop

    task, fp32 = builder.baseline.task, builder.baseline.metric
    order = {name: i for i, name in enumerate(names)}

    def key(row: dict[str, Any]) -> tuple[bool, float, float, int]:
        if row["error"] is not None:  # a layer that cannot be scored ranks first
            return (False, 0.0, 0.0, order[row["layer"]])
        drop = accuracy_drop(fp32, row["metric"], higher_is_better=task.higher_is_better)
        return (True, -row["output_error"], -drop, order[row["layer"]])

    return [row["layer"] for row in sorted(scored, key=key)]


def joint_search(builder: Builder, roots: CacheRoots, n_layers: int, scratch: Path, study: str) -> Outcome:
    """(d) ``run_sweep`` on an embedded Ray: over calibration settings and ``exclude: top_k`` of
    ORT static INT8, or the space file ``--space`` names (then the model is the sweep's winner,
    from its confirmed figures, whatever its backend)."""
    from sweeper import results
    from sweeper.api import open_study
    from sweeper.backends.onnx.runtime import load_onnx_candidate
    from sweeper.events import ConfirmationStarted, Event, SweepPhase, SweepStarted, TrialFinished
    from sweeper.space import load_space
    from sweeper.study import SweepOptions, run_sweep

    s = builder.settings
    top_k = min(s.top_k, n_layers)
    if s.space is None:
        written = write_space(scratch / "exclusion-sweep.yaml", s, builder.baseline.task.calibration_size, top_k)
        space = load_space(written)
        method = f"(d) sweeper joint search ({s.trials} trials, top_k 0..{top_k})"
    else:
        space = load_space(s.space)
        method = f"(d) sweeper run {s.space.name} ({space.trials} trials)"
    events: dict[str, float] = {}

    def on_event(event: Event) -> None:
        if isinstance(event, SweepStarted):
            events["start"] = time.perf_counter()
        elif isinstance(event, TrialFinished):  # progress on stderr, away from the table
            row = event.row
            print(f"... (d) trial {row.get('trial_number')} {row.get('backend')}: {row.get('state')}, "
                  f"{row.get('latency_ms_p50')} ms, drop {row.get('accuracy_drop')}", file=sys.stderr, flush=True)
        elif isinstance(event, SweepPhase):
            print(f"... (d) {event.text}", file=sys.stderr, flush=True)
        elif isinstance(event, ConfirmationStarted):
            print(f"... (d) confirming {len(event.trials)} finalists", file=sys.stderr, flush=True)

    with roots.using(roots.fresh("d-sweep")):
        started = time.perf_counter()
        own = s.space is None  # a given space file keeps its own trials and concurrency
        options = SweepOptions(out=s.out, study=study, seed=0, task=s.task_ref.path,
                               trials=s.trials if own else None, max_concurrent=s.max_concurrent if own else None)
        try:
            summary = run_sweep(space, options, on_event)
            wall = time.perf_counter() - started
        finally:
            # Ray is imported by run_sweep, after sweeper.cluster has set its authentication mode
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()
    df = results.load(summary.study_dir)
    pruned, failed = int(df.state.eq("pruned").sum()), int(df.state.eq("failed").sum())
    ranked = bool(space.exclusions)  # a space without an exclusion search ranks no layer
    note = f"{len(df)} trials ({pruned} pruned, {failed} failed)"
    if ranked:
        note += f" + {n_layers + 1} sensitivity builds"
    if summary.confirmed:
        note += f" + {summary.confirmed} finalists confirmed"
    outcome = Outcome(
        method=method, trials=len(df), pruned=pruned, evaluations=len(df) + (n_layers + 1 if ranked else 0),
        evaluations_note=note,
        wall_time_s=wall, setup_s=events.get("start", started) - started,
    )  # fmt: skip
    best = open_study(str(summary.study_dir)).best
    if best is None:
        outcome.error = f"no feasible trial in {len(df)}; study kept in {summary.study_dir}"
        return outcome
    artifact = Path(str(best.artifact_path))
    if artifact.suffix != ".onnx":
        outcome.error = f"the winner (trial {best.trial_number}, {best.backend}) is not an ONNX model: {artifact}"
        return outcome
    outcome.candidate = load_onnx_candidate(artifact, s.threads)
    outcome.accuracy, outcome.accuracy_drop = builder.drop(outcome.candidate)
    excluded = best.get("excluded_layers")
    outcome.excluded = list(excluded) if isinstance(excluded, list | tuple | np.ndarray) else []
    params = {k.removeprefix("param."): v for k, v in best.items()
              if k.startswith("param.") and k != "param.nodes_to_exclude" and _given(v)}  # fmt: skip
    described = ", ".join(f"{k}={v}" for k, v in params.items())
    outcome.method += f": winner trial {best.trial_number}, {best.backend} {described}"
    return outcome


def _given(value: Any) -> bool:
    """Whether a row's parameter cell holds a value (not None, NaN or pandas' NA: a parameter of
    another backend)."""
    import pandas as pd

    return isinstance(value, list | tuple | np.ndarray) or not pd.isna(value)


def write_space(path: Path, s: Settings, calibration_size: int, top_k: int) -> Path:
    """The space of (d): (a)'s settings listed first, so the sensitivity ranking uses them."""
    methods = [s.calibration_method] + [m for m in ("minmax", "entropy", "percentile") if m != s.calibration_method]
    samples = sorted({min(n, calibration_size) for n in (64, 128, 256)} - {s.calibration_samples})
    samples = [s.calibration_samples, *samples]
    channels = [s.per_channel, not s.per_channel]
    m = s.measure
    path.write_text(
        f"task: {s.task_ref.path}\n"
        f"study: exclusion\ntrials: {s.trials}\nseed: 0\nmax_concurrent: {s.max_concurrent}\n"
        "objective: latency_ms_p50\n"
        f"constraint: {{max_drop: {s.budget}, mode: absolute}}\n"
        f"hardware: {{kind: cpu, num_cpus: {s.threads}}}\n"
        f"measure: {{batch_size: {m.batch_size}, warmup_runs: {m.warmup_runs}, min_runs: {m.min_runs}, "
        f"max_runs: {m.max_runs}, min_time_s: {m.min_time_s}, round_size: {m.round_size}, "
        f"eval_batch_size: {m.eval_batch_size}}}\n"
        "early_stop: {fraction: 0.25, margin: 2.0}\n"
        f"backends:\n  {BACKEND}:\n"
        f"    calibration_method: [{', '.join(methods)}]\n"
        f"    calibration_samples: [{', '.join(map(str, samples))}]\n"
        f"    per_channel: [{', '.join(str(c).lower() for c in channels)}]\n"
        f"    exclude: {{top_k: {{low: 0, high: {top_k}}}}}\n"
    )
    return path


def cache_ab(builder: Builder, roots: CacheRoots, ranking: list[str]) -> list[dict[str, Any]]:
    """Exclusion-only builds (same calibration, different excluded sets), interleaved A/B/A/B:
    A shares one calibration cache (warmed by one untimed build), B gets an empty one per build."""
    s = builder.settings
    sets = [tuple(ranking[: k % (len(ranking) + 1)]) for k in range(s.cache_builds)]
    shared = roots.fresh("cache-shared")
    builder.build(s.int8_params(), shared)  # warms the shared calibration cache
    rows = []
    for i, excluded in enumerate(sets):
        for arm in ("shared", "empty"):
            root = shared if arm == "shared" else roots.fresh(f"cache-empty-{i}")
            started = time.perf_counter()
            candidate = builder.build(s.int8_params(excluded), root)
            built = time.perf_counter()
            builder.drop(candidate)
            rows.append({
                "build_index": i, "cache": arm, "n_excluded": len(excluded), "excluded_layers": list(excluded),
                "build_s": built - started, "build_and_evaluate_s": time.perf_counter() - started,
            })  # fmt: skip
    return rows
