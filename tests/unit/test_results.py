from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper import results


def _row(n: int, **extra) -> dict:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return {
        "study": "s",
        "trial_number": n,
        "state": "complete",
        "task": "digits_cnn",
        "backend": "onnxruntime_fp32",
        "params_json": '{"opset": 17}',
        "started_at": now,
        "finished_at": now,
        "duration_s": 1.5,
        "accuracy_fp32": 98.0,
        "accuracy": 97.5,
        "accuracy_drop": 0.5,
        "feasible": True,
        "latency_ms_p50": 0.25,
        "speedup": 2.0,
        "size_bytes": 1000,
        **extra,
    }


def test_round_trip_keeps_every_column_and_type(tmp_path: Path) -> None:
    results.write_row(tmp_path, _row(3))
    results.write_row(tmp_path, _row(1, state="failed", error="ValueError: boom", feasible=False))
    df = results.load(tmp_path)
    assert list(df.columns) == [*results.COLUMN_NAMES, "param.opset"], "params_json expands into param.<field>"
    assert df["trial_number"].tolist() == [1, 3]
    assert df.loc[0, "error"] == "ValueError: boom"
    assert df.loc[1, "latency_ms_p50"] == pytest.approx(0.25)
    assert df.loc[1, "schema_version"] == results.SCHEMA_VERSION
    assert isinstance(df.loc[1, "started_at"], pd.Timestamp) and str(df.loc[1, "started_at"].tz) == "UTC"
    assert pd.isna(df.loc[1, "agreement"])
    table = pq.read_table(results.row_path(tmp_path, 3))
    assert table.schema.field("latency_ms_p50").type == pa.float64()
    assert table.schema.metadata[b"sweeper_schema_version"] == str(results.SCHEMA_VERSION).encode()


def test_a_row_is_never_overwritten(tmp_path: Path) -> None:
    results.write_row(tmp_path, _row(7))
    with pytest.raises(FileExistsError, match="trial 7"):
        results.write_row(tmp_path, _row(7, accuracy=1.0))
    assert results.load(tmp_path)["accuracy"].tolist() == [97.5]
    assert not list(results.trials_dir(tmp_path).glob(".*")), "no temporary files are left behind"


def test_unknown_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="latency_p50"):
        results.write_row(tmp_path, _row(1, latency_p50=1.0))


def test_wrong_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        results.write_row(tmp_path, _row(1, size_bytes="big"))
    assert not results.row_path(tmp_path, 1).exists()


def test_load_several_studies_and_a_results_root(tmp_path: Path) -> None:
    results.write_row(tmp_path / "a", _row(0, study="a"))
    results.write_row(tmp_path / "b", _row(0, study="b"))
    results.write_row(tmp_path / "b", _row(1, study="b"))
    assert len(results.load(tmp_path)) == 3
    both = results.load([tmp_path / "a", tmp_path / "b"])
    assert both[["study", "trial_number"]].values.tolist() == [["a", 0], ["b", 0], ["b", 1]]


def test_an_older_row_without_new_columns_still_loads(tmp_path: Path) -> None:
    old = pa.table({"study": ["old"], "trial_number": [0], "state": ["complete"], "latency_ms_p50": [1.0]})
    results.trials_dir(tmp_path).mkdir(parents=True)
    pq.write_table(old, results.row_path(tmp_path, 0))
    df = results.load(tmp_path)
    assert df.loc[0, "latency_ms_p50"] == 1.0
    assert pd.isna(df.loc[0, "speedup"])
    assert list(df.columns) == results.COLUMN_NAMES


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.load(tmp_path / "nope")


def test_empty_study_loads_as_empty_frame_with_columns(tmp_path: Path) -> None:
    results.trials_dir(tmp_path).mkdir(parents=True)
    df = results.load(tmp_path)
    assert df.empty and list(df.columns) == results.COLUMN_NAMES
