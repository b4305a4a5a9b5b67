"""Subset-first sensitivity on a real local Ray with real ONNX Runtime (digits CNN): a layer the
subset places for certain keeps its subset figures, an uncertain one is scored on the whole split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sweeper.sensitivity import run_sensitivity
from sweeper.spec import TaskRef
from sweeper.triage import SubsetFirst

pytestmark = pytest.mark.integration

BACKEND = "onnxruntime_static_int8"
PARAMS = {"calibration_samples": 64}
# The trial part of digits' 360 evaluation samples: the other 120 are held out for confirmation.
DIGITS_EVAL_SAMPLES = 240


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(path))
    return path


def test_only_layers_the_subset_leaves_uncertain_are_scored_on_the_whole_split(
    ray_local, private_cache, digits_task_path: Path
) -> None:
    task_ref = TaskRef(name="digits_cnn", path=str(digits_task_path))
    settings = SubsetFirst(fraction=0.25, seed=0, top=1, resolve_points=1.0)
    progress: list[tuple[int, int]] = []
    table = run_sensitivity(task_ref, BACKEND, PARAMS, ray_options={"num_cpus": 1}, num_threads=1, subset=settings,
                            on_progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    whole = run_sensitivity(task_ref, BACKEND, PARAMS, ray_options={"num_cpus": 1}, num_threads=1).set_index("layer")

    assert len(table) == 5 and table["error"].isna().all()
    subset_n = int(table["subset_samples"].iloc[0])
    # Stratified: a quarter of each digit's samples, seeded.
    assert (table["subset_samples"] == subset_n).all() and 55 <= subset_n <= 65
    # The rule: with top=1, a layer is certain when its output error's upper bound is below the
    # largest lower bound (some other layer is surely more sensitive).
    cutoff = table["subset_output_error_low"].max()
    uncertain = table["subset_output_error_high"] >= cutoff
    assert table["rescored"].tolist() == uncertain.tolist()
    assert 1 <= table["rescored"].sum() < 5, table[["layer", "subset_output_error_low", "subset_output_error_high"]]

    certain, rescored = table[~table["rescored"]], table[table["rescored"]]
    # A certain layer keeps its subset figures ...
    assert (certain["eval_samples"] == subset_n).all()
    assert certain["output_error"].tolist() == certain["subset_output_error"].tolist()
    assert certain["metric_drop"].tolist() == certain["subset_metric_drop"].tolist()
    # ... an uncertain one has the figures of scoring it on the whole split (the subset's counts and
    # error sums plus the rest's).
    assert (rescored["eval_samples"] == DIGITS_EVAL_SAMPLES).all()
    full = whole.loc[rescored["layer"]]
    assert rescored["output_error"].tolist() == pytest.approx(full["output_error"].tolist(), rel=1e-9)
    assert rescored["metric"].tolist() == pytest.approx(full["metric"].tolist(), rel=1e-12)
    assert rescored["metric_drop"].tolist() == pytest.approx(full["metric_drop"].tolist(), abs=1e-9)
    assert (whole["eval_samples"] == DIGITS_EVAL_SAMPLES).all() and whole["subset_samples"].isna().all()
    # Progress counts the subset pass, then the re-scored layers only.
    n_again = int(table["rescored"].sum())
    assert progress[-1] == (5 + n_again, 5 + n_again) and (5, 5) in progress
    # The most sensitive layer of the whole-split ranking is the subset-first ranking's too.
    assert table["layer"].iloc[0] == whole["output_error"].idxmax()
    assert isinstance(table, pd.DataFrame) and table["rank"].tolist() == [1, 2, 3, 4, 5]
