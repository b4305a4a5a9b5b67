"""Per-layer sensitivity: how much each layer alone costs, measured as Ray tasks.

For a backend that can leave layers in float (``Backend.exclusion_field``), the layers are its
exclusion units (:meth:`~sweeper.backends.Backend.exclusion_units`; for the ONNX backends a layer
with weights together with its activation, see :mod:`sweeper.backends.onnx.layers`). Each unit is
scored by quantizing *only that unit* (every other quantizable node excluded) and comparing the
model's outputs on the evaluation split with FP32: the task metric's drop, and the normalised
output error ``||y - y_fp32||^2 / ||y_fp32||^2`` (also as SQNR in dB). Units are ranked by output
error (the metric moves in coarse steps on small evaluation sets), most sensitive first.

A unit whose build or evaluation raises gets a row with its ``error``, ranks first (it is the one
to leave in float) and the ranking goes on. One Ray task scores one chunk of units; each chunk's
rows are written to Parquet as it arrives (atomically, in a ``.parts`` folder beside the cached
table), so a rerun after an interruption scores only the units without a row. The finished table
is cached per (task file, backend, config).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeper import __version__, results
from sweeper.analysis import SENSITIVITY_FILE
from sweeper.backends import get_backend
from sweeper.errors import SensitivityError, SweeperInputError
from sweeper.events import EventHandler, SensitivityProgress
from sweeper.exclusion import check_against_ranking
from sweeper.location import StudyPath, cache_dir, cache_key
from sweeper.measure import accuracy_drop
from sweeper.scoring import describe_error, list_layers, score_layers, sqnr_db
from sweeper.space import Space
from sweeper.spec import StudyInfo, TaskRef

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["task", "backend", "params_json", "layer", "module", "op_type", "members", "metric_fp32", "metric",
           "metric_drop", "output_error", "sqnr_db", "error", "rank", "full_metric_drop", "full_output_error"]
# Bump when what a layer is or what it is scored on changes, so cached tables of the old kind are
# not read back (3: scored on the trial part of the evaluation split, the held-out part unseen).
LAYOUT = 3


def cache_path(task_ref: TaskRef, backend: str, params: dict[str, Any]) -> Path:
    """Where the table for this (task file, backend, config) is cached."""
    task_hash = (
        hashlib.sha256(Path(task_ref.path).read_bytes()).hexdigest() if Path(task_ref.path).is_file() else task_ref.path
    )
    key = cache_key(
        task=task_ref.name, task_file=task_hash, backend=backend, params=params, version=__version__, layout=LAYOUT
    )
    return cache_dir("sensitivity") / f"{task_ref.name}-{backend}-{key}.parquet"


def parts_dir(cached: Path) -> Path:
    """The folder holding the rows of an unfinished table (one Parquet file per scored chunk)."""
    return cached.with_suffix(".parts")


def read_parts(parts: Path) -> pd.DataFrame | None:
    """The rows scored so far for an unfinished table, or ``None`` when there are none."""
    import pandas as pd

    files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).drop_duplicates("layer")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file; an existing file is kept (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another run wrote the same rows
    finally:
        os.unlink(tmp)


def _listing(
    task_ref: TaskRef,
    backend: str,
    params: dict[str, Any],
    parts: Path,
    ray_options: dict[str, Any],
    eval_batch_size: int,
    num_threads: int,
) -> dict[str, Any]:
    """The units and full-model figures: read back from ``parts`` or listed by a Ray task (and saved there)."""
    import ray

    saved, reference = parts / "layers.json", parts / "reference.npz"
    if saved.is_file() and reference.is_file():
        with np.load(reference) as arrays:
            return {**json.loads(saved.read_text()), "reference": dict(arrays)}
    remote = ray.remote(list_layers).options(**ray_options, max_retries=1)
    try:
        info = ray.get(remote.remote(task_ref, backend, params, eval_batch_size, num_threads))
    except ray.exceptions.RayError as exc:
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception) else exc
        raise SensitivityError(
            f"layer sensitivity of task '{task_ref.name}' for backend '{backend}' could not list the "
            f"model's layers: {describe_error(cause)}"
        ) from None
    def write_reference(tmp: Path) -> None:
        tmp.write_bytes(_npz(info["reference"]))

    def write_listing(tmp: Path) -> None:
        tmp.write_text(json.dumps({k: v for k, v in info.items() if k != "reference"}))

    _write_atomically(reference, write_reference)
    _write_atomically(saved, write_listing)
    return info


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stubs do not type arrays passed by keyword
    savez(buffer, **arrays)
    return buffer.getvalue()


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
    """Rank the backend's exclusion units for ``params`` (cached); most sensitive first.

    Runs on the connected Ray cluster: one task lists the units, then one task per chunk of
    ``chunk_size`` units scores them, ``ray_options`` placing each task. Rows already scored by
    an interrupted run of the same (task, backend, config) are read back, not scored again.

    Raises:
        SensitivityError: when the layers cannot be listed (the task or its export fails).
    """
    import pandas as pd

    cached = cache_path(task_ref, backend, params)
    if cached.is_file():
        table = pd.read_parquet(cached)
        if on_progress:
            on_progress(len(table), len(table))
        return table
    parts = parts_dir(cached)
    info = _listing(task_ref, backend, params, parts, ray_options, eval_batch_size, num_threads)
    units = {u["name"]: u for u in info["units"]}
    table_of = functools.partial(_rows, task_ref, backend, params, info)
    earlier = read_parts(parts)
    done = set() if earlier is None else set(earlier["layer"]) & set(units)
    if on_progress:
        on_progress(len(done), len(units))
    todo = [u for name, u in units.items() if name not in done]
    order = {name: i for i, name in enumerate(units)}
    chunks = _scored_chunks(task_ref, backend, params, todo, info, ray_options, chunk_size, eval_batch_size,
                            num_threads)  # fmt: skip
    with contextlib.closing(chunks):  # stopping early cancels the chunks still running
        for scored in chunks:
            part = table_of(scored)
            first = min(order[r["layer"]] for r in scored)
            _write_atomically(parts / f"part-{first:05d}.parquet", functools.partial(part.to_parquet, index=False))
            done.update(r["layer"] for r in scored)
            if on_progress:
                on_progress(len(done), len(units))
    table = rank_table(read_parts(parts) if units else table_of([]), list(units))
    _write_atomically(cached, lambda tmp: table.to_parquet(tmp, index=False))
    shutil.rmtree(parts, ignore_errors=True)
    return table


def _scored_chunks(
    task_ref: TaskRef, backend: str, params: dict[str, Any], todo: list[dict[str, Any]], info: dict[str, Any],
    ray_options: dict[str, Any], chunk_size: int, eval_batch_size: int, num_threads: int,
) -> Generator[list[dict[str, Any]], None, None]:
    """Score ``todo`` in Ray tasks of ``chunk_size`` units; yield each chunk's scores as it arrives
    (a chunk whose task died, even after retries, as NaN scores with the error)."""
    import ray

    remote = ray.remote(score_layers).options(**ray_options, max_retries=2)
    reference = ray.put(info["reference"]) if todo else None  # sent once, not once per chunk
    chunks = {}
    for i in range(0, len(todo), chunk_size):
        chunk = todo[i : i + chunk_size]
        ref = remote.remote(task_ref, backend, params, chunk, info["names"], eval_batch_size, num_threads, reference)
        chunks[ref] = chunk
    pending = list(chunks)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker or its node died, even after retries
                cause: BaseException = exc
                if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception):
                    cause = exc.cause
                error = describe_error(cause)
                yield [
                    {"layer": u["name"], "metric": math.nan, "output_error": math.nan, "error": error}
                    for u in chunks[ready[0]]
                ]
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def _rows(
    task_ref: TaskRef, backend: str, params: dict[str, Any], info: dict[str, Any], scored: list[dict[str, Any]]
) -> pd.DataFrame:
    """The table rows of ``scored`` units (``info``: what :func:`list_layers` returned)."""
    import pandas as pd

    units = {u["name"]: u for u in info["units"]}

    def drop(metric: float) -> float:
        return accuracy_drop(info["metric_fp32"], metric, higher_is_better=info["higher_is_better"])

    return pd.DataFrame(
        [
            {
                "task": task_ref.name,
                "backend": backend,
                "params_json": json.dumps(params, sort_keys=True, default=list),
                "layer": r["layer"],
                "module": units[r["layer"]]["module"],
                "op_type": units[r["layer"]]["op_type"],
                "members": list(units[r["layer"]]["members"]),
                "metric_fp32": info["metric_fp32"],
                "metric": r["metric"],
                "metric_drop": drop(r["metric"]),
                "output_error": r["output_error"],
                "sqnr_db": sqnr_db(r["output_error"]),
                "error": r["error"],
                "full_metric_drop": drop(info["full_metric"]),
                "full_output_error": info["full_error"],
            }
            for r in scored
        ],
        columns=[c for c in COLUMNS if c != "rank"],
    )


def rank_table(table: pd.DataFrame, model_order: list[str]) -> pd.DataFrame:
    """Sort ``table`` most sensitive first and number it: units that failed to score first, then
    by output error, then metric drop, then model order."""
    order = {name: i for i, name in enumerate(model_order)}
    table = table.assign(_failed=table["error"].notna(), _order=table["layer"].map(order))
    table = table.sort_values(
        ["_failed", "output_error", "metric_drop", "_order"], ascending=[False, False, False, True], na_position="last"
    )
    table = table.drop(columns=["_failed", "_order"]).reset_index(drop=True)
    table.insert(table.columns.get_loc("full_metric_drop"), "rank", range(1, len(table) + 1))
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
    if out.exists() and not out.is_dir():
        raise SweeperInputError(f"--out '{out}' is a file; give a folder (a study folder adds the table to its report)")
    if results.trials_dir(out).is_dir() or (out / "study.json").is_file():
        studied = StudyInfo.from_json(results.read_study_info(out) or {}).task
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

    if path.name == SENSITIVITY_FILE and path.is_file():
        kept = pd.read_parquet(path)
        if "backend" in kept.columns:
            kept = kept[~kept["backend"].isin(table["backend"].unique())]
            table = pd.concat([kept, table], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)


def study_rankings(
    space: Space, task_ref: TaskRef, study_dir: StudyPath, base_params: dict[str, dict[str, Any]], emit: EventHandler
) -> dict[str, list[str]]:
    """The sensitivity ranking of every backend that searches exclusion, for one study.

    The study's ``sensitivity.parquet`` is read when it exists (a resumed study keeps its ranking);
    otherwise each backend's layers are scored on the cluster (see :mod:`sweeper.sensitivity`,
    cached per machine) with ``base_params[backend]`` and the tables are written there.

    Raises:
        ConfigError: when a ``top_k`` or ``per_layer`` asks for more layers than the model has
            (besides the pinned ones), or an ``always``/``never`` pattern matches no layer.
        SensitivityError: when a backend's layers cannot be listed.
    """
    import pandas as pd

    if not space.exclusions:
        return {}
    path = study_dir / SENSITIVITY_FILE
    if path.is_file():
        table = pd.read_parquet(io.BytesIO(path.read_bytes()))
        rankings = {b: ranking(table[table["backend"] == b]) for b in space.exclusions}
        for backend, search in space.exclusions.items():
            check_against_ranking(space.path, backend, search, rankings[backend])
        return rankings
    tables = []
    for backend, search in space.exclusions.items():
        target = space.target_of(backend)
        params = {k: v for k, v in base_params[backend].items() if k != get_backend(backend).exclusion_field}
        table = run_sensitivity(
            task_ref,
            backend,
            params,
            ray_options=target.ray_options(),
            num_threads=target.num_cpus,
            eval_batch_size=space.measure.eval_batch_size,
            on_progress=functools.partial(_report_progress, emit, backend),
        )
        check_against_ranking(space.path, backend, search, ranking(table))
        tables.append(table)
    combined = pd.concat(tables, ignore_index=True)
    if isinstance(path, Path):
        _write_atomically(path, functools.partial(combined.to_parquet, index=False))
    else:  # an object store writes a whole object or nothing
        path.write_bytes(combined.to_parquet(index=False))
    return {b: ranking(combined[combined["backend"] == b]) for b in space.exclusions}


def _report_progress(emit: EventHandler, backend: str, done: int, total: int) -> None:
    emit(SensitivityProgress(backend=backend, done=done, total=total))
