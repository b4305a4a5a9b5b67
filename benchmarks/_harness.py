"""The shared benchmark loop: per model, build every candidate, evaluate it, time all side by side.

For each model, in one process with fixed threads:

1. the FP32 PyTorch model is evaluated on the task's evaluation split (or the first
   ``--eval-samples`` of it), once;
2. each method (a backend with one config) is built, saved (its size is the saved artifact's
   bytes), and evaluated on the same samples: metric, drop against FP32, top-1 agreement;
3. PyTorch FP32, ONNX Runtime FP32 and every candidate are timed in the same interleaved rounds
   (:func:`_timing.time_round_robin`), so both speedup columns are ratios taken under one load.

A method that fails to build, evaluate or run becomes a row with its error; the others go on.
Rows go to a Markdown table (printed and written) and a Parquet file whose first columns are the
sweep result schema (:data:`sweeper.results.COLUMNS`) followed by benchmark-only columns.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _catalog import (
    MODELS,
    SLOW_IN_QUICK,
    Family,
    Method,
    Model,
    in_family,
    methods_for,
)
from _report import render_model_table, write_outputs
from _timing import time_round_robin

from sweeper.spec import MeasureSettings

QUICK = MeasureSettings(warmup_runs=2, min_runs=10, max_runs=200, min_time_s=1.0, round_size=5)
FULL = MeasureSettings(warmup_runs=5, min_runs=40, max_runs=1000, min_time_s=5.0, round_size=10)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short timings, fewer eval samples and variants")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--backends", default=None, help="comma-separated backend names (default: all available)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the timed calls (default 1)")
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluate on at most this many samples")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="where tables and Parquet go")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    return args


def machine() -> dict[str, Any]:
    """The CPU, its relevant instruction-set flags, and library versions."""
    import onnxruntime
    import torch

    from sweeper.spec import cpu_model

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    import os

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def run(benchmark: str, family: Family, description: str, argv: list[str] | None = None) -> int:
    """Run one benchmark script end to end; return its exit code."""
    args = parse_args(description, argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    settings = QUICK if args.quick else FULL
    info = machine()
    started = time.time()
    study = f"{benchmark}{'-quick' if args.quick else ''}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    header = [
        f"# {benchmark}{' --quick' if args.quick else ''}",
        "",
        f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, flags: "
        f"{', '.join(info['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)} "
        f"(torch CPU capability {info['torch_cpu_capability']}).",
        f"Threads: {args.threads} (torch.set_num_threads, ONNX Runtime intra_op_num_threads; inter-op 1). "
        f"Batch size {args.batch_size}. torch {info['torch']}, onnxruntime {info['onnxruntime']}.",
        f"Timing: {settings.warmup_runs} warm-up calls each, then interleaved rounds of {settings.round_size} "
        f"calls per model until >= {settings.min_runs} calls each and >= {settings.min_time_s:g} s "
        f"(at most {settings.max_runs}). Speedups are ratios of p50 latencies from the same rounds.",
        "",
    ]
    print("\n".join(header), flush=True)
    methods, skipped = select_methods(family, args)
    for backend, reason in skipped:
        print(f"- skipped {backend}: {reason}", flush=True)
    print(flush=True)
    tables, rows = [], []
    for key in args.models.split(","):
        model = MODELS[key]
        model_rows = benchmark_model(model, methods, settings, args, study, info)
        table = render_model_table(model, model_rows)
        print(table, flush=True)
        tables.append(table)
        rows.extend(model_rows)
        gc.collect()
    elapsed = time.time() - started
    footer = f"Wall time: {elapsed / 60:.1f} min."
    print(footer)
    skipped_lines = [f"- skipped {b}: {r}" for b, r in skipped]
    paths = write_outputs(args.out, study, "\n".join([*header, *skipped_lines, "", *tables, footer, ""]), rows)
    print(f"Wrote {', '.join(str(p) for p in paths)}")
    return 0


def select_methods(family: Family, args: argparse.Namespace) -> tuple[list[Method], list[tuple[str, str]]]:
    """The methods to run here, and (backend, reason) for each backend left out."""
    from sweeper.backends import availability, get_backend

    wanted = set(args.backends.split(",")) if args.backends else None
    methods: list[Method] = []
    skipped: list[tuple[str, str]] = []
    for backend, reason in availability().items():
        if not in_family(backend, family) or (wanted is not None and backend not in wanted):
            continue
        if reason is None and "cpu" not in get_backend(backend).hardware:
            reason = "runs on GPU only; this benchmark runs on the CPU"
        if reason is None and args.quick and wanted is None and backend in SLOW_IN_QUICK:
            reason = f"left out of --quick ({SLOW_IN_QUICK[backend]}); name it with --backends to run it"
        if reason is not None:
            skipped.append((backend, reason))
            continue
        methods.extend(methods_for(backend))
    return methods, skipped


def benchmark_model(
    model: Model,
    methods: list[Method],
    settings: MeasureSettings,
    args: argparse.Namespace,
    study: str,
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every row of one model's table (the PyTorch FP32 reference first)."""
    from sweeper.backends.torch.eager import TorchCandidate
    from sweeper.task import load_task

    t0 = time.time()
    print(f"... {model.label}: loading", file=sys.stderr, flush=True)
    try:
        task = load_task(str(model.task_path))
        fp32_model = task.build_model().eval()
    except Exception as exc:
        return [_row(study, model, "PyTorch FP32 (eager)", "pytorch_fp32", {}, info, args, error=_error(exc))]
    latency_only = bool(getattr(task, "latency_only", False))
    limit = args.eval_samples or (model.quick_eval_samples if args.quick else None)
    fp32 = TorchCandidate(fp32_model, task.input_names, args.threads)
    reference: dict[str, Any] = {}
    if not latency_only:
        outputs, labels = evaluate(fp32.predict, task, limit)
        reference = {"outputs": outputs, "labels": labels, "metric": task.metric(outputs, labels)}
    base = _row(study, model, "PyTorch FP32 (eager)", "pytorch_fp32", {}, info, args)
    base["size_bytes"] = _state_dict_bytes(fp32_model)
    if reference:
        base.update(_accuracy(task, reference, reference["outputs"]))
    example = task.example_inputs(args.batch_size)
    rows, runners = [base], {0: lambda: fp32.predict(example)}
    if args.quick and not model.quick_variants and not args.backends:
        methods = [m for m in methods if not m.variant]
    with tempfile.TemporaryDirectory(prefix=f"bench-{model.key}-") as tmp:
        for i, method in enumerate(methods):
            params = _params(method, task, args.quick)
            row = _row(study, model, method.label, method.backend, params, info, args)
            rows.append(row)
            print(f"... {model.label}: {method.label} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            candidate = _build_into(row, method.backend, params, task, fp32_model, Path(tmp), i, args.threads,
                                    reference, limit)  # fmt: skip
            if candidate is not None:
                runners[len(rows) - 1] = (lambda c: lambda: c.predict(example))(candidate)
        print(f"... {model.label}: timing {len(runners)} models interleaved", file=sys.stderr, flush=True)
        stats, errors = time_round_robin({str(k): fn for k, fn in runners.items()}, settings)
    _fill_latency(rows, stats, errors)
    for row in rows:
        row["baseline_size_bytes"] = base["size_bytes"]
        if row.get("size_bytes"):
            row["size_reduction"] = base["size_bytes"] / row["size_bytes"]
        row["eval_samples"] = None if latency_only else len(reference["labels"])
        row["accuracy_fp32"] = reference.get("metric")
    return rows


def _build_into(
    row: dict[str, Any], backend_name: str, params: dict[str, Any], task: Any, fp32_model: Any, tmp: Path, i: int,
    threads: int, reference: dict[str, Any], limit: int | None,
) -> Any:
    """Build, save and score one method's candidate, recording it in ``row``; ``None`` when it failed."""
    from sweeper.backends import get_backend
    from sweeper.worker import build_context

    started = time.time()
    try:
        ctx = build_context(fp32_model, task, tmp / f"work-{i}", threads)
        ctx.workdir.mkdir()
        backend = get_backend(backend_name)
        candidate = backend.build(ctx, backend.Config(**params))
        row["build_s"] = time.time() - started
        candidate.save(tmp / f"artifact-{i}")
        row["size_bytes"] = candidate.size_bytes()
        if reference:
            outputs, _ = evaluate(candidate.predict, task, limit)
            row.update(_accuracy(task, reference, outputs))
    except Exception as exc:
        row.update(state="failed", error=_error(exc))
        return None
    finally:
        row["finished_at"] = datetime.now(UTC)
        row["duration_s"] = time.time() - started
    return candidate


def evaluate(predict: Any, task: Any, limit: int | None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Outputs and labels of the first ``limit`` evaluation samples (all when ``None``)."""
    outputs, labels, seen = [], [], 0
    for batch, y in task.eval_batches(batch_size):
        if limit is not None and seen >= limit:
            break
        take = len(y) if limit is None else min(len(y), limit - seen)
        batch = {k: v[:take] for k, v in batch.items()}
        outputs.append(np.asarray(predict(batch), dtype=np.float32))
        labels.append(y[:take])
        seen += take
    return np.concatenate(outputs), np.concatenate(labels)


def _accuracy(task: Any, reference: dict[str, Any], outputs: np.ndarray) -> dict[str, Any]:
    from sweeper.measure import accuracy_drop, agreement_pct, max_abs_error

    metric = task.metric(outputs, reference["labels"])
    result = {
        "accuracy": metric,
        "accuracy_drop": accuracy_drop(reference["metric"], metric, higher_is_better=task.higher_is_better),
        "agreement": agreement_pct(reference["outputs"], outputs),
        "output_max_abs_error": max_abs_error(reference["outputs"], outputs),
    }
    return result


def _params(method: Method, task: Any, quick: bool) -> dict[str, Any]:
    from sweeper.backends import get_backend

    params = dict(method.params)
    fields = get_backend(method.backend).Config.model_fields
    if "calibration_samples" in fields and "calibration_samples" not in params:
        default = fields["calibration_samples"].default
        params["calibration_samples"] = min(32 if quick else default, task.calibration_size)
    return params


def _fill_latency(rows: list[dict[str, Any]], stats: dict[str, Any], errors: dict[str, str]) -> None:
    torch_fp32 = stats.get("0")
    ort_index = next((i for i, r in enumerate(rows) if r["backend"] == "onnxruntime_fp32" and str(i) in stats), None)
    ort_fp32 = stats.get(str(ort_index)) if ort_index is not None else None
    for i, row in enumerate(rows):
        if str(i) in errors:
            row.update(state="failed", error=row.get("error") or errors[str(i)])
        s = stats.get(str(i))
        if s is None:
            continue
        row.update(
            latency_ms_p50=s.p50, latency_ms_p90=s.p90, latency_ms_p99=s.p99, latency_ms_mean=s.mean,
            latency_ms_std=s.std, latency_runs=s.runs,
        )  # fmt: skip
        if torch_fp32 is not None:
            row.update(
                baseline_latency_ms_p50=torch_fp32.p50, baseline_latency_ms_p90=torch_fp32.p90,
                speedup=torch_fp32.p50 / s.p50,
            )  # fmt: skip
        if ort_fp32 is not None:
            row.update(onnxruntime_fp32_latency_ms_p50=ort_fp32.p50, speedup_vs_onnxruntime_fp32=ort_fp32.p50 / s.p50)


def _row(
    study: str, model: Model, label: str, backend: str, params: dict[str, Any], info: dict[str, Any],
    args: argparse.Namespace, error: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return ""

    now = datetime.now(UTC)
    return {
        "study": study, "task": model.key, "backend": backend, "method": label,
        "params_json": json.dumps(params, sort_keys=True), "attempt": 1, "state": "failed" if error else "complete",
        "started_at": now, "finished_at": now, "drop_mode": "absolute", "num_threads": args.threads,
        "batch_size": args.batch_size, "device": "cpu", "node_id": "", "hostname": info["hostname"],
        "cpu_model": info["cpu_model"], "cpu_flags": ",".join(info["cpu_flags"]), "torch_version": ver("torch"),
        "onnxruntime_version": ver("onnxruntime"), "optuna_version": ver("optuna"), "ray_version": ver("ray"),
        "sweeper_version": ver("sweeper"), "error": error, "model_label": model.label,
        "latency_only": bool(getattr(load_task_quiet(model), "latency_only", False)), "quick": bool(args.quick),
    }  # fmt: skip


def load_task_quiet(model: Model) -> Any:
    from sweeper.task import load_task

    try:
        return load_task(str(model.task_path))
    except Exception:
        return None


def _state_dict_bytes(module: Any) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _error(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(" ".join(lines).split())[:600]
