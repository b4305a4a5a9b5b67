"""study.json as a typed contract: StudyInfo round-trips through JSON in study.json's format, and a
study.json written before the type existed reads back into it."""

from __future__ import annotations

import json
from pathlib import Path

from sweeper import analysis, results
from sweeper.spec import Environment, FP32Baseline, StudyInfo

# A study.json as the sweeper of schema 1 wrote it (a quickstart study; the space text shortened).
EXISTING = """{
  "schema_version": 1,
  "study": "quickstart",
  "task": "digits_cnn",
  "task_path": "/home/me/sweeper/tasks/digits_cnn.py",
  "space_path": "/home/me/sweeper/search_spaces/quickstart.yaml",
  "space": "task: digits_cnn\\ntrials: 8\\nobjective: latency_ms_p90\\nconstraint: {max_drop: 1.0}\\n",
  "baseline": {
    "metric": 99.44444444444444,
    "metric_name": "top1_accuracy_pct",
    "higher_is_better": true,
    "size_bytes": 251297,
    "calibration_size": 360,
    "eval_samples": 360,
    "environment": {
      "node_id": "703053e2004a81a4505b5dee8d9173053fbbd65efd9fd43c3e295c5b",
      "hostname": "vm",
      "cpu_model": "AMD EPYC",
      "device": "cpu",
      "versions": {"torch": "2.14.1", "onnxruntime": "1.32.0", "optuna": "5.0.0", "ray": "2.60.0", "sweeper": "0.1.0"}
    }
  }
}
"""


def _info() -> StudyInfo:
    environment = Environment(node_id="n1", hostname="h", cpu_model="cpu", device="cpu", versions={"torch": "2.14"})
    baseline = FP32Baseline(metric=97.5, metric_name="top1_accuracy_pct", higher_is_better=True, size_bytes=1000,
                            calibration_size=64, eval_samples=128, environment=environment)  # fmt: skip
    return StudyInfo(study="s", task="digits_cnn", task_path="/t/digits_cnn.py", space_path="/s/space.yaml",
                     space="task: digits_cnn\n", baseline=baseline)  # fmt: skip


def test_study_info_round_trips_through_json(tmp_path: Path) -> None:
    info = _info()
    assert StudyInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    results.write_study_info(tmp_path, info.to_json())
    assert StudyInfo.from_json(results.read_study_info(tmp_path) or {}) == info


def test_an_existing_study_json_reads_into_study_info(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text(EXISTING)
    info = StudyInfo.from_json(results.read_study_info(tmp_path) or {})
    assert info.study == "quickstart" and info.task == "digits_cnn"
    assert info.baseline is not None and info.baseline.metric == 99.44444444444444
    assert info.baseline.calibration_size == 360 and info.baseline.higher_is_better is True
    assert info.baseline.environment is not None and info.baseline.environment.versions["ray"] == "2.60.0"
    # Written back, the file keeps its format: the same keys and values.
    assert {"schema_version": 1, **info.to_json()} == json.loads(EXISTING)
    settings = analysis.study_settings(tmp_path)
    assert settings.objective == "latency_ms_p90" and settings.baseline == info.baseline
