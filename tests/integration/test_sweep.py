from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from sweeper import results
from sweeper.events import Event, TrialFinished
from sweeper.space import load_space
from sweeper.study import SweepOptions, run_sweep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_TASKS = ROOT / "tests" / "fixtures" / "tasks"


def _journal_states(study_dir: Path, name: str) -> dict[int, str]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    study = optuna.load_study(study_name=name, storage=storage)
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_sweep_writes_one_honest_row_per_trial(ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space("""
        task: digits_cnn
        trials: 8
        seed: 1
        max_concurrent: 2
        constraint: {max_drop: 1.0}
        backends:
          onnxruntime_fp32: {}
          torch_dynamic_int8: {}
          onnxruntime_static_int8:
            calibration_method: [minmax, percentile]
            calibration_samples: {low: 16, high: 128, log: true}
            per_channel: [true, false]
    """))
    events: list[str] = []
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"), lambda event: events.append(event.kind))
    df = results.load(summary.study_dir)

    assert len(df) == 8 and df["trial_number"].is_unique, "exactly one row per trial"
    assert summary.rows_written == 8 and events.count("finished") == 8
    assert set(df["state"]) == {"complete"}, df[["backend", "error"]].to_string()
    assert df["backend"].nunique() >= 2
    info = results.read_study_info(summary.study_dir)
    fp32 = info["baseline"]["metric"]
    assert fp32 >= 95.0 and (df["accuracy_fp32"] == fp32).all()
    assert (df["accuracy_drop"] - (df["accuracy_fp32"] - df["accuracy"])).abs().max() < 1e-9
    assert (df["feasible"] == (df["accuracy_drop"] <= 1.0)).all()
    assert (df["speedup"] - df["baseline_latency_ms_p50"] / df["latency_ms_p50"]).abs().max() < 1e-9
    assert (df["latency_runs"] >= 20).all() and (df["latency_ms_p50"] > 0).all()
    assert ((df["latency_ms_p50"] <= df["latency_ms_p90"]) & (df["latency_ms_p90"] <= df["latency_ms_p99"])).all()
    assert (df["agreement"] > 50).all() and (df["num_threads"] == 1).all()
    for row in df.itertuples():
        artifact = Path(row.artifact_path)
        assert artifact.exists(), row.artifact_path
        assert row.size_bytes == (artifact.stat().st_size if artifact.is_file() else sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()))
        assert json.loads(row.params_json) is not None
        assert row.torch_version and row.onnxruntime_version and row.ray_version and row.node_id
    states = _journal_states(summary.study_dir, "space")
    # Every row's trial is in the journal; trials without a row are repeats, told the stored value.
    assert set(df["trial_number"]) <= set(states) and set(states.values()) == {"COMPLETE"}
    assert len(states) == 8 + summary.repeats
    int8 = df[df["backend"] == "onnxruntime_static_int8"]
    if not int8.empty:
        assert (int8["size_bytes"] < int8["baseline_size_bytes"]).all()


def test_a_failing_trial_is_a_failed_row_and_the_sweep_goes_on(ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space(f"""
        task: {FIXTURE_TASKS / 'digits_flaky_calibration.py'}
        trials: 6
        seed: 0
        constraint: {{max_drop: 1.0}}
        backends:
          onnxruntime_static_int8:
            calibration_samples: [32, 128]
            per_channel: [true, false]
          torch_dynamic_int8: {{engine: [x86, fbgemm]}}
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"))
    df = results.load(summary.study_dir)
    assert len(df) == 6 and df["trial_number"].is_unique
    samples = df["params_json"].map(lambda p: json.loads(p).get("calibration_samples"))
    failed = df[df["state"] == "failed"]
    assert not failed.empty and (df["state"] == "complete").any(), df[["backend", "state"]].to_string()
    assert (samples[df["state"] == "failed"] == 128).all(), "exactly the trials that read past sample 64 fail"
    assert (df.loc[samples == 128, "state"] == "failed").all()
    assert failed["error"].str.contains("OSError: calibration sample 65 is unreadable").all()
    assert not failed["feasible"].any() and failed["latency_ms_p50"].isna().all()
    states = _journal_states(summary.study_dir, "space")
    # Optuna ignores FAIL trials; a failed one is told PRUNED with a large violation (sweeper.study).
    assert set(failed["trial_number"]) <= {n for n, s in states.items() if s == "PRUNED"}


def test_a_hanging_trial_is_cancelled_after_the_timeout(ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space(f"""
        task: {FIXTURE_TASKS / 'digits_hanging_calibration.py'}
        trials: 4
        seed: 1
        trial_timeout_s: 20
        constraint: {{max_drop: 1.0}}
        backends:
          onnxruntime_static_int8:
            calibration_samples: [32, 128]
            per_channel: [true, false]
    """))
    summary = run_sweep(space, SweepOptions(out=tmp_path / "out"))
    df = results.load(summary.study_dir)
    assert len(df) == 4 and df["trial_number"].is_unique
    samples = df["params_json"].map(lambda p: json.loads(p)["calibration_samples"])
    hung = df[samples == 128]
    assert not hung.empty and (df.loc[samples == 32, "state"] == "complete").all()
    assert (hung["state"] == "failed").all()
    assert hung["error"].str.startswith("timed out: still running after trial_timeout_s=20 s").all()


def test_an_interrupted_sweep_resumes_without_duplicates(ray_local, write_space, tmp_path: Path) -> None:
    space = load_space(write_space("""
        task: digits_cnn
        trials: 8
        seed: 2
        max_concurrent: 2
        constraint: {max_drop: 1.0}
        backends:
          onnxruntime_fp32: {opset: {low: 14, high: 18}}
          torch_dynamic_int8: {engine: [x86, fbgemm]}
          onnxruntime_dynamic_int8: {per_channel: [true, false], weight_type: [int8, uint8]}
    """))
    out = tmp_path / "out"
    finished: list[int] = []

    def stop_after_three(event: Event) -> None:
        if isinstance(event, TrialFinished):
            finished.append(event.row["trial_number"])
            if len(finished) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(space, SweepOptions(out=out), stop_after_three)
    study_dir = out / "space"
    before = results.load(study_dir)
    assert sorted(before["trial_number"]) == sorted(finished)
    running = [n for n, s in _journal_states(study_dir, "space").items() if s == "RUNNING"]
    assert running, "a trial was in flight when the driver stopped"

    with pytest.raises(Exception, match="already holds a study"):
        run_sweep(space, SweepOptions(out=out))
    run_sweep(space, SweepOptions(out=out, resume=True))
    after = results.load(study_dir)

    assert after["trial_number"].is_unique
    kept = after.set_index("trial_number").loc[before["trial_number"]]
    assert kept["finished_at"].tolist() == before.set_index("trial_number")["finished_at"].tolist(), "finished rows are kept as they were"
    interrupted = after[after["error"].fillna("").str.startswith("interrupted:")]
    assert sorted(interrupted["trial_number"]) == sorted(running)
    assert len(after) - len(interrupted) == 8, "the budget counts trials that ran to an end"
    states = _journal_states(study_dir, "space")
    assert "RUNNING" not in states.values()
    assert set(after["trial_number"]) <= set(states)
    repeats = set(states) - set(after["trial_number"])
    assert all(states[n] == "COMPLETE" for n in repeats), "trials without a row are repeats told the stored value"


def test_resuming_a_missing_study_is_an_input_error(ray_local, write_space, tmp_path: Path) -> None:
    from sweeper.errors import SweeperInputError

    space = load_space(write_space("""
        task: digits_cnn
        constraint: {max_drop: 1.0}
        backends: {onnxruntime_fp32: {}}
    """))
    with pytest.raises(SweeperInputError, match="cannot resume study 'space'"):
        run_sweep(space, SweepOptions(out=tmp_path / "none", resume=True))
    assert not (tmp_path / "none" / "space").exists()
