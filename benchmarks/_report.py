"""Benchmark output: a Markdown table per model, and one Parquet file per run.

The Parquet file's first columns are exactly the sweep result schema
(:data:`sweeper.results.SCHEMA`: one row per model and method, ``trial_number`` numbering the
rows), so the same pandas/DuckDB code reads sweeps and benchmarks; :data:`EXTRA_COLUMNS` follow.
The PyTorch FP32 reference row has ``backend = "pytorch_fp32"``, which is not a registered backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _catalog import Model

from sweeper.results import SCHEMA, SCHEMA_VERSION

EXTRA_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("method", pa.string(), "the row's label in the table"),
    ("model_label", pa.string(), "the model's heading in the table"),
    ("latency_only", pa.bool_(), "random weights and synthetic inputs: no accuracy is claimed"),
    ("onnxruntime_fp32_latency_ms_p50", pa.float64(), "ONNX Runtime FP32 latency, median, from the same rounds"),
    ("speedup_vs_onnxruntime_fp32", pa.float64(), "onnxruntime_fp32_latency_ms_p50 / latency_ms_p50"),
    ("size_reduction", pa.float64(), "baseline_size_bytes / size_bytes"),
    ("eval_samples", pa.int64(), "evaluation samples behind accuracy and agreement"),
    ("build_s", pa.float64(), "seconds to build the candidate"),
    ("quick", pa.bool_(), "measured with --quick"),
    ("cpu_flags", pa.string(), "the CPU's relevant instruction-set flags"),
]  # fmt: skip
BENCHMARK_SCHEMA = pa.schema(
    [*SCHEMA, *(pa.field(n, t, metadata={"doc": d}) for n, t, d in EXTRA_COLUMNS)]
).with_metadata({"sweeper_schema_version": str(SCHEMA_VERSION)})


def write_outputs(out: Path, study: str, markdown: str, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``<out>/<study>.md`` and ``<out>/<study>.parquet``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, parquet = out / f"{study}.md", out / f"{study}.parquet"
    md.write_text(markdown)
    names = set(BENCHMARK_SCHEMA.names)
    records = []
    for number, row in enumerate(rows):
        record = {k: v for k, v in row.items() if k in names}
        record.update(schema_version=SCHEMA_VERSION, trial_number=number)
        records.append({name: record.get(name) for name in BENCHMARK_SCHEMA.names})
    pq.write_table(pa.Table.from_pylist(records, schema=BENCHMARK_SCHEMA), parquet)
    return [md, parquet]


def render_model_table(model: Model, rows: list[dict[str, Any]]) -> str:
    """One model's Markdown table: latency, both speedups, size, metric, drop, agreement."""
    latency_only = bool(rows and rows[0].get("latency_only"))
    base = rows[0] if rows else {}
    if latency_only:
        evaluated = "latency only: random weights, no accuracy claim"
    elif base.get("eval_samples"):
        evaluated = f"metric {_metric_name(model)} on {base['eval_samples']:,} evaluation samples"
    else:
        evaluated = "not evaluated"
    lines = [
        f"### {model.label}",
        "",
        f"Task `{model.key}`; batch {base.get('batch_size')}, {base.get('num_threads')} thread(s); {evaluated}.",
        "",
    ]
    head = ["Method", "p50 ms", "p90 ms", "vs PyTorch FP32", "vs ORT FP32", "Size MB", "Reduction"]
    if not latency_only:
        head += ["Metric", "Drop (pt)", "Agree %"]
    head.append("Note")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [
            row.get("method") or row["backend"],
            _num(row.get("latency_ms_p50"), "{:.2f}"),
            _num(row.get("latency_ms_p90"), "{:.2f}"),
            _num(row.get("speedup"), "{:.2f}x"),
            _num(row.get("speedup_vs_onnxruntime_fp32"), "{:.2f}x"),
            _num(row.get("size_bytes") and row["size_bytes"] / 1e6, "{:.1f}"),
            _num(row.get("size_reduction"), "{:.2f}x"),
        ]
        if not latency_only:
            cells += [
                _num(row.get("accuracy"), "{:.2f}"),
                _num(row.get("accuracy_drop"), "{:+.2f}"),
                _num(row.get("agreement"), "{:.1f}"),
            ]
        note = f"failed: {row['error']}" if row.get("error") else ""
        cells.append(note.replace("|", "/")[:300])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_name(model: Model) -> str:
    from sweeper.task import load_task

    return load_task(str(model.task_path)).metric_name


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)
