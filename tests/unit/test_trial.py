"""The trial runner in-process (no Ray): a real build on the digits task, measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.spec import MeasureSettings, TaskRef, TrialSpec
from sweeper.worker import run_trial

FAST = MeasureSettings(warmup_runs=1, min_runs=5, min_time_s=0.0)


def _spec(tmp_path: Path, digits_task_path: Path, **kw) -> TrialSpec:
    fields = dict(
        study="s", trial_number=0, task=TaskRef(name="digits_cnn", path=str(digits_task_path)),
        backend="onnxruntime_static_int8", params={"calibration_samples": 32}, measure=FAST,
        num_threads=1, artifact_dir=str(tmp_path / "artifact"),
    )
    return TrialSpec(**{**fields, **kw})


def test_a_complete_trial_measures_everything(tmp_path: Path, digits_task_path: Path) -> None:
    result = run_trial(_spec(tmp_path, digits_task_path))
    assert result.state == "complete", result.error
    assert result.accuracy >= 95.0 and result.agreement >= 97.0
    assert result.latency.runs >= 5 and result.baseline_latency.runs == result.latency.runs
    # The artifact travels home with the result (the driver writes it into the study folder).
    assert result.artifact_name == "model.onnx" and result.artifact_path is None
    assert result.size_bytes == sum(len(data) for data in result.artifact_files.values())
    assert result.subset_samples is None


def test_cheap_first_evaluation_prunes_beyond_the_threshold(tmp_path: Path, digits_task_path: Path) -> None:
    # Any drop (0 included) exceeds a threshold of -1: the trial stops after the subset.
    result = run_trial(_spec(tmp_path, digits_task_path, early_stop_fraction=0.25, prune_above_drop=-1.0))
    assert result.state == "pruned", result.error
    # A quarter of the trial part: the 360 evaluation samples less the 120 held out for confirmation.
    assert result.subset_samples == 60 and result.eval_samples is None
    assert result.subset_accuracy is not None and result.subset_accuracy_fp32 is not None
    assert result.accuracy is None and result.latency is None


def test_cheap_first_evaluation_goes_on_when_promising(tmp_path: Path, digits_task_path: Path) -> None:
    result = run_trial(_spec(tmp_path, digits_task_path, early_stop_fraction=0.25, prune_above_drop=5.0))
    assert result.state == "complete"
    assert result.subset_samples == 60 and result.accuracy is not None and result.latency is not None
    assert result.eval_samples == 240, "scored on the trial part only; the held-out third is never seen"


def test_a_failing_build_is_a_failed_result(tmp_path: Path, digits_task_path: Path) -> None:
    result = run_trial(_spec(tmp_path, digits_task_path, params={"nodes_to_exclude": ["/not/a/node"]}))
    assert result.state == "failed"
    assert "/not/a/node" in result.error
    assert result.environment is not None and result.environment.hostname


@pytest.mark.parametrize("backend", ["onnxruntime_static_int8", "onnxruntime_dynamic_int8"])
def test_quantizable_layers_are_what_exclusion_takes(tmp_path: Path, digits_task_path: Path, backend: str) -> None:
    from sweeper.backends import BuildContext, get_backend
    from sweeper.location import cache_dir
    from sweeper.worker import prepare_baseline

    baseline = prepare_baseline(TaskRef(name="digits_cnn", path=str(digits_task_path)), 256)
    ctx = BuildContext(model=baseline.model, task=baseline.task, workdir=tmp_path, cache_dir=cache_dir("models"), num_threads=1)
    impl = get_backend(backend)
    layers = impl.quantizable_layers(ctx, impl.config({}))
    assert layers and all(isinstance(n, str) and isinstance(op, str) for n, op in layers)
    excluded = (layers[0][0],)
    candidate = impl.build(ctx, impl.config({impl.exclusion_field: excluded}))
    assert candidate.predict(baseline.task.example_inputs(2)).shape == (2, 10)
