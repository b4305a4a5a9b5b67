"""Confirmed figures: the finalists' confirmation sets, stored beside the rows and joined onto them.

Trial rows are written once and never rewritten, so a confirmation is a file of its own, one row
per finalist::

    <out>/<study>/confirmations/confirmation-000001.parquet

A later confirmation (a resumed study that ran more trials) is a new file; the newest set wins
when :func:`attach` joins the ``confirmed_*`` columns onto the trial rows (``sweeper.load`` does).

:func:`rank` orders a set: confirmed-feasible finalists by confirmed median latency, those whose
latencies are within each other's noise (:func:`sweeper.measure.tied` over the per-round medians)
sharing a tie group, the simpler first inside a group (fewer excluded layers, then FP32 before
FP16 before INT8, then the smaller artifact); finalists that failed to confirm come last.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sweeper.location import RemotePath, StudyPath
from sweeper.measure import tied

if TYPE_CHECKING:
    import pandas as pd

CONFIRMED_VERSION = 1
_TS = pa.timestamp("us", tz="UTC")

# (name, type, meaning): figures in the units of the trial columns they confirm.
CONFIRMED_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("study", pa.string(), "study name"),
    ("trial_number", pa.int64(), "the finalist's trial"),
    ("confirmed_set", pa.int64(), "which confirmation of the study (the newest wins)"),
    ("confirmed_at", _TS, "when the confirmation finished (UTC)"),
    ("confirmed_split", pa.string(), "held_out (of the evaluation split), task (its own split) or evaluation"),
    ("confirmed_samples", pa.int64(), "samples of the confirmation split"),
    ("confirmed_accuracy_fp32", pa.float64(), "task metric of the FP32 model on the confirmation split"),
    ("confirmed_accuracy", pa.float64(), "task metric of the finalist on the confirmation split"),
    ("confirmed_accuracy_drop", pa.float64(), "FP32 minus finalist metric on that split (the study's drop mode)"),
    ("confirmed_accuracy_drop_low", pa.float64(), "lower end of the confirmed drop's 95 % interval"),
    ("confirmed_accuracy_drop_high", pa.float64(), "upper end of the confirmed drop's 95 % interval"),
    ("confirmed_feasible", pa.bool_(), "confirmed_accuracy_drop <= max_drop"),
    ("confirmed_latency_ms_p50", pa.float64(), "median latency, timed round-robin with the other finalists"),
    ("confirmed_latency_ms_p90", pa.float64(), "90th percentile latency in the same rounds"),
    ("confirmed_latency_runs", pa.int64(), "timed calls of the finalist"),
    ("confirmed_rounds", pa.int64(), "round-robin rounds"),
    ("confirmed_round_ms", pa.list_(pa.float64()), "the median latency of each round (the tie test's samples)"),
    ("confirmed_baseline_latency_ms_p50", pa.float64(), "FP32 baseline median latency in the same rounds"),
    ("confirmed_speedup", pa.float64(), "confirmed_baseline_latency_ms_p50 / confirmed_latency_ms_p50"),
    ("confirmed_rank", pa.int64(), "1 = the winner; tie groups first, simplest first inside a group"),
    ("confirmed_tie_group", pa.int64(), "finalists with the same number are tied within the timing noise"),
    ("confirmed_source", pa.string(), "artifact (the trial's saved model) or rebuilt"),
    ("confirmed_concurrent_timings", pa.int32(), "other timed phases on the machine overlapping this one"),
    ("confirmed_error", pa.string(), "why the finalist could not be confirmed"),
    ("confirmed_settings", pa.string(), "the confirmation's settings as JSON"),
]
CONFIRMED_SCHEMA = pa.schema(
    [pa.field(name, dtype, metadata={"doc": doc}) for name, dtype, doc in CONFIRMED_COLUMNS]
).with_metadata({"sweeper_confirmed_version": str(CONFIRMED_VERSION)})
CONFIRMED_NAMES = [name for name, _, _ in CONFIRMED_COLUMNS]
# The columns attach() adds to the trial rows (the join keys excluded).
JOINED = [name for name in CONFIRMED_NAMES if name.startswith("confirmed_")]


def confirmations_dir(study_dir: StudyPath) -> StudyPath:
    return study_dir / "confirmations"


def _set_path(study_dir: StudyPath, number: int) -> StudyPath:
    return confirmations_dir(study_dir) / f"confirmation-{number:06d}.parquet"


def _files(study_dir: StudyPath) -> list[Any]:
    folder = confirmations_dir(study_dir)
    return sorted(folder.glob("confirmation-*.parquet"), key=str) if folder.is_dir() else []


def write_set(study_dir: StudyPath, rows: Sequence[dict[str, Any]]) -> StudyPath:
    """Write a confirmation set as the study's next one, atomically; never overwrite a set.

    Raises:
        KeyError: when a row has a key that is not a confirmation column.
    """
    for row in rows:
        unknown = set(row) - set(CONFIRMED_NAMES)
        if unknown:
            raise KeyError(f"not confirmation columns: {sorted(unknown)}")
    number = len(_files(study_dir)) + 1
    while _set_path(study_dir, number).exists():
        number += 1
    table = pa.Table.from_pylist(
        [{**{name: row.get(name) for name in CONFIRMED_NAMES}, "confirmed_set": number} for row in rows],
        schema=CONFIRMED_SCHEMA,
    )
    path = _set_path(study_dir, number)
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
        os.link(tmp, path)  # fails if a set of that number appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)
    return path


def read_latest(study_dir: StudyPath) -> pa.Table | None:
    """The study's newest confirmation set, or ``None`` when it has none."""
    files = _files(study_dir)
    if not files:
        return None
    source = files[-1]
    table = pq.read_table(pa.BufferReader(source.read_bytes()) if isinstance(source, RemotePath) else source)
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in CONFIRMED_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=CONFIRMED_SCHEMA)


def attach(df: pd.DataFrame, study_dir: StudyPath) -> pd.DataFrame:
    """One study folder's trial rows with the ``confirmed_*`` columns of its newest set (missing
    values for trials that were not finalists). The rows of a study never confirmed come back
    unchanged, so they read exactly as before confirmation existed."""
    latest = read_latest(study_dir)
    if latest is None:
        return df
    confirmed = latest.to_pandas().drop(columns=["study"]).drop_duplicates("trial_number", keep="last")
    merged = df.merge(confirmed, on="trial_number", how="left", validate="many_to_one")
    return merged.set_axis(df.index)


def precision_rank(backend: str) -> int:
    """0 for an FP32 backend, 1 for FP16 (or autocast), 2 for INT8: how far from FP32 it strays."""
    if "int8" in backend:
        return 2
    if "fp16" in backend or "autocast" in backend:
        return 1
    return 0


def simplicity(row: dict[str, Any]) -> tuple[int, int, float]:
    """A finalist's place among equally fast ones, simplest first: fewer excluded layers, a
    precision nearer FP32 (:func:`precision_rank`), a smaller artifact."""
    excluded = row.get("n_excluded")
    size = row.get("size_bytes")
    return (
        int(excluded) if excluded == excluded and excluded is not None else 0,
        precision_rank(str(row.get("backend", ""))),
        float(size) if size == size and size is not None else float("inf"),
    )


def rank(rows: Sequence[dict[str, Any]], confidence: float = 0.95, margin: float = 0.0) -> list[dict[str, Any]]:
    """Each confirmation row with ``confirmed_rank`` and ``confirmed_tie_group``, in rank order.

    A row needs ``confirmed_feasible``, ``confirmed_latency_ms_p50``, ``confirmed_round_ms`` and,
    for the order inside a tie, ``backend``, ``n_excluded`` and ``size_bytes``. Groups form
    greedily: the fastest finalist not yet grouped leads a group of every remaining one tied with
    it (:func:`sweeper.measure.tied` over the two per-round medians, with ``margin``).
    """
    ok = sorted(
        (r for r in rows if r.get("confirmed_feasible") and r.get("confirmed_latency_ms_p50") is not None),
        key=lambda r: r["confirmed_latency_ms_p50"],
    )
    rest = sorted(
        (r for r in rows if not any(r is o for o in ok)),
        key=lambda r: (r.get("confirmed_latency_ms_p50") is None, r.get("confirmed_latency_ms_p50") or 0.0),
    )
    ordered: list[dict[str, Any]] = []
    group = 0
    while ok:
        group += 1
        leader = ok[0]
        lead = leader["confirmed_round_ms"]
        members = [r for r in ok if r is leader or tied(r["confirmed_round_ms"], lead, confidence, margin)]
        ok = [r for r in ok if not any(r is m for m in members)]
        ordered += [{**r, "confirmed_tie_group": group} for r in sorted(members, key=simplicity)]
    ordered += [{**r, "confirmed_tie_group": None} for r in rest]
    return [{**r, "confirmed_rank": i} for i, r in enumerate(ordered, start=1)]



def describe_split(split: str | None, samples: Any) -> str:
    """What the finalists were re-scored on, in words."""
    n = f"{int(samples)} " if samples is not None and samples == samples else ""
    if split == "task":
        return f"{n}samples of the task's confirmation split"
    if split == "evaluation":
        return f"{n}evaluation samples (the split is too small to hold any out; the trials saw them too)"
    return f"{n}held-out samples no trial saw"
