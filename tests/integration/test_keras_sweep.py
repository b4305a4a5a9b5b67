"""A Keras model swept end to end: exported with tf2onnx, measured against Keras itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper import results
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration

KERAS_TASK = Path(__file__).resolve().parents[1] / "fixtures" / "tasks" / "digits_keras.py"


def test_a_keras_task_is_swept_against_its_keras_baseline(ray_local, write_space, tmp_path: Path) -> None:
    pytest.importorskip("tf2onnx", reason="the [tensorflow] extra is not installed")
    space = load_space(write_space(f"""
        task: {KERAS_TASK}
        trials: 3
        seed: 0
        constraint: {{max_drop: 1.0}}
        hardware: {{num_cpus: 1}}
        backends:
          onnxruntime_fp32: {{exporter: tf2onnx}}
          onnxruntime_static_int8: {{exporter: tf2onnx, calibration_samples: [32, 64]}}
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"))
    df = results.load(summary.study_dir)
    assert len(df) == 3 and set(df["state"]) == {"complete"}, df[["backend", "error"]].to_string()
    assert set(df["baseline_runtime"]) == {"keras"}, "the FP32 baseline is the Keras model"
    assert (df["accuracy_fp32"] > 90).all() and (df["baseline_latency_ms_p50"] > 0).all()
    fp32 = df[df["backend"] == "onnxruntime_fp32"]
    assert (fp32["agreement"] == 100.0).all(), "ORT runs the tf2onnx export of the same model"
    info = results.read_study_info(summary.study_dir)
    assert info["baseline"]["runtime"] == "keras"
