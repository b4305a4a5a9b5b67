"""Where ``sweeper sensitivity --out`` writes its table: the file a study's report reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from synthetic_study import STATIC, make_study

from sweeper import analysis, results
from sweeper.errors import SweeperInputError
from sweeper.sensitivity_table import output_path, write_table


def _table(backend: str, layers: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "task": "digits_cnn", "backend": backend, "layer": layers, "op_type": "Conv",
        "metric_drop": 0.5, "output_error": 0.1, "rank": range(1, len(layers) + 1),
    })  # fmt: skip


def test_a_study_folder_gets_the_file_its_report_reads(tmp_path: Path) -> None:
    study = make_study(tmp_path, sensitivity=False, journal=False)
    path = output_path(study, "digits_cnn", STATIC)
    assert path == study / analysis.SENSITIVITY_FILE
    write_table(_table(STATIC, ["conv1", "fc"]), path)
    assert analysis.load_sensitivity(study)["layer"].tolist() == ["conv1", "fc"]


def test_a_study_table_keeps_the_other_backends(tmp_path: Path) -> None:
    study = make_study(tmp_path, sensitivity=False, journal=False)
    path = output_path(study, "digits_cnn", STATIC)
    write_table(pd.concat([_table(STATIC, ["old"]), _table("torch_static_int8", ["conv1"])]), path)
    write_table(_table(STATIC, ["conv1", "fc"]), path)
    table = analysis.load_sensitivity(study)
    assert sorted(map(tuple, table[["backend", "layer"]].to_numpy())) == [
        (STATIC, "conv1"), (STATIC, "fc"), ("torch_static_int8", "conv1")
    ], "this backend's rows replaced, the other's kept"


def test_any_other_folder_gets_a_named_file(tmp_path: Path) -> None:
    assert output_path(tmp_path / "new", "digits_cnn", STATIC) == tmp_path / "new" / f"digits_cnn-{STATIC}-sensitivity.parquet"
    assert not (tmp_path / "new").exists(), "nothing is made before the table exists"


def test_another_tasks_study_or_a_file_is_refused(tmp_path: Path) -> None:
    study = make_study(tmp_path, sensitivity=False, journal=False)
    with pytest.raises(SweeperInputError, match="is a study of task 'digits_cnn', not 'segment_mlp'"):
        output_path(study, "segment_mlp", STATIC)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SweeperInputError, match="is a file"):
        output_path(blocker, "digits_cnn", STATIC)
    assert results.study_dirs(tmp_path) == [study]
