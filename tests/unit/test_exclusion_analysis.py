"""Excluded layers reach the analysis and the report whatever the backend calls its exclusion field.

Regression: the analysis read only ``nodes_to_exclude`` (the ONNX backends' field), so a
torch_static_int8 study (``excluded_layers``) showed 0 exclusions in ``sensitivity_with_exclusions``
and in the report. The rows here are made by the real row builder (:func:`sweeper.rows.make_row`).
No Ray, no model: the figures are made up.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sweeper import analysis, report, results
from sweeper.rows import make_row
from sweeper.space import load_space
from sweeper.spec import FP32Baseline, LatencyStats, MeasureSettings, TaskRef, TrialResult, TrialSpec

STUDY = "torch-static"
BACKEND = "torch_static_int8"
SPACE = f"""task: digits_cnn
constraint: {{max_drop: 1.0, mode: absolute}}
backends:
  {BACKEND}:
    observer: [minmax, histogram]
"""
BASELINE = {"metric": 98.0, "metric_name": "top1_accuracy_pct", "higher_is_better": True, "size_bytes": 250_000}
# (excluded layers, accuracy drop, latency p50); max_drop 1.0, so trials 1 and 2 are feasible and
# trial 1 (features.0 excluded) is the best feasible.
TRIALS: list[tuple[tuple[str, ...], float, float]] = [
    ((), 1.5, 0.20),
    (("features.0",), 0.6, 0.25),
    (("classifier.3", "features.0"), 0.2, 0.30),
    (("classifier.3",), 1.2, 0.22),
]


def _latency(p50: float) -> LatencyStats:
    return LatencyStats(p50=p50, p90=p50, p99=p50, mean=p50, std=0.0, runs=20)


def _make_study(tmp_path: Path) -> Path:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    space = load_space(space_file)
    study_dir = tmp_path / STUDY
    results.write_study_info(study_dir, {"study": STUDY, "task": "digits_cnn", "space": SPACE, "baseline": BASELINE})
    for number, (excluded, drop, latency) in enumerate(TRIALS):
        spec = TrialSpec(
            study=STUDY, trial_number=number, task=TaskRef(name="digits_cnn", path="/nonexistent/digits_cnn.py"),
            backend=BACKEND, params={"observer": "minmax", "excluded_layers": list(excluded)},
            measure=MeasureSettings(), num_threads=1, artifact_dir=str(study_dir / "artifacts"),
        )  # fmt: skip
        result = TrialResult(
            state="complete", started_at=1.0e9, finished_at=1.0e9 + 1, accuracy=BASELINE["metric"] - drop,
            latency=_latency(latency), baseline_latency=_latency(0.5), size_bytes=70_000, num_threads=1, batch_size=1,
        )  # fmt: skip
        results.write_row(study_dir, make_row(space, spec, result, FP32Baseline.from_json(BASELINE)))
    pd.DataFrame({
        "backend": [BACKEND] * 3, "layer": ["features.0", "classifier.3", "features.3"],
        "op_type": ["Conv2d", "Linear", "Conv2d"], "metric_drop": [1.0, 0.5, 0.1],
        "output_error": [0.2, 0.1, 0.01], "rank": [1, 2, 3],
    }).to_parquet(study_dir / analysis.SENSITIVITY_FILE)  # fmt: skip
    return study_dir


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return _make_study(tmp_path)


def test_torch_static_int8_exclusions_are_joined_with_the_sensitivity(study: Path) -> None:
    df = results.load(study)
    assert [set(s) for s in analysis.excluded_layers(df)] == [set(excluded) for excluded, _, _ in TRIALS]
    sensitivity = analysis.load_sensitivity(study)
    assert sensitivity is not None
    joined = analysis.sensitivity_with_exclusions(sensitivity, df).set_index("layer")
    assert joined.loc["features.0", ["trials_excluding", "feasible_excluding"]].tolist() == [2, 2]
    assert joined.loc["classifier.3", ["trials_excluding", "feasible_excluding"]].tolist() == [2, 1]
    assert joined.loc["features.3", "trials_excluding"] == 0
    assert joined.loc["features.0", "median_accuracy_drop_excluding"] == pytest.approx(0.4)
    assert joined.loc["features.0", "median_accuracy_drop_including"] == pytest.approx(1.35)
    assert joined.loc["features.0", "best_feasible_latency_ms_p50_excluding"] == pytest.approx(0.25)
    assert bool(joined.loc["features.0", "excluded_in_best"])
    assert not bool(joined.loc["classifier.3", "excluded_in_best"])


def test_the_report_tables_show_the_torch_exclusions(study: Path) -> None:
    written = report.write_report(study)
    markdown = written.markdown.read_text()
    header = next(line for line in markdown.splitlines() if "trials_excluding" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(columns) and cells[columns.index("layer")] in ("features.0", "classifier.3"):
            rows[cells[columns.index("layer")]] = dict(zip(columns, cells, strict=True))
    assert rows["features.0"]["trials_excluding"] == "2" and rows["features.0"]["feasible_excluding"] == "2"
    assert rows["classifier.3"]["trials_excluding"] == "2" and rows["classifier.3"]["feasible_excluding"] == "1"
    assert rows["features.0"]["excluded_in_best"] == "True"
    page = written.html.read_text()
    assert "<td>features.0</td>" in page and "excluded_<wbr>in_<wbr>best" in page
