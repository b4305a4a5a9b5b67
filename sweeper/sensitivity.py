"""Per-layer sensitivity: how much each layer alone costs, measured as Ray tasks.

For a backend that can leave layers in float (``Backend.exclusion_field``), the layers are its
exclusion units (:meth:`~sweeper.backends.Backend.exclusion_units`; for the ONNX backends a layer
with weights together with its activation, see :mod:`sweeper.backends.onnx.layers`). Each unit is
scored by quantizing *only that unit* (every other quantizable node excluded; calibration ranges
are computed once and reused by every single-unit model) and comparing the model's outputs with
FP32: the task metric's drop, and the normalised output error ``||y - y_fp32||^2 / ||y_fp32||^2``
(also as SQNR in dB). Units are ranked by output error (the metric moves in coarse steps on small
evaluation sets), most sensitive first.

With a :class:`~sweeper.triage.SubsetFirst` (the CLI and a study pass one), every unit is first
scored on a seeded subset of the evaluation split, and only the units whose place at the top of
the ranking the subset leaves uncertain are scored on the whole split (see :mod:`sweeper.triage`):
for a top-1 task on the rest of it, the counts and error sums of the two parts added up
(:func:`~sweeper.sensitivity_table.merge_scores`); without a subset, every unit is scored on the
whole split.

A unit whose build or evaluation raises gets a row with its ``error``, ranks first (it is the one
to leave in float) and the ranking goes on. One Ray task scores one chunk of units; each chunk's
scores are written to Parquet as they arrive (atomically, in a ``.parts`` folder beside the cached
table: ``part-*`` for the first pass, ``full-*`` for the units scored again), so a rerun after an
interruption scores only what has no row yet. The finished table (:mod:`sweeper.sensitivity_table`)
is cached per (task file, backend, config, subset settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from sweeper import __version__
from sweeper.analysis import SENSITIVITY_FILE
from sweeper.backends import get_backend
from sweeper.errors import SensitivityError
from sweeper.events import EventHandler, SensitivityProgress
from sweeper.exclusion import check_against_ranking
from sweeper.location import StudyPath, cache_dir, cache_key
from sweeper.measure import DropCounts
from sweeper.scoring import describe_error, list_layers, score_layers
from sweeper.sensitivity_table import SCORE_COLUMNS, merge_scores, rank_table, ranking, table_rows
from sweeper.space import Space
from sweeper.spec import TaskRef
from sweeper.triage import SubsetFirst, SubsetScore, subset_rows, to_rescore

if TYPE_CHECKING:
    import pandas as pd

# A deep exclusion ladder (top_k up to 40, say) needs the order of its first layers most: past these,
# each layer costs little alone and the subset's order stands (see sweeper.triage).
STUDY_CONFIRM_TOP = 16
# Bump when what a layer is or what it is scored on changes, so cached tables of the old kind are
# not read back (4: scored subset-first, on the trial part of the evaluation split only; 5: ONNX
# Runtime sessions no longer quantize the float layers after a quantized one, see
# sweeper.backends.onnx.runtime.DISABLED_OPTIMIZERS; 6: "same"-padded convolutions are layers of
# the FX backends, and padded tasks are scored on cut batches, see sweeper.scoring._predict).
LAYOUT = 6


def cache_path(task_ref: TaskRef, backend: str, params: dict[str, Any], subset: SubsetFirst | None = None) -> Path:
    """Where the table for this (task file, backend, config, subset settings) is cached."""
    task_hash = (
        hashlib.sha256(Path(task_ref.path).read_bytes()).hexdigest() if Path(task_ref.path).is_file() else task_ref.path
    )
    key = cache_key(
        task=task_ref.name, task_file=task_hash, backend=backend, params=params, version=__version__, layout=LAYOUT,
        subset=None if subset is None else dataclasses.asdict(subset),
    )
    return cache_dir("sensitivity") / f"{task_ref.name}-{backend}-{key}.parquet"


def parts_dir(cached: Path) -> Path:
    """The folder holding the rows of an unfinished table (one Parquet file per scored chunk)."""
    return cached.with_suffix(".parts")


def read_parts(parts: Path, prefix: str = "part") -> pd.DataFrame | None:
    """The scores written so far for an unfinished table (``prefix``: ``part`` for the first pass,
    ``full`` for the units scored again), or ``None`` when there are none."""
    import pandas as pd

    files = sorted(parts.glob(f"{prefix}-*.parquet")) if parts.is_dir() else []
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
    subset: SubsetFirst | None = None,
) -> pd.DataFrame:
    """Rank the backend's exclusion units for ``params`` (cached); most sensitive first.

    Runs on the connected Ray cluster: one task lists the units, then one task per chunk of
    ``chunk_size`` units scores them, ``ray_options`` placing each task. With ``subset``, every
    unit is scored on a subset of the evaluation split first and the uncertain ones again on the
    whole split (:mod:`sweeper.triage`); ``on_progress(done, total)`` then counts both passes.
    Scores already written by an interrupted run of the same (task, backend, config, subset) are
    read back, not scored again.

    Raises:
        SensitivityError: when the layers cannot be listed (the task or its export fails).
    """
    import pandas as pd

    cached = cache_path(task_ref, backend, params, subset)
    if cached.is_file():
        table = pd.read_parquet(cached)
        if on_progress:
            on_progress(len(table), len(table))
        return table
    parts = parts_dir(cached)
    info = _listing(task_ref, backend, params, parts, ray_options, eval_batch_size, num_threads)
    units = [u["name"] for u in info["units"]]
    scoring = _Scoring(task_ref, backend, params, info, parts, ray_options, chunk_size, eval_batch_size, num_threads,
                       on_progress)  # fmt: skip
    rows = None if subset is None else subset_rows(info["reference"]["labels"], subset, stratify=info["top1"])
    first = scoring.run("part", units, rows, offset=0, total=len(units))
    again = None
    if subset is not None and rows is not None:
        chosen = set(to_rescore(subset_scores(first, units, subset.confidence), subset))
        names = [name for name in units if name in chosen]
        # A top-1 task's scores add up over disjoint samples: the rest of the split completes the subset.
        rest = np.setdiff1d(np.arange(len(info["reference"]["labels"])), rows) if info["top1"] else None
        again = scoring.run("full", names, rest, offset=len(units), total=len(units) + len(names))
        if rest is not None:
            again = merge_scores(first, again)
    confidence = 0.95 if subset is None else subset.confidence
    table = rank_table(table_rows(task_ref, backend, params, info, first, again, confidence), units)
    _write_atomically(cached, lambda tmp: table.to_parquet(tmp, index=False))
    shutil.rmtree(parts, ignore_errors=True)
    return table


def subset_scores(first: pd.DataFrame, units: list[str], confidence: float) -> list[SubsetScore]:
    """What the first pass's scores say about each unit, in ``units`` order."""
    by_layer = {r["layer"]: r for r in first.to_dict("records")}
    scores = []
    for name in units:
        r = by_layer[name]
        failed = isinstance(r["error"], str)
        counts = None if failed or math.isnan(r["worse"]) else DropCounts(
            n=int(r["samples"]), worse=int(r["worse"]), better=int(r["better"])
        )
        scores.append(SubsetScore(layer=name, output_error_low=r["output_error_low"],
                                  output_error_high=r["output_error_high"], counts=counts, failed=failed))  # fmt: skip
    return scores


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """One sensitivity run's scoring passes: what every chunk's Ray task is given."""

    task_ref: TaskRef
    backend: str
    params: dict[str, Any]
    info: dict[str, Any]
    parts: Path
    ray_options: dict[str, Any]
    chunk_size: int
    eval_batch_size: int
    num_threads: int
    on_progress: Callable[[int, int], None] | None

    def run(self, prefix: str, names: list[str], rows: np.ndarray | None, *, offset: int, total: int) -> pd.DataFrame:
        """Score the units ``names`` (on the evaluation split's ``rows``, or all of it) that have no
        ``prefix`` part yet; return every score of ``names`` written under ``prefix``."""

        earlier = read_parts(self.parts, prefix)
        done = set() if earlier is None else set(earlier["layer"]) & set(names)
        self._progress(offset + len(done), total)
        order = {name: i for i, name in enumerate(names)}
        todo = [u for u in self.info["units"] if u["name"] in order and u["name"] not in done]
        chunks = _scored_chunks(self, todo, rows)
        with contextlib.closing(chunks):  # stopping early cancels the chunks still running
            for scored in chunks:
                part = _score_frame(scored)
                first = min(order[r["layer"]] for r in scored)
                path = self.parts / f"{prefix}-{first:05d}.parquet"
                _write_atomically(path, functools.partial(part.to_parquet, index=False))
                done.update(r["layer"] for r in scored)
                self._progress(offset + len(done), total)
        written = read_parts(self.parts, prefix)
        if written is None:
            return _score_frame([])
        return written[written["layer"].isin(order)].reset_index(drop=True)

    def _progress(self, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(done, total)


def _score_frame(scored: list[dict[str, Any]]) -> pd.DataFrame:
    """Scores as a frame of :data:`SCORE_COLUMNS`, numbers as floats (a failed unit's are NaN)."""
    import pandas as pd

    frame = pd.DataFrame(scored, columns=SCORE_COLUMNS)
    numbers = [c for c in SCORE_COLUMNS if c not in ("layer", "error")]
    frame[numbers] = frame[numbers].apply(pd.to_numeric, errors="coerce").astype("float64")
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    return frame


def _scored_chunks(
    scoring: _Scoring, todo: list[dict[str, Any]], rows: np.ndarray | None
) -> Generator[list[dict[str, Any]], None, None]:
    """Score ``todo`` in Ray tasks of ``scoring.chunk_size`` units; yield each chunk's scores as it
    arrives (a chunk whose task died, even after retries, as NaN scores with the error)."""
    import ray

    remote = ray.remote(score_layers).options(**scoring.ray_options, max_retries=2)
    reference = ray.put(scoring.info["reference"]) if todo else None  # sent once, not once per chunk
    chunks = {}
    for i in range(0, len(todo), scoring.chunk_size):
        chunk = todo[i : i + scoring.chunk_size]
        ref = remote.remote(scoring.task_ref, scoring.backend, scoring.params, chunk, scoring.info["names"],
                            scoring.eval_batch_size, scoring.num_threads, reference, rows)  # fmt: skip
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
            subset=study_subset(space, search.candidates),
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


def study_subset(space: Space, candidates: int) -> SubsetFirst:
    """The subset-first settings of a study's ranking: whole-split figures for the layers that
    could be among the ``candidates`` most sensitive its exclusion search can reach, at most
    :data:`STUDY_CONFIRM_TOP` of them, and the budget as the drop that settles a layer (an absolute
    ``max_drop``; the default otherwise)."""
    top = max(1, min(candidates, STUDY_CONFIRM_TOP))
    constraint = space.constraint
    if constraint.mode == "absolute":
        return SubsetFirst(top=top, resolve_points=constraint.max_drop)
    return SubsetFirst(top=top)
