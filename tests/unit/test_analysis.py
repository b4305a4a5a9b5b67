from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_study import FEASIBLE_FRONT, FRONT, STATIC, TORCH, TRIALS, make_study

from sweeper import analysis, results
from sweeper.importance import param_importance


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def df(study: Path) -> pd.DataFrame:
    return results.load(study)


def test_load_expands_params_into_typed_columns(df: pd.DataFrame) -> None:
    assert list(df.columns[: len(results.COLUMN_NAMES)]) == results.COLUMN_NAMES, "fixed columns first"
    params = [c for c in df.columns if c.startswith("param.")]
    assert params == [
        "param.calibration_method", "param.calibration_samples", "param.nodes_to_exclude", "param.per_channel"
    ]
    assert str(df["param.calibration_samples"].dtype) == "Int64"
    assert str(df["param.per_channel"].dtype) == "boolean"
    assert pd.api.types.is_string_dtype(df["param.calibration_method"])
    assert df.loc[0, "param.nodes_to_exclude"] == ("conv1",) and df.loc[6, "param.nodes_to_exclude"] == ("conv1", "fc")
    torch_rows = df[df["backend"] == TORCH]
    assert torch_rows["param.calibration_samples"].isna().all(), "a field the backend lacks is missing, not 0"
    assert df.loc[0, "param.calibration_samples"] == 32 and bool(df.loc[1, "param.per_channel"]) is False


def test_several_studies_load_together_with_their_params(study: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    results.write_row(other, {"study": "other", "trial_number": 0, "state": "complete", "backend": "x",
                              "params_json": '{"opset": 17}'})
    both = results.load([study, other])
    assert len(both) == len(TRIALS) + 1
    assert both.loc[both["study"] == "other", "param.opset"].tolist() == [17]
    assert both.loc[both["study"] == "syn", "param.opset"].isna().all()


def test_duckdb_and_polars_read_the_folder_directly(study: Path, df: pd.DataFrame) -> None:
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    pattern = str(study / "trials" / "*.parquet")
    [(count,)] = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchall()
    lazy = pl.scan_parquet(pattern).select(pl.len()).collect().item()
    assert count == lazy == len(df) == len(TRIALS)


def test_best_feasible_skips_infeasible_and_failed(df: pd.DataFrame) -> None:
    best = analysis.best_feasible(df, k=3)
    assert best["trial_number"].tolist() == [0, 2, 6], "trial 3 is faster but infeasible"


def test_pareto_front_is_exactly_the_non_dominated_trials(df: pd.DataFrame) -> None:
    front = analysis.pareto_front(df)
    assert set(front["trial_number"]) == FRONT
    assert set(analysis.pareto_front(df, feasible_only=True)["trial_number"]) == FEASIBLE_FRONT
    done = df[df["state"] == "complete"]
    points = done[list(analysis.PARETO_OBJECTIVES)].to_numpy(dtype=float)
    on_front = done["trial_number"].isin(front["trial_number"]).to_numpy()
    for i, point in enumerate(points):
        dominators = (points <= point).all(axis=1) & (points < point).any(axis=1)
        assert dominators.any() != on_front[i], f"trial {done['trial_number'].iloc[i]}"
    two_d = analysis.pareto_front(df, ("latency_ms_p50", "accuracy_drop"))
    assert two_d["trial_number"].tolist() == [3, 0, 5, 8], "sorted by latency"


def test_dominated_agrees_with_brute_force_and_keeps_ties() -> None:
    rng = np.random.default_rng(0)
    points = rng.integers(0, 5, size=(60, 3)).astype(float)
    expected = [any((q <= p).all() and (q < p).any() for q in points) for p in points]
    assert analysis.dominated(points).tolist() == expected
    assert analysis.dominated(np.array([[1.0, 1.0], [1.0, 1.0]])).tolist() == [False, False]
    assert analysis.dominated(np.zeros((0, 3))).tolist() == []


def test_backend_summary(df: pd.DataFrame) -> None:
    table = analysis.backend_summary(df).set_index("backend")
    assert table.index.tolist() == [STATIC, TORCH], "sorted by best feasible latency"
    assert table.loc[STATIC, ["trials", "complete", "feasible"]].tolist() == [8, 8, 7]
    assert table.loc[TORCH, ["trials", "complete", "failed", "feasible"]].tolist() == [4, 3, 1, 3]
    assert table.loc[STATIC, "best_feasible_latency_ms_p50"] == pytest.approx(0.20)
    assert table.loc[TORCH, "median_latency_ms_p50"] == pytest.approx(0.41)


def test_sensitivity_joined_with_exclusion_results(study: Path, df: pd.DataFrame) -> None:
    sens = analysis.load_sensitivity(study)
    assert sens is not None and sens["layer"].tolist() == ["conv1", "fc", "conv2"], "by rank"
    joined = analysis.sensitivity_with_exclusions(sens, df).set_index("layer")
    assert joined.loc["conv1", ["trials_excluding", "feasible_excluding"]].tolist() == [3, 3]
    assert joined.loc["conv1", "median_accuracy_drop_excluding"] == pytest.approx(0.3)
    assert joined.loc["conv1", "median_accuracy_drop_including"] == pytest.approx(0.2)
    assert joined.loc["conv1", "best_feasible_latency_ms_p50_excluding"] == pytest.approx(0.20)
    assert bool(joined.loc["conv1", "excluded_in_best"]) and not bool(joined.loc["fc", "excluded_in_best"])
    assert joined.loc["fc", ["trials_excluding", "feasible_excluding"]].tolist() == [2, 1]
    assert joined.loc["conv2", "trials_excluding"] == 0
    assert pd.isna(joined.loc["conv2", "median_accuracy_drop_excluding"])
    assert joined.loc["conv1", "config_json"], "extra columns of the table are kept"


def test_sensitivity_absent_or_malformed(tmp_path: Path) -> None:
    bare = make_study(tmp_path / "a", sensitivity=False, journal=False)
    assert analysis.load_sensitivity(bare) is None
    pd.DataFrame({"layer": ["x"], "metric_drop": [1.0]}).to_parquet(bare / analysis.SENSITIVITY_FILE)
    with pytest.raises(ValueError, match="op_type"):
        analysis.load_sensitivity(bare)


def test_importance_per_backend_from_the_stored_study(study: Path) -> None:
    result = param_importance(study)
    static = result.table[result.table["scope"] == STATIC].set_index("param")["importance"]
    assert static.idxmax() == f"{STATIC}.calibration_method", static.to_dict()
    assert static.sum() == pytest.approx(1.0)
    overall = result.table[result.table["scope"] == "all"]
    assert "backend" in set(overall["param"]) and f"{STATIC}.per_channel" in set(overall["param"])
    assert overall["trials"].iloc[0] == 11, "failed trials are left out"
    assert any(note.startswith(f"{TORCH}: 3 complete trials") for note in result.notes)


def test_importance_skips_what_cannot_be_ranked(study: Path) -> None:
    drops = param_importance(study, target="accuracy_drop", min_trials=2)
    assert set(drops.table["scope"]) == {"all", STATIC}
    assert any(f"{TORCH}: no parameter took more than one value" in note for note in drops.notes)
    with pytest.raises(FileNotFoundError, match="journal"):
        param_importance(study.parent / "missing")


def test_higher_is_better_objectives_are_maximised(df: pd.DataFrame) -> None:
    assert analysis.maximised("speedup") and analysis.maximised("agreement") and analysis.maximised("accuracy")
    assert not analysis.maximised("accuracy", metric_higher_is_better=False)
    assert not analysis.maximised("latency_ms_p50") and not analysis.maximised("size_bytes")
    fastest = analysis.best_feasible(df, "speedup", k=3)
    assert fastest["trial_number"].tolist() == [0, 2, 6], "largest speedup first, never the slowest trial"
    assert analysis.best_feasible(df, "accuracy", k=1)["trial_number"].tolist() == [4], "drop 0.0, the earliest"
    assert analysis.best_feasible(df, "speedup", k=1, maximise=False)["trial_number"].tolist() == [4]
    table = analysis.backend_summary(df, "speedup").set_index("backend")
    assert table.index.tolist() == [STATIC, TORCH], "best (largest) speedup first"
    assert table.loc[STATIC, "best_feasible_speedup"] == pytest.approx(2.5)


def test_sensitivity_join_ranks_by_the_objective_direction(study: Path, df: pd.DataFrame) -> None:
    sens = analysis.load_sensitivity(study)
    joined = analysis.sensitivity_with_exclusions(sens, df, "speedup").set_index("layer")
    assert joined.loc["conv1", "best_feasible_speedup_excluding"] == pytest.approx(2.5)
