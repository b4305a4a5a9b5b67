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


def test_the_pruning_bound_keeps_a_candidate_that_may_be_within_the_budget(tmp_path: Path, digits_task_path: Path) -> None:
    # onnxruntime_fp32 predicts as FP32 does: no discordant sample, so no bound says its drop
    # exceeds even a zero budget, and the trial goes on to the whole split.
    spec = _spec(tmp_path, digits_task_path, backend="onnxruntime_fp32", params={},
                 early_stop_fraction=0.25, max_drop_points=0.0, subset_seed=3)
    result = run_trial(spec)
    assert result.state == "complete", result.error
    assert result.subset_samples == 60 and result.discordant_worse == 0  # a quarter of the 240 trial samples


def test_the_pruning_bound_prunes_when_the_budget_is_surely_exceeded(tmp_path: Path, digits_task_path: Path) -> None:
    # A budget of -20 points (the candidate would have to gain 20 points on FP32): 60 samples
    # with no discordant one bound the gain below about 6 points, so the trial is pruned.
    spec = _spec(tmp_path, digits_task_path, backend="onnxruntime_fp32", params={},
                 early_stop_fraction=0.25, max_drop_points=-20.0)
    result = run_trial(spec)
    assert result.state == "pruned" and result.latency is None
    # ...but not with a budget the same 60 samples cannot rule out (-2 points).
    spec = _spec(tmp_path, digits_task_path, backend="onnxruntime_fp32", params={},
                 early_stop_fraction=0.25, max_drop_points=-2.0)
    assert run_trial(spec).state == "complete"


def test_a_node_whose_fp32_model_differs_fails_with_the_fingerprints(tmp_path: Path, digits_task_path: Path) -> None:
    own = run_trial(_spec(tmp_path, digits_task_path, backend="onnxruntime_fp32", params={}))
    assert own.state == "complete" and own.fp32_fingerprint and own.node_accuracy_fp32 > 95.0
    assert own.baseline_device == "cpu"
    other = run_trial(_spec(tmp_path, digits_task_path, fp32_fingerprint="0123456789abcdef-0123456789abcdef"))
    assert other.state == "failed" and other.latency is None
    assert "FingerprintMismatchError" in other.error and own.fp32_fingerprint in other.error
    assert "0123456789abcdef-0123456789abcdef" in other.error


def test_predict_rows_keeps_the_order_of_the_rows_asked_for() -> None:
    import numpy as np

    from sweeper.measure import EvalData, predict_rows

    # Batches of different widths (as a text task's padded batches are) stay valid: rows are cut
    # out of each batch, never concatenated across batches.
    data = EvalData(batches=[{"x": np.arange(6).reshape(3, 2)}, {"x": np.arange(12).reshape(2, 6)}],
                    labels=np.array([0, 1, 0, 1, 0]))
    first = lambda batch: batch["x"][:, :1].astype(np.float32)  # noqa: E731
    assert predict_rows(first, data).ravel().tolist() == [0, 2, 4, 0, 6]
    assert predict_rows(first, data, np.array([1, 3, 4])).ravel().tolist() == [2, 0, 6]
    assert len(data.digest()) == 16 and data.digest() != EvalData(batches=data.batches, labels=1 - data.labels).digest()


@pytest.mark.gpu
def test_a_cuda_candidate_is_timed_against_fp32_on_the_same_gpu(tmp_path: Path, digits_task_path: Path) -> None:
    from sweeper.backends.torch.device import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    result = run_trial(_spec(tmp_path, digits_task_path, backend="torch_fp16", params={}, device="cuda"))
    assert result.state == "complete", result.error
    assert result.environment.device.startswith("cuda") and result.baseline_device.startswith("cuda")
    assert result.baseline_latency.p50 > 0 and result.latency.p50 > 0
    print(f"\ntorch_fp16 on {result.environment.device}: {result.latency.p50:.3f} ms vs FP32 on "
          f"{result.baseline_device} {result.baseline_latency.p50:.3f} ms (speedup {result.baseline_latency.p50 / result.latency.p50:.2f}x)")
