"""Result rows: one Parquet file per trial, a fixed schema, and :func:`load` into pandas.

A study folder looks like::

    <out>/<study>/study.json                 what was swept (space, task, schema version)
    <out>/<study>/study.journal              the Optuna study (journal storage)
    <out>/<study>/trials/trial-000012.parquet  one row per finished trial
    <out>/<study>/artifacts/trial-000012/    the trial's saved model

Each row file is written to a temporary name and renamed, and an existing row is never
overwritten, so a crash never leaves half a file and a resumed study never duplicates a row.
The folder reads directly in DuckDB (``read_parquet('<study>/trials/*.parquet')``) and Polars.
A study may also live on object storage (``s3://...``, see :mod:`sweeper.location`): a row is
then one PUT, written after checking that its key is free.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sweeper.confirmed import attach
from sweeper.location import RemotePath, StudyPath, location
from sweeper.spec import VERSIONED_PACKAGES

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 3
# Versions whose studies this one resumes: versions 2 and 3 only added columns (older rows read them as missing).
RESUMABLE_SCHEMA_VERSIONS = (1, 2, 3)

_TS = pa.timestamp("us", tz="UTC")

# (name, type, meaning). Units are in the names; accuracy columns use the task metric's units
# (percent for top-1 accuracy), and accuracy_drop the constraint's mode (points or percent).
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("schema_version", pa.int32(), "version of this schema"),
    ("study", pa.string(), "study name"),
    ("trial_number", pa.int64(), "Optuna trial number, unique in the study"),
    ("state", pa.string(), "complete, failed or pruned"),
    ("task", pa.string(), "task name"),
    ("backend", pa.string(), "backend name"),
    ("params_json", pa.string(), "the backend config's values as JSON"),
    ("attempt", pa.int32(), "which attempt produced the row (Ray retries a trial whose worker or node died)"),
    ("target", pa.string(), "the space's hardware target the trial ran on"),
    ("started_at", _TS, "when the trial started (UTC)"),
    ("finished_at", _TS, "when the trial finished (UTC)"),
    ("duration_s", pa.float64(), "wall time of the trial in seconds"),
    ("metric_name", pa.string(), "the task metric"),
    ("accuracy_fp32", pa.float64(), "task metric of the FP32 model"),
    ("accuracy", pa.float64(), "task metric of the candidate"),
    ("accuracy_drop", pa.float64(), "FP32 metric minus candidate metric (sign follows the metric's direction)"),
    ("drop_mode", pa.string(), "absolute (metric units) or relative (percent of FP32)"),
    ("max_drop", pa.float64(), "the constraint: largest drop allowed"),
    ("feasible", pa.bool_(), "accuracy_drop <= max_drop"),
    (
        "subset_accuracy",
        pa.float64(),
        "candidate metric on a seeded, stratified share of the evaluation split (cheap-first evaluation)",
    ),
    ("subset_accuracy_fp32", pa.float64(), "FP32 metric on that share"),
    ("subset_samples", pa.int64(), "samples in that share"),
    ("eval_samples", pa.int64(), "evaluation samples the accuracy was measured on"),
    ("discordant_worse", pa.int64(), "evaluation samples FP32 classifies right and the candidate wrong (top-1 tasks)"),
    ("discordant_better", pa.int64(), "evaluation samples the candidate classifies right and FP32 wrong (top-1 tasks)"),
    ("accuracy_drop_low", pa.float64(), "lower end of the drop's 95 % interval (exact, from the discordant counts)"),
    ("accuracy_drop_high", pa.float64(), "upper end of the drop's 95 % interval"),
    ("excluded_layers", pa.list_(pa.string()), "layers left in float (the backend's exclusion field)"),
    ("n_excluded", pa.int32(), "number of excluded layers"),
    ("agreement", pa.float64(), "percent of evaluation samples with the FP32 model's top-1 class"),
    ("output_max_abs_error", pa.float64(), "largest absolute output difference from FP32"),
    ("latency_ms_p50", pa.float64(), "candidate latency per call, median"),
    ("latency_ms_p90", pa.float64(), "candidate latency per call, 90th percentile"),
    ("latency_ms_p99", pa.float64(), "candidate latency per call, 99th percentile"),
    ("latency_ms_mean", pa.float64(), "candidate latency per call, mean"),
    ("latency_ms_std", pa.float64(), "candidate latency per call, standard deviation"),
    ("latency_runs", pa.int64(), "timed calls of the candidate"),
    ("baseline_latency_ms_p50", pa.float64(), "FP32 baseline latency, median, timed interleaved with the candidate"),
    ("baseline_latency_ms_p90", pa.float64(), "FP32 baseline latency, 90th percentile"),
    ("speedup", pa.float64(), "baseline_latency_ms_p50 / latency_ms_p50"),
    ("baseline_runtime", pa.string(), "what the FP32 baseline ran on: pytorch (eager) or keras"),
    ("baseline_device", pa.string(), "the device the FP32 baseline was timed on: the candidate's (cpu, cuda)"),
    (
        "objective_value",
        pa.float64(),
        "what Optuna was told: a latency objective scaled by the same-trial baseline "
        "(candidate / baseline x the study's reference FP32 latency), so drift between trials cancels",
    ),
    ("fp32_fingerprint", pa.string(), "hash of the FP32 weights and evaluation data on the trial's node"),
    ("node_accuracy_fp32", pa.float64(), "FP32 metric measured on the trial's node (the drop uses accuracy_fp32)"),
    ("timing_wait_s", pa.float64(), "seconds the trial waited for the machine's timing lock"),
    ("concurrent_timings", pa.int32(), "other timed phases on the machine overlapping this one (0 by construction)"),
    ("size_bytes", pa.int64(), "bytes of the saved artifact"),
    ("baseline_size_bytes", pa.int64(), "bytes of the FP32 state dict"),
    ("num_threads", pa.int32(), "CPU threads the trial used"),
    ("batch_size", pa.int32(), "batch size of the latency calls"),
    ("device", pa.string(), "cpu or cuda"),
    ("node_id", pa.string(), "Ray node id"),
    ("hostname", pa.string(), "host name of the node"),
    ("cpu_model", pa.string(), "CPU model of the node"),
    *((f"{package}_version", pa.string(), f"version of {package} on the node") for package in VERSIONED_PACKAGES),
    ("error", pa.string(), "error text of a failed trial"),
    ("artifact_path", pa.string(), "where the trial saved its model"),
]

SCHEMA = pa.schema([pa.field(name, dtype, metadata={"doc": doc}) for name, dtype, doc in COLUMNS]).with_metadata(
    {"sweeper_schema_version": str(SCHEMA_VERSION)}
)
COLUMN_NAMES = [name for name, _, _ in COLUMNS]


def trials_dir(study_dir: StudyPath) -> StudyPath:
    return study_dir / "trials"


def row_path(study_dir: StudyPath, trial_number: int) -> StudyPath:
    return trials_dir(study_dir) / f"trial-{trial_number:06d}.parquet"


def write_row(study_dir: StudyPath, row: dict[str, Any]) -> StudyPath:
    """Write one trial's row atomically; refuse to overwrite an existing row.

    Raises:
        FileExistsError: when the trial already has a row.
        KeyError: when ``row`` has a key that is not a column.
    """
    unknown = set(row) - set(COLUMN_NAMES)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    full = {name: row.get(name) for name in COLUMN_NAMES}
    full["schema_version"] = SCHEMA_VERSION
    table = pa.Table.from_pylist([full], schema=SCHEMA)
    path = row_path(study_dir, int(row["trial_number"]))
    if path.exists():
        raise FileExistsError(f"trial {full['trial_number']} already has a row at {path}")
    if isinstance(path, RemotePath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path.write_bytes(sink.getvalue().to_pybytes())  # one PUT: never half an object
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.link(tmp, path)  # fails if a row appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)
    return path


def study_dirs(paths: str | StudyPath | Iterable[str | StudyPath]) -> list[StudyPath]:
    """Expand results folders (local paths or URIs) into study folders (those holding ``trials``)."""
    items = [paths] if isinstance(paths, str | Path | RemotePath) else list(paths)
    found: list[StudyPath] = []
    for item in items:
        path = location(item) if isinstance(item, str) else item
        if trials_dir(path).is_dir():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted((p.parent for p in path.glob("*/trials") if p.is_dir()), key=str))
        else:
            raise FileNotFoundError(f"results folder '{path}' does not exist")
    return found


def read_table(paths: str | StudyPath | Iterable[str | StudyPath]) -> pa.Table:
    """Read every row of the given studies as one Arrow table with the current schema."""
    files: list[Any] = [
        f for d in study_dirs(paths) for f in sorted(trials_dir(d).glob("trial-*.parquet"), key=str)
    ]
    if not files:
        return SCHEMA.empty_table()
    tables = [_conform(pq.read_table(_source(f))) for f in files]
    return pa.concat_tables(tables)


def _source(path: StudyPath) -> Any:
    return pa.BufferReader(path.read_bytes()) if isinstance(path, RemotePath) else path


def _conform(table: pa.Table) -> pa.Table:
    """Bring a row written by an older schema version to the current one (missing columns null)."""
    columns = []
    for field in SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def load(paths: str | StudyPath | Iterable[str | StudyPath]) -> pd.DataFrame:
    """Load one or more studies' rows into a pandas DataFrame, sorted by study and trial.

    ``paths`` may be a study folder, a results folder holding several studies, or a list of
    either; each a local path or an object-store URI (``s3://bucket/results/quickstart``). The fixed
    columns (:data:`COLUMNS`) come first, then the finalists' confirmed figures from the newest
    confirmation set (``confirmed_*``, see :mod:`sweeper.confirmed`; missing for other trials; absent
    when no study was confirmed),
    then each config field found in ``params_json`` as a typed ``param.<field>`` column
    (:func:`expand_params`).
    """
    import pandas as pd

    # Each study folder's rows meet its own confirmation set (two folders may share a study name).
    frames = [attach(read_table(d).to_pandas(), d) for d in study_dirs(paths)]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames or [SCHEMA.empty_table().to_pandas()])[0]
    df = df.sort_values(["study", "trial_number"], ignore_index=True)
    return expand_params(df)


PARAM_PREFIX = "param."


def expand_params(df: pd.DataFrame) -> pd.DataFrame:
    """Add one typed column ``param.<field>`` per config field found in ``params_json``.

    Columns are named by the backend config's field, so a field that several backends share
    (``per_channel``) is one column; a row whose backend lacks the field holds a missing value.
    Types follow the values: ``boolean``, ``Int64``, ``Float64``, ``str``; list values become
    tuples; a field whose values mix types stays ``object``.
    """
    import pandas as pd

    parsed = [json.loads(text) if isinstance(text, str) and text else {} for text in df["params_json"]]
    names = sorted({name for params in parsed for name in params})
    columns = {f"{PARAM_PREFIX}{name}": _typed([params.get(name) for params in parsed]) for name in names}
    if not columns:
        return df
    return pd.concat([df, pd.DataFrame(columns, index=df.index)], axis=1)


def _typed(values: list[Any]) -> Any:
    import pandas as pd

    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if kinds == {bool}:
        return pd.array(values, dtype="boolean")
    if kinds == {int}:
        return pd.array(values, dtype="Int64")
    if kinds and kinds <= {int, float}:
        return pd.array(values, dtype="Float64")
    if kinds == {str}:
        return pd.array(values, dtype="str")
    if kinds == {list}:
        return pd.array([tuple(v) if v is not None else None for v in values], dtype=object)
    return pd.array(values, dtype=object)


def write_study_info(study_dir: StudyPath, info: dict[str, Any]) -> None:
    """Write ``study.json`` (atomically: a rename locally, one PUT on object storage)."""
    text = json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2, default=str)
    if isinstance(study_dir, RemotePath):
        (study_dir / "study.json").write_text(text)
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    tmp = study_dir / ".study.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, study_dir / "study.json")


def read_study_info(study_dir: StudyPath) -> dict[str, Any] | None:
    """``study.json`` as written (:class:`~sweeper.spec.StudyInfo` reads it into its typed form)."""
    path = study_dir / "study.json"
    return json.loads(path.read_text()) if path.is_file() else None
