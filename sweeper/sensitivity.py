"""Per-layer sensitivity: how much each quantizable layer alone costs, measured as Ray tasks.

For a backend that can leave layers in float (``Backend.exclusion_field``), each layer is scored
by quantizing *only that layer* (every other quantizable layer excluded) and comparing the model's
outputs on the evaluation split with FP32: the task metric's drop, and the normalised output error
``||y - y_fp32||^2 / ||y_fp32||^2`` (also as SQNR in dB). Layers are ranked by output error (the
metric moves in coarse steps on small evaluation sets), most sensitive first. One Ray task scores
one chunk of layers; the table is cached per (task file, backend, config) and written as Parquet.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper.spec import TaskRef

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["task", "backend", "params_json", "layer", "op_type", "metric_fp32", "metric", "metric_drop",
           "output_error", "sqnr_db", "rank", "full_metric_drop", "full_output_error"]


def output_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Normalised squared error of ``outputs`` against ``reference`` (0 is identical)."""
    ref = reference.astype(np.float64)
    denom = float(np.sum(ref * ref)) or 1.0
    return float(np.sum((outputs.astype(np.float64) - ref) ** 2) / denom)


def sqnr_db(error: float) -> float:
    """Signal-to-quantization-noise ratio in dB from a normalised squared error."""
    return math.inf if error <= 0 else -10.0 * math.log10(error)


def _context(task_ref: TaskRef, eval_batch_size: int, num_threads: int, workdir: str) -> tuple[Any, Any]:
    import torch

    from sweeper.backends import BuildContext
    from sweeper.cache import cache_dir
    from sweeper.trial import prepare_baseline

    torch.set_num_threads(num_threads)
    baseline = prepare_baseline(task_ref, eval_batch_size)
    ctx = BuildContext(
        model=baseline.model, task=baseline.task, workdir=Path(workdir),
        cache_dir=cache_dir("models"), num_threads=num_threads,
    )
    return baseline, ctx


def _score(baseline: Any, ctx: Any, backend: str, params: dict[str, Any], eval_batch_size: int) -> tuple[float, float]:
    from sweeper.backends import get_backend
    from sweeper.trial import evaluate

    candidate = get_backend(backend).build(ctx, get_backend(backend).config(params))
    outputs, _ = evaluate(candidate.predict, baseline.task, eval_batch_size)
    return baseline.task.metric(outputs, baseline.labels), output_error(baseline.outputs, outputs)


def list_layers(task_ref: TaskRef, backend: str, params: dict[str, Any], eval_batch_size: int, num_threads: int) -> dict[str, Any]:
    """The quantizable layers, and the FP32 and fully quantized figures (a Ray task body)."""
    from sweeper.backends import get_backend

    with tempfile.TemporaryDirectory(prefix="sweeper-sensitivity-") as workdir:
        baseline, ctx = _context(task_ref, eval_batch_size, num_threads, workdir)
        layers = get_backend(backend).quantizable_layers(ctx, get_backend(backend).config(params))
        field = get_backend(backend).exclusion_field
        full_metric, full_error = _score(baseline, ctx, backend, {**params, field: ()}, eval_batch_size)
    return {"layers": layers, "metric_fp32": baseline.metric, "higher_is_better": baseline.task.higher_is_better,
            "full_metric": full_metric, "full_error": full_error}


def score_layers(
    task_ref: TaskRef, backend: str, params: dict[str, Any], names: list[str], all_names: list[str],
    eval_batch_size: int, num_threads: int,
) -> list[dict[str, Any]]:
    """Quantize each of ``names`` alone (all other layers excluded) and score it (a Ray task body)."""
    from sweeper.backends import get_backend

    field = get_backend(backend).exclusion_field
    scored = []
    with tempfile.TemporaryDirectory(prefix="sweeper-sensitivity-") as workdir:
        baseline, ctx = _context(task_ref, eval_batch_size, num_threads, workdir)
        for name in names:
            others = tuple(n for n in all_names if n != name)
            metric, error = _score(baseline, ctx, backend, {**params, field: others}, eval_batch_size)
            scored.append({"layer": name, "metric": metric, "output_error": error})
    return scored


def cache_path(task_ref: TaskRef, backend: str, params: dict[str, Any]) -> Path:
    """Where the table for this (task file, backend, config) is cached."""
    from sweeper import __version__
    from sweeper.cache import cache_dir, cache_key

    task_hash = hashlib.sha256(Path(task_ref.path).read_bytes()).hexdigest() if Path(task_ref.path).is_file() else task_ref.path
    key = cache_key(task=task_ref.name, task_file=task_hash, backend=backend, params=params, version=__version__)
    return cache_dir("sensitivity") / f"{task_ref.name}-{backend}-{key}.parquet"


def run_sensitivity(
    task_ref: TaskRef,
    backend: str,
    params: dict[str, Any],
    *,
    ray_options: dict[str, Any],
    num_threads: int,
    eval_batch_size: int = 256,
    chunk_size: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Rank the backend's quantizable layers for ``params`` (cached); most sensitive first.

    Runs on the connected Ray cluster: one task lists the layers, then one task per chunk of
    ``chunk_size`` layers scores them, ``ray_options`` placing each task.
    """
    import pandas as pd
    import ray

    from sweeper.measure import accuracy_drop

    params = {k: v for k, v in params.items()}
    cached = cache_path(task_ref, backend, params)
    if cached.is_file():
        table = pd.read_parquet(cached)
        if on_progress:
            on_progress(len(table), len(table))
        return table
    info = ray.get(ray.remote(list_layers).options(**ray_options).remote(task_ref, backend, params, eval_batch_size, num_threads))
    layers: list[tuple[str, str]] = [tuple(x) for x in info["layers"]]
    names = [name for name, _ in layers]
    score = ray.remote(score_layers).options(**ray_options, max_retries=2)
    pending = [
        score.remote(task_ref, backend, params, names[i : i + chunk_size], names, eval_batch_size, num_threads)
        for i in range(0, len(names), chunk_size)
    ]
    scored: list[dict[str, Any]] = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        scored.extend(ray.get(done[0]))
        if on_progress:
            on_progress(len(scored), len(names))

    def drop(metric: float) -> float:
        return accuracy_drop(info["metric_fp32"], metric, higher_is_better=info["higher_is_better"])

    op_types = dict(layers)
    table = pd.DataFrame(
        [{
            "task": task_ref.name, "backend": backend, "params_json": json.dumps(params, sort_keys=True, default=list),
            "layer": row["layer"], "op_type": op_types[row["layer"]], "metric_fp32": info["metric_fp32"],
            "metric": row["metric"], "metric_drop": drop(row["metric"]), "output_error": row["output_error"],
            "sqnr_db": sqnr_db(row["output_error"]), "full_metric_drop": drop(info["full_metric"]),
            "full_output_error": info["full_error"],
        } for row in scored],
    )
    order = {name: i for i, name in enumerate(names)}
    table["model_order"] = table["layer"].map(order)
    table = table.sort_values(["output_error", "metric_drop", "model_order"], ascending=[False, False, True])
    table = table.drop(columns="model_order").reset_index(drop=True)
    table.insert(table.columns.get_loc("full_metric_drop"), "rank", range(1, len(table) + 1))
    tmp = cached.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(cached)
    return table


def ranking(table: pd.DataFrame) -> list[str]:
    """Layer names, most sensitive first."""
    return table.sort_values("rank")["layer"].tolist()


def output_path(out: Path, task: str, backend: str) -> Path:
    """Where ``sweeper sensitivity --out OUT`` writes the table.

    A study folder (one holding ``trials/`` or ``study.json``) gets ``OUT/sensitivity.parquet``:
    the file its report shows and a resumed sweep's exclusion search reads. Any other folder gets
    ``OUT/TASK-BACKEND-sensitivity.parquet``.

    Raises:
        SweeperInputError: when ``out`` is a file, or a study of another task.
    """
    from sweeper import results
    from sweeper.analysis import SENSITIVITY_FILE
    from sweeper.errors import SweeperInputError

    if out.exists() and not out.is_dir():
        raise SweeperInputError(f"--out '{out}' is a file; give a folder (a study folder adds the table to its report)")
    if results.trials_dir(out).is_dir() or (out / "study.json").is_file():
        studied = (results.read_study_info(out) or {}).get("task")
        if studied not in (None, task):
            raise SweeperInputError(
                f"--out '{out}' is a study of task '{studied}', not '{task}'; give --task {studied}, "
                "or another --out folder"
            )
        return out / SENSITIVITY_FILE
    return out / f"{task}-{backend}-sensitivity.parquet"


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` atomically, making its folder; a study's table keeps the rows of
    the other backends and replaces this backend's."""
    import pandas as pd

    from sweeper.analysis import SENSITIVITY_FILE

    if path.name == SENSITIVITY_FILE and path.is_file():
        kept = pd.read_parquet(path)
        if "backend" in kept.columns:
            kept = kept[~kept["backend"].isin(table["backend"].unique())]
            table = pd.concat([kept, table], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
