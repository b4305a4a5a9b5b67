"""The exhaustive reference of the search benchmark: every configuration of a space, measured twice.

Configurations are enumerated as Optuna parameters (every choice, every integer of an integer
range, every ``exclude`` option) and turned into backend parameters by the sweeper's own
:func:`sweeper.sampling.suggest` on an ``optuna.trial.FixedTrial``, so a configuration here is
exactly what a sweep would build for the same parameters. Proposals whose validated configs share
a :func:`sweeper.repeats.config_key` are one configuration.

Each measurement is one real trial: :class:`sweeper.dispatch.Dispatcher` runs
:func:`sweeper.worker.run_trial` in a Ray task (one trial in flight), with the space's
measurement settings, against the study's FP32 baseline and sensitivity ranking (both as
``run_sweep`` obtains them). The candidate's ONNX artifact comes back with the result; the driver
then evaluates it on the task's held-out half (``HELD_OUT`` of the task file), which no trial sees.
Every configuration is measured in two passes over the space (the second in a shuffled order):
the first pass is what a search sees of it (one trial); the pair gives the reference's own noise
and the confirmed latency. The table is cached as Parquet in the user cache, keyed by the space's
backends and measurement block, the task files, the library versions and the CPU
(``--remeasure`` measures again).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper import study_folder
from sweeper.backends import get_backend
from sweeper.dispatch import Dispatcher
from sweeper.errors import ConfigError
from sweeper.events import ignore
from sweeper.exclusion import ExclusionSearch
from sweeper.location import cache_dir, cache_key
from sweeper.measure import DropCounts, accuracy_drop
from sweeper.params import Choices, Fixed, Range, encode_choice
from sweeper.repeats import config_key
from sweeper.rows import flatten
from sweeper.sampling import suggest
from sweeper.sensitivity import study_rankings
from sweeper.space import Space
from sweeper.spec import VERSIONED_PACKAGES, Environment, LatencyStats, TaskRef, TrialResult, TrialSpec, cpu_model
from sweeper.study import RunningStudy
from sweeper.study_setup import first_params, study_info
from sweeper.worker import evaluate, fp32_candidate

# Bump when what the reference table holds changes, so an older cached table is not read back.
LAYOUT = 2
# The second pass measures the configurations in this shuffled order, so that a slow spell of the
# machine does not hit the same configurations in both passes.
CONFIRM_ORDER_SEED = 1
LATENCY_STATS = ("p50", "p90", "p99", "mean", "std")


@dataclass(frozen=True)
class Proposal:
    """One distinct configuration: the Optuna parameters that ask for it and what they build."""

    key: str
    optuna_params: dict[str, Any]
    backend: str
    params: dict[str, Any]


def _values(param: Fixed | Choices | Range, label: str) -> list[Any]:
    if isinstance(param, Fixed):
        return [param.value]
    if isinstance(param, Choices):
        return [encode_choice(v) for v in param.values]
    if not param.integer:
        raise ConfigError(f"'{label}' is a float range; the exhaustive reference needs a finite space")
    return list(range(int(param.low), int(param.high) + 1, int(param.step or 1)))


def _axes(space: Space, backend: str, ranking: list[str]) -> dict[str, list[Any]]:
    """Every Optuna parameter ``suggest`` may ask for ``backend``, with all its values."""
    axes = {
        f"{backend}.{key}": _values(p, key) for key, p in space.backends[backend].items() if not isinstance(p, Fixed)
    }
    search: ExclusionSearch | None = space.exclusions.get(backend)
    if search is not None:
        if not isinstance(search.top_k, Fixed):
            axes[f"{backend}.exclude_top_k"] = _values(search.top_k, "exclude.top_k")
        for layer in search.free(ranking)[: search.per_layer]:
            axes[f"{backend}.exclude.{layer}"] = [False, True]
    return axes


def enumerate_space(space: Space, rankings: dict[str, list[str]]) -> tuple[list[Proposal], int]:
    """The distinct configurations of ``space`` and the number of parameter combinations."""
    import optuna

    proposals: dict[str, Proposal] = {}
    combinations = 0
    for backend in space.backends:
        axes = _axes(space, backend, rankings.get(backend, []))
        for values in itertools.product(*axes.values()):
            combinations += 1
            optuna_params = {"backend": backend, **dict(zip(axes, values, strict=True))}
            name, params = suggest(optuna.trial.FixedTrial(optuna_params), space, rankings)
            try:
                key = config_key(name, get_backend(name).config(params))
            except ConfigError:
                continue  # the backend rejects it: a sweep records it as rejected, not measured
            proposals.setdefault(key, Proposal(key, optuna_params, name, params))
    return list(proposals.values()), combinations


def reference_path(space: Space, task_ref: TaskRef) -> Path:
    """Where the reference table of ``space`` is cached on this machine."""
    from importlib.metadata import version

    task_files = [Path(task_ref.path), Path(task_ref.path).resolve().parents[2] / "tasks" / "fashion_mnist_cnn.py"]
    key = cache_key(
        backends=space.file.backends,
        measure=space.measure.model_dump(),
        hardware=space.target_of(next(iter(space.backends))).model_dump(),
        task_files=[hashlib.sha256(p.read_bytes()).hexdigest() for p in task_files if p.is_file()],
        versions={d: version(d) for d in (*VERSIONED_PACKAGES, "onnx")},
        cpu=cpu_model(),
        layout=LAYOUT,
    )
    return cache_dir("benchmarks") / f"search-reference-{task_ref.name}-{key}.parquet"


class HeldOut:
    """The FP32 model's outputs on the held-out half, and the scoring of a candidate's artifact there."""

    def __init__(self, task_ref: TaskRef, eval_batch_size: int) -> None:
        import torch

        from sweeper.task import load_task

        torch.set_num_threads(1)
        self.task = load_task(task_ref.path, "HELD_OUT")
        self.batch_size = eval_batch_size
        model = self.task.build_model()
        self.outputs, self.labels = evaluate(fp32_candidate(model, self.task, 1).predict, self.task, eval_batch_size)
        self.metric = self.task.metric(self.outputs, self.labels)
        self.correct = self.task.correct(self.outputs, self.labels)

    def score(self, files: dict[str, bytes], name: str) -> dict[str, Any]:
        """Evaluate the ONNX artifact ``name`` (its ``files``, as a trial returns them)."""
        from sweeper.backends.onnx.runtime import load_onnx_candidate

        with tempfile.TemporaryDirectory(prefix="bench-held-out-") as folder:
            for relative, data in files.items():
                (Path(folder) / relative).parent.mkdir(parents=True, exist_ok=True)
                (Path(folder) / relative).write_bytes(data)
            candidate = load_onnx_candidate(Path(folder) / name, 1)
            outputs, _ = evaluate(candidate.predict, self.task, self.batch_size)
        accuracy = self.task.metric(outputs, self.labels)
        counts = DropCounts.from_predictions(self.correct, self.task.correct(outputs, self.labels))
        return {
            "held_out_accuracy": accuracy,
            "held_out_accuracy_fp32": self.metric,
            "held_out_drop": accuracy_drop(self.metric, accuracy, higher_is_better=self.task.higher_is_better),
            "held_out_samples": len(self.labels),
            "held_out_worse": counts.worse,
            "held_out_better": counts.better,
        }


def _stored(result: TrialResult) -> dict[str, Any]:
    """The result's fields as flat columns (the artifact's bytes left out)."""
    flat = flatten(result)
    for column in ("artifact_files", "artifact_name", "artifact_path", "environment"):
        flat.pop(column, None)
    return flat


def result_of(row: dict[str, Any]) -> TrialResult:
    """The :class:`TrialResult` a reference row was stored from (without its artifact)."""

    def stats(prefix: str) -> LatencyStats | None:
        if row.get(f"{prefix}latency_ms_p50") is None or pd.isna(row[f"{prefix}latency_ms_p50"]):
            return None
        figures = {s: float(row[f"{prefix}latency_ms_{s}"]) for s in LATENCY_STATS}
        return LatencyStats(**figures, runs=int(row[f"{prefix}latency_runs"]))

    fields = {f: row.get(f) for f in TrialResult.__dataclass_fields__}
    fields = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in fields.items()}
    fields |= {"latency": stats(""), "baseline_latency": stats("baseline_"), "artifact_files": None}
    fields["environment"] = Environment(
        node_id=row.get("node_id") or "", hostname=row.get("hostname") or "", cpu_model=row.get("cpu_model") or "",
        device=row.get("device") or "cpu", versions={d: row.get(f"{d}_version") or "" for d in VERSIONED_PACKAGES},
    )  # fmt: skip
    for column in ("eval_samples", "discordant_worse", "discordant_better", "size_bytes", "baseline_size_bytes",
                   "num_threads", "batch_size", "subset_samples", "attempt", "concurrent_timings"):  # fmt: skip
        if fields.get(column) is not None:
            fields[column] = int(fields[column])
    return TrialResult(**fields)


@dataclass
class ReferenceRun:
    """What measuring the reference needs: the space, the task, a scratch study and its figures."""

    space: Space
    task_ref: TaskRef
    study: RunningStudy
    held_out: HeldOut

    @classmethod
    def open(cls, space: Space, task_ref: TaskRef, scratch: Path) -> ReferenceRun:
        """Start the embedded Ray, measure the FP32 baseline and rank the layers (as ``run_sweep`` does)."""
        from sweeper.cluster import connect

        connect(None)
        study_dir = study_folder.prepare(scratch, "reference", resume=False)
        _, baseline = study_info(study_dir, space, task_ref, "reference", force=False)
        rankings = study_rankings(space, task_ref, study_dir, dict(first_params(space)), ignore)
        study = RunningStudy(space=space, study_name="reference", study_dir=study_dir, task_ref=task_ref,
                             baseline=baseline, emit=ignore, rankings=rankings)  # fmt: skip
        return cls(space, task_ref, study, HeldOut(task_ref, space.measure.eval_batch_size))

    def measure(self, proposals: list[Proposal], first_number: int, label: str) -> list[dict[str, Any]]:
        """Run one trial per proposal, one at a time; return one row per trial."""
        dispatcher = Dispatcher(self.space, max_concurrent=1)
        rows = []
        for i, proposal in enumerate(proposals):
            spec: TrialSpec = self.study.spec(first_number + i, proposal.backend, proposal.params)
            dispatcher.submit(spec, proposal)
            done: list[Any] = []
            while not done:
                done = dispatcher.wait()
            _, _, result = done[0]
            row = {
                "measurement": label, "config_key": proposal.key, "trial_number": spec.trial_number,
                "optuna_params_json": json.dumps(proposal.optuna_params, sort_keys=True),
                "params_json": json.dumps(proposal.params, sort_keys=True, default=list), **_stored(result),
            }  # fmt: skip
            if result.artifact_files and result.artifact_name:
                row |= self.held_out.score(result.artifact_files, result.artifact_name)
            rows.append(row)
            print(f"  [{label} {i + 1}/{len(proposals)}] {result.state} "
                  f"p50 {row.get('latency_ms_p50') or float('nan'):.4f} ms  {_short(proposal.optuna_params)}",
                  flush=True)  # fmt: skip
        return rows


def _short(optuna_params: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in optuna_params.items() if k != "backend")


def measure_reference(space: Space, task_ref: TaskRef, scratch: Path) -> tuple[pd.DataFrame, dict]:
    """Measure every configuration twice: pass ``reference`` in enumeration order, then pass
    ``confirm`` in a shuffled order; return the table and its metadata (baseline, rankings,
    counts, wall time of each pass)."""
    started = time.time()
    run = ReferenceRun.open(space, task_ref, scratch)
    proposals, combinations = enumerate_space(space, run.study.rankings)
    print(f"reference: {len(proposals)} distinct configurations ({combinations} parameter combinations), "
          "each measured twice", flush=True)  # fmt: skip
    setup_s = time.time() - started
    first = run.measure(proposals, 0, "reference")
    first_s = time.time() - started - setup_s
    shuffled = random.Random(CONFIRM_ORDER_SEED).sample(proposals, len(proposals))
    second = run.measure(shuffled, len(proposals), "confirm")
    meta = {
        "baseline": run.study.baseline.to_json(),
        "rankings": run.study.rankings,
        "distinct": len(proposals),
        "combinations": combinations,
        "setup_s": setup_s,
        "pass_s": [first_s, time.time() - started - setup_s - first_s],
        "wall_time_s": time.time() - started,
    }
    return pd.DataFrame(first + second), meta


def load_or_measure(
    space: Space, task_ref: TaskRef, scratch: Path, *, remeasure: bool
) -> tuple[pd.DataFrame, dict[str, Any], Path]:
    """The cached reference table of ``space`` (measured first when missing or ``remeasure``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = reference_path(space, task_ref)
    if path.is_file() and not remeasure:
        stored = pq.read_table(path)
        meta = json.loads(stored.schema.metadata[b"search_reference"])
        return stored.to_pandas(), meta, path
    table, meta = measure_reference(space, task_ref, scratch)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"search_reference": json.dumps(meta)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(arrow, tmp)
    tmp.replace(path)
    return table, meta, path
