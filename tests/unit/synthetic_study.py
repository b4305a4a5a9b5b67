"""A small synthetic study folder for the analysis and report tests: rows, study.json, an Optuna
journal that matches the rows, dummy artifacts and (optionally) a sensitivity table.

No Ray, no model: the figures are made up so the expected answers are known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import optuna
import pandas as pd

from sweeper import results

STUDY = "syn"
MAX_DROP = 1.0
SPACE = """task: digits_cnn
objective: latency_ms_p50
constraint: {max_drop: 1.0, mode: absolute}
hardware: {target: cpu, num_cpus: 1}
measure: {warmup_runs: 3, min_runs: 20, eval_batch_size: 128}
backends:
  onnxruntime_static_int8:
    calibration_method: [minmax, entropy]
    calibration_samples: {low: 16, high: 256, log: true}
    per_channel: [true, false]
    nodes_to_exclude: {value: []}
  torch_dynamic_int8: {}
"""
STATIC = "onnxruntime_static_int8"
TORCH = "torch_dynamic_int8"


@dataclass(frozen=True)
class Trial:
    backend: str
    latency: float
    drop: float
    size: int
    params: dict
    state: str = "complete"
    error: str | None = None


def _static(method: str, samples: int, per_channel: bool, latency: float, drop: float, size: int,
            exclude: tuple[str, ...] = ()) -> Trial:
    params = {"calibration_method": method, "calibration_samples": samples, "per_channel": per_channel,
              "nodes_to_exclude": list(exclude)}
    return Trial(STATIC, latency, drop, size, params)


# Latency is decided by calibration_method (minmax fast, entropy slow); per_channel and the sample
# count only add noise. Trial 3 is the fastest but infeasible (drop 2.5 > 1.0); trial 10 failed.
# Pareto front over (latency, drop, size): 0 1 2 3 4 5 8; feasible only: 0 1 2 4 5 8.
TRIALS: list[Trial] = [
    _static("minmax", 32, True, 0.20, 0.3, 70_000, ("conv1",)),       # 0
    _static("entropy", 64, False, 1.00, 0.1, 70_000),                  # 1
    _static("minmax", 128, False, 0.21, 0.5, 68_000),                  # 2
    _static("entropy", 16, True, 0.15, 2.5, 70_000, ("fc",)),         # 3 infeasible
    _static("entropy", 200, True, 1.05, 0.0, 70_000, ("conv1",)),     # 4
    _static("minmax", 40, True, 0.23, 0.2, 69_000),                    # 5
    _static("minmax", 90, False, 0.22, 0.4, 70_000, ("conv1", "fc")),  # 6
    _static("entropy", 150, False, 1.02, 0.1, 70_000),                 # 7
    Trial(TORCH, 0.40, 0.0, 240_000, {}),                              # 8
    Trial(TORCH, 0.42, 0.0, 240_000, {}),                              # 9
    Trial(TORCH, 0.0, 0.0, 0, {}, state="failed", error="RuntimeError: <boom> & friends\ntraceback"),  # 10
    Trial(TORCH, 0.41, 0.0, 240_000, {}),                              # 11
]
FRONT = {0, 1, 2, 3, 4, 5, 8}
FEASIBLE_FRONT = FRONT - {3}


def make_study(root: Path, *, sensitivity: bool = True, journal: bool = True) -> Path:
    """Write the synthetic study under ``root/syn`` and return its folder."""
    study_dir = root / STUDY
    results.write_study_info(study_dir, {
        "study": STUDY, "task": "digits_cnn", "task_path": "/nonexistent/tasks/digits_cnn.py",
        "space": SPACE, "baseline": {"metric": 98.0, "metric_name": "top1_accuracy_pct"},
    })  # fmt: skip
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for number, t in enumerate(TRIALS):
        name = "model.onnx" if t.backend == STATIC else "state_dict.pt"
        artifact = study_dir / "artifacts" / f"trial-{number:06d}" / name
        row = {
            "study": STUDY, "trial_number": number, "state": t.state, "task": "digits_cnn", "backend": t.backend,
            "params_json": json.dumps(t.params, sort_keys=True), "started_at": now, "finished_at": now,
            "metric_name": "top1_accuracy_pct", "accuracy_fp32": 98.0, "drop_mode": "absolute",
            "max_drop": MAX_DROP, "num_threads": 1, "batch_size": 1, "device": "cpu", "cpu_model": "Synthetic CPU",
            "excluded_layers": t.params.get("nodes_to_exclude"),
        }  # fmt: skip
        if t.state == "complete":
            artifact.parent.mkdir(parents=True, exist_ok=True)
            artifact.write_bytes(b"x" * 16)
            row |= {
                "accuracy": 98.0 - t.drop, "accuracy_drop": t.drop, "feasible": t.drop <= MAX_DROP,
                "agreement": 99.0, "latency_ms_p50": t.latency, "latency_ms_p90": t.latency * 1.2,
                "baseline_latency_ms_p50": 0.5, "speedup": 0.5 / t.latency, "size_bytes": t.size,
                "baseline_size_bytes": 250_000, "artifact_path": str(artifact),
            }  # fmt: skip
        else:
            row |= {"feasible": False, "error": t.error}
        results.write_row(study_dir, row)
    if journal:
        _write_journal(study_dir)
    if sensitivity:
        pd.DataFrame({
            "backend": [STATIC] * 3, "layer": ["conv1", "conv2", "fc"], "op_type": ["Conv", "Conv", "Gemm"],
            "metric_drop": [1.2, 0.1, 0.6], "output_error": [0.30, 0.02, 0.15], "rank": [1, 3, 2],
            "config_json": ['{"calibration_method": "minmax"}'] * 3,
        }).to_parquet(study_dir / "sensitivity.parquet")  # fmt: skip
    return study_dir


def _write_journal(study_dir: Path) -> None:
    """An Optuna journal whose trials match the rows, named as the driver names its parameters."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="minimize")
    for t in TRIALS:
        params = {"backend": t.backend}
        dists = {"backend": CategoricalDistribution([STATIC, TORCH])}
        if t.backend == STATIC:
            params |= {f"{STATIC}.calibration_method": t.params["calibration_method"],
                       f"{STATIC}.calibration_samples": t.params["calibration_samples"],
                       f"{STATIC}.per_channel": t.params["per_channel"]}
            dists |= {f"{STATIC}.calibration_method": CategoricalDistribution(["minmax", "entropy"]),
                      f"{STATIC}.calibration_samples": IntDistribution(16, 256, log=True),
                      f"{STATIC}.per_channel": CategoricalDistribution([True, False])}
        if t.state == "complete":
            trial = optuna.trial.create_trial(params=params, distributions=dists, value=t.latency,
                                              system_attrs={"constraints:accuracy_drop": t.drop - MAX_DROP})
        else:
            trial = optuna.trial.create_trial(params=params, distributions=dists, state=optuna.trial.TrialState.FAIL)
        study.add_trial(trial)
