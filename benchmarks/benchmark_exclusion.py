"""Layer exclusion under an accuracy budget: four ways to get INT8 within it, side by side.

Usage: ``python benchmarks/benchmark_exclusion.py [--task segment_mlp] [--budget 1.0] [--trials 16]
[--quick] [--threads 1] [--space search_spaces/<task>.yaml] [--max-steps N] [--out results/benchmarks]``.
On the pretrained models: ``--task efficientnet_lite0 --calibration-samples 180 --space
search_spaces/efficientnet_lite0.yaml`` and ``--task minilm_sentiment --space
search_spaces/minilm_sentiment.yaml`` (NNCF must be installed for (c): ``pip install nncf``).

On one task, budget and machine, with ONNX Runtime static INT8 (QDQ; one fixed calibration
method, sample count and per-channel setting for a, b and c):

- (a) full INT8, no layer left in float;
- (b) a greedy revert loop in the style of NNCF's accuracy control: rank the layers by
  :mod:`sweeper.sensitivity` (quantize one layer alone, score the output error), then leave the
  most sensitive remaining layer in float, re-quantize and re-evaluate, until within budget;
- (c) NNCF's own ``quantize_with_accuracy_control`` on the same FP32 ONNX file, same calibration
  samples, a ``validation_fn`` computing the task's metric (see ``_nncf_control.py``);
- (d) sweeper's joint search: ``run_sweep`` over calibration method, sample count, per-channel and
  ``exclude: {top_k: {low: 0, high: K}}`` with early stopping, on an embedded local Ray; or, with
  ``--space``, the sweep that space file describes (every backend in it), whose winner is (d)'s model.

Methods (a)-(c) and NNCF's ``validation_fn`` score on the trial part of the evaluation split, the
samples a sweep's trials see; every final model is then scored on the held-out part as well, which
no method saw (a sweep confirms its finalists there).

Every final model is timed against the ONNX Runtime FP32 model in this process, interleaved
(:func:`sweeper.measure.time_interleaved`), with fixed threads; drops are measured here against
the PyTorch FP32 model, on both parts of the evaluation split. Wall times start from a cold calibration
and sensitivity cache per method (they exclude training and the shared FP32 export). Then
exclusion-only builds are timed with a shared calibration cache against an empty one, A/B/A/B.

Prints one Markdown table and the cache ratio; writes ``<out>/<study>.md``, ``<study>.parquet``
(one row per method), ``<study>-cache.parquet`` (one row per timed build), and the sweep of (d) in
``<out>/<study>-sweep/``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _bench_sweeps import markdown_table
from _catalog import ROOT
from _exclusion_runs import (
    BACKEND,
    Builder,
    CacheRoots,
    Outcome,
    Settings,
    cache_ab,
    full_int8,
    greedy_revert,
    joint_search,
)
from _harness import machine
from _nncf_control import run_nncf

from sweeper.spec import MeasureSettings, TaskRef

DEFAULT_TASK = "segment_mlp"
# Budgets (absolute drop, in the task metric's units) at which full INT8 is infeasible but
# excluding a layer is not: segment_mlp's docstring explains why, and its test
# (tests/unit/test_exclusion_task.py, BUDGET_PCT) fixes the budget. digits_cnn's full INT8 is
# within any budget; 0.0 only makes every code path run.
DEFAULT_BUDGETS = {"segment_mlp": 1.0, "digits_cnn": 0.0, "efficientnet_lite0": 1.0, "minilm_sentiment": 1.0}
# Parquet columns that may be missing or empty in some rows.
ROW_DTYPES = {
    "latency_ms_p50": "float64", "latency_ms_p90": "float64", "latency_runs": "Int64",
    "onnxruntime_fp32_latency_ms_p50": "float64", "speedup_vs_onnxruntime_fp32": "float64", "accuracy": "float64",
    "accuracy_drop": "float64", "accuracy_held_out": "float64", "accuracy_drop_held_out": "float64",
    "held_out_samples": "Int64", "evaluations": "Int64", "trials": "Int64", "pruned": "Int64",
    "wall_time_s": "float64", "setup_s": "float64", "error": "string", "evaluations_note": "string",
}  # fmt: skip
QUICK = MeasureSettings(warmup_runs=5, min_runs=30, max_runs=5000, min_time_s=0.5, round_size=5)
FULL = MeasureSettings(warmup_runs=10, min_runs=100, max_runs=20000, min_time_s=2.0, round_size=10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULT_TASK, help="a task name in tasks/ or a path to a task file")
    parser.add_argument("--budget", type=float, default=None,
                        help="largest absolute accuracy drop, in the metric's units (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BUDGETS.items()) + ")")
    parser.add_argument("--trials", type=int, default=None, help="trials of the joint search (default 16; 8 with --quick)")
    parser.add_argument("--top-k", type=int, default=None, help="the joint search's exclude top_k high end (default 5; 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer trials, a smaller top_k, shorter timings")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every model and trial (default 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the timed calls (default 1)")
    parser.add_argument("--calibration-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--calibration-samples", type=int, default=128, help="for a, b and c (capped at the task's split)")
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                        help="per-channel weights for a and b (NNCF's preset quantizes weights per channel)")
    parser.add_argument("--cache-builds", type=int, default=None, help="exclusion sets in the cache A/B (default 5)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials in flight in the joint search (default 1)")
    parser.add_argument("--space", type=Path, default=None,
                        help="a space file for (d) instead of the generated ORT static INT8 space (e.g. the shipped "
                        "search_spaces/<task>.yaml); (d)'s model is then the sweep's winner")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop (b)'s revert loop after this many re-quantizations (default: until within budget)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    if min(args.threads, args.batch_size, args.calibration_samples, args.max_concurrent) < 1 or (args.trials or 1) < 1:
        parser.error("--threads, --batch-size, --calibration-samples, --trials and --max-concurrent must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    from sweeper.errors import SweeperInputError
    from sweeper.task import find_task_file, load_task

    try:
        path = find_task_file(args.task, list(dict.fromkeys([ROOT / "tasks", Path.cwd().resolve() / "tasks"])))
    except SweeperInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    task = load_task(str(path))
    budget = args.budget if args.budget is not None else DEFAULT_BUDGETS.get(path.stem)
    if budget is None:
        print(f"error: no default budget for task '{path.stem}'; give --budget", file=sys.stderr)
        sys.exit(2)
    return Settings(
        task_ref=TaskRef(name=path.stem, path=str(path)), budget=budget,
        trials=args.trials or (8 if args.quick else 16), top_k=args.top_k or (4 if args.quick else 5),
        threads=args.threads, quick=args.quick, calibration_method=args.calibration_method,
        calibration_samples=min(args.calibration_samples, task.calibration_size), per_channel=args.per_channel,
        measure=(QUICK if args.quick else FULL).model_copy(update={"batch_size": args.batch_size}), cache_builds=args.cache_builds or 5,
        max_concurrent=args.max_concurrent, out=args.out, space=args.space, max_steps=args.max_steps,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    s = settings_from(parse_args(argv))
    scratch = Path(tempfile.mkdtemp(prefix="sweeper-exclusion-"))
    try:
        run(s, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def run(s: Settings, scratch: Path) -> None:
    """Run every method, time their final models, print and write the tables."""
    import torch

    from sweeper.backends import get_backend
    from sweeper.backends.onnx.export import export_onnx
    from sweeper.backends.onnx.runtime import OnnxCandidate, onnx_layer_units
    from sweeper.worker import build_context, prepare_baseline

    torch.set_num_threads(s.threads)
    info = machine()
    study = f"benchmark_exclusion{'-quick' if s.quick else ''}-{s.task_ref.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    started = time.time()
    roots = CacheRoots(scratch / "cache")

    _log("loading the task and its FP32 model")
    baseline = prepare_baseline(s.task_ref, s.measure.eval_batch_size)
    builder = Builder(s, baseline, scratch / "builds")
    with roots.using(roots.fresh("prepare")) as root:
        t0 = time.perf_counter()
        ctx = build_context(baseline.model, baseline.task, scratch, s.threads, models_cache=root / "models")
        # every method starts from the export the static INT8 backend makes with its defaults
        fp32_onnx = export_onnx(ctx, get_backend(BACKEND).Config())
        export_s = time.perf_counter() - t0
    ort_fp32 = OnnxCandidate(fp32_onnx, s.threads)
    ort_metric, ort_drop = builder.drop(ort_fp32)
    n_layers = len(onnx_layer_units(fp32_onnx, get_backend(BACKEND).quantizable_nodes(fp32_onnx)))

    outcomes: list[Outcome] = []
    _log("(a) full INT8")
    outcomes.append(_guard("(a) ORT static INT8, no exclusion", lambda: full_int8(builder, roots)))
    _log("(b) sensitivity ranking + greedy revert loop")
    ranking: list[str] = []

    def run_b() -> Outcome:
        outcome, ranked = greedy_revert(builder, roots)
        ranking.extend(ranked)
        return outcome

    outcomes.append(_guard("(b) greedy revert loop (sweeper sensitivity ranking)", run_b))
    _log("(c) NNCF quantize_with_accuracy_control")
    nncf = run_nncf(fp32_onnx, baseline.task, budget=s.budget, calibration_samples=s.calibration_samples,
                    num_threads=s.threads, out=scratch / "nncf", keep=baseline.keep)  # fmt: skip
    outcomes.append(_nncf_outcome(nncf, builder, s))
    _log(f"(d) joint search: {s.trials} trials on an embedded Ray")
    sweep = f"{study}-sweep"
    outcomes.append(_guard("(d) sweeper joint search", lambda: joint_search(builder, roots, n_layers, scratch, sweep)))

    cache_rows: list[dict[str, Any]] = []
    if ranking:
        _log(f"calibration cache A/B: {s.cache_builds} exclusion sets, shared vs empty cache")
        cache_rows = cache_ab(builder, roots, ranking)

    _log("scoring every final model on the held-out part of the evaluation split")
    for o in (o for o in outcomes if o.candidate is not None):
        o.accuracy_held_out, o.accuracy_drop_held_out, o.held_out_samples = builder.held_out_drop(o.candidate)
    reference = Outcome(method="ONNX Runtime FP32 (reference)", accuracy=ort_metric, accuracy_drop=ort_drop)
    held = builder.held_out_drop(ort_fp32)
    reference.accuracy_held_out, reference.accuracy_drop_held_out, reference.held_out_samples = held
    _log("timing every final model against ORT FP32, interleaved")
    rows = _time_and_row(outcomes, reference, ort_fp32, baseline, s, study, info)
    text = _render(s, info, baseline, rows, cache_rows, nncf, ranking, export_s, time.time() - started)
    print(text)
    paths = _write(s.out, study, text, rows, cache_rows)
    print(f"Wrote {', '.join(str(p) for p in paths)}")


def _guard(method: str, run: Any) -> Outcome:
    try:
        return run()
    except Exception as exc:  # one method failing leaves a row with its error; the others go on
        traceback.print_exc(file=sys.stderr)
        return Outcome(method=method, error=f"{type(exc).__name__}: {exc}"[:600])


def _nncf_outcome(nncf: Any, builder: Builder, s: Settings) -> Outcome:
    from sweeper.backends.onnx.runtime import OnnxCandidate

    method = f"(c) NNCF {nncf.version} quantize_with_accuracy_control" if nncf.version else "(c) NNCF accuracy control"
    outcome = Outcome(method=method, error=nncf.error, wall_time_s=nncf.wall_time_s, excluded=nncf.reverted)
    if nncf.model_path is None:
        return outcome
    outcome.candidate = OnnxCandidate(nncf.model_path, s.threads)
    outcome.accuracy, outcome.accuracy_drop = builder.drop(outcome.candidate)
    outcome.evaluations = nncf.validation_calls
    outcome.evaluations_note = nncf.describe_calls()
    return outcome


def _time_and_row(
    outcomes: list[Outcome], reference: Outcome, ort_fp32: Any, baseline: Any, s: Settings, study: str,
    info: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    from sweeper.measure import time_interleaved

    example = baseline.task.example_inputs(s.measure.batch_size)
    common = {
        "study": study, "task": s.task_ref.name, "budget": s.budget, "drop_mode": "absolute",
        "accuracy_fp32": baseline.metric, "metric_name": baseline.task.metric_name, "num_threads": s.threads,
        "batch_size": s.measure.batch_size, "calibration_method": s.calibration_method,
        "calibration_samples": s.calibration_samples, "per_channel": s.per_channel, "quick": s.quick,
        "cpu_model": info["cpu_model"], "hostname": info["hostname"],
    }  # fmt: skip
    rows, fp32_p50s = [], []
    for o in outcomes:
        row = {**common, "method": o.method, "accuracy": o.accuracy, "accuracy_drop": o.accuracy_drop,
               "accuracy_held_out": o.accuracy_held_out, "accuracy_drop_held_out": o.accuracy_drop_held_out,
               "held_out_samples": o.held_out_samples,
               "excluded_layers": o.excluded, "n_excluded": len(o.excluded), "evaluations": o.evaluations,
               "evaluations_note": o.evaluations_note, "trials": o.trials, "pruned": o.pruned,
               "wall_time_s": o.wall_time_s, "setup_s": o.setup_s, "error": o.error}  # fmt: skip
        if o.candidate is not None:
            try:
                fp32, cand = time_interleaved(lambda: ort_fp32.predict(example), lambda c=o.candidate: c.predict(example),
                                              s.measure)  # fmt: skip
                fp32_p50s.append(fp32.p50)
                row |= {"latency_ms_p50": cand.p50, "latency_ms_p90": cand.p90, "latency_runs": cand.runs,
                        "onnxruntime_fp32_latency_ms_p50": fp32.p50, "speedup_vs_onnxruntime_fp32": fp32.p50 / cand.p50}
            except Exception as exc:
                row["error"] = f"timing failed: {type(exc).__name__}: {exc}"
        row["feasible"] = o.candidate is not None and o.accuracy_drop is not None and o.accuracy_drop <= s.budget
        rows.append(row)
    ref = reference
    reference_row = {**common, "method": ref.method, "accuracy": ref.accuracy, "accuracy_drop": ref.accuracy_drop,
                 "accuracy_held_out": ref.accuracy_held_out, "accuracy_drop_held_out": ref.accuracy_drop_held_out,
                 "held_out_samples": ref.held_out_samples,
                 "feasible": (ref.accuracy_drop or 0.0) <= s.budget, "excluded_layers": [], "n_excluded": 0,
                 "latency_ms_p50": statistics.median(fp32_p50s) if fp32_p50s else None,
                 "speedup_vs_onnxruntime_fp32": 1.0 if fp32_p50s else None,
                 "evaluations_note": "median of its p50 over the pairs below"}  # fmt: skip
    return [reference_row, *rows]


def _render(
    s: Settings, info: dict[str, Any], baseline: Any, rows: list[dict[str, Any]], cache_rows: list[dict[str, Any]],
    nncf: Any, ranking: list[str], export_s: float, elapsed: float,
) -> str:  # fmt: skip
    task = baseline.task
    m = s.measure
    title = f"# benchmark_exclusion{' --quick' if s.quick else ''}: task {s.task_ref.name}, budget {s.budget:g}"
    flags = ", ".join(info["cpu_flags"]) or "none listed"
    nncf_version = nncf.version or "not installed"
    lines = [
        f"{title} ({task.metric_name}, absolute drop)",
        "",
        (f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, flags: {flags}; "
         f"torch {info['torch']}, onnxruntime {info['onnxruntime']}, nncf {nncf_version}."),
        (f"Threads: {s.threads} (torch, every ONNX Runtime session, every trial); batch {m.batch_size}. "
         f"FP32 (PyTorch) {task.metric_name} {baseline.metric:.2f} on {len(baseline.labels)} evaluation samples."),
        (f"INT8 of (a), (b), (c): ONNX Runtime static QDQ, {s.calibration_method} calibration, "
         f"{s.calibration_samples} samples, per_channel={s.per_channel} for (a)/(b); NNCF: mixed preset, "
         "global min/max ranges, same samples, its own quantizer and fast bias correction."),
        (f"Latency: each final model timed against the ORT FP32 model in one process, interleaved "
         f"({m.warmup_runs} warm-up calls, rounds of {m.round_size}, >= {m.min_runs} calls and "
         f">= {m.min_time_s:g} s). Drops measured here against the PyTorch FP32 model, on the trial part of the "
         "evaluation split (what the methods search on; feasible = within the budget there) and on its held-out "
         "part (none of them saw it)."),
        (f"Wall times start from a cold calibration and sensitivity cache per method; they exclude training "
         f"and the FP32 ONNX export shared by all ({export_s:.1f} s here)."),
        "",
    ]  # fmt: skip
    held = next((r.get("held_out_samples") for r in rows if r.get("held_out_samples")), None)
    head = ("Method", "Final latency p50 ms", "Speedup vs ORT FP32", f"Drop ({len(baseline.labels)} trial samples)",
            f"Drop held out ({held or '—'} samples)", "Feasible", "Layers in float", "Evaluations / trials",
            "Wall time s")  # fmt: skip
    table_rows = []
    for r in rows:
        table_rows.append((
            r["method"], _fmt(r.get("latency_ms_p50"), "{:.4g}"), _fmt(r.get("speedup_vs_onnxruntime_fp32"), "{:.2f}x"),
            _fmt(r.get("accuracy_drop"), "{:+.2f}"), _fmt(r.get("accuracy_drop_held_out"), "{:+.2f}"), _feasible(r),
            str(r.get("n_excluded", 0)), r.get("evaluations_note") or "—", _fmt(r.get("wall_time_s"), "{:.2f}"),
        ))  # fmt: skip
    lines.append(markdown_table(head, table_rows))
    lines.append("Layers left in float:")
    for r in rows[1:]:
        layers = ", ".join(f"`{x}`" for x in r["excluded_layers"]) or "none"
        extra = f"; setup {r['setup_s']:.1f} s" if r.get("setup_s") is not None else ""
        error = f" — **not run / failed:** {r['error']}" if r.get("error") else ""
        lines.append(f"- {r['method']}: {layers}{extra}{error}")
    if ranking:
        lines.append(f"\nSensitivity ranking of (b), most sensitive first: {', '.join(f'`{x}`' for x in ranking)}.")
    lines.append("(b) setup = ranking time (1 full INT8 + one build per layer); (d) setup = Ray start, FP32 baseline task "
                 "and the sensitivity ranking, before the first trial.")
    said = dict.fromkeys(x.splitlines()[0] for x in nncf.log if "drop" in x.lower() or "revert" in x)
    if said:
        lines.append(f"NNCF's log: {' / '.join(said)}")
    if cache_rows:
        lines += ["", _render_cache(cache_rows)]
    lines.append(f"\nBenchmark wall time: {elapsed / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def _render_cache(cache_rows: list[dict[str, Any]]) -> str:
    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in cache_rows if r["cache"] == arm)

    builds = len(cache_rows) // 2
    head = ("Cache", "Builds", "Build s (median)", "Build + evaluate s (median)")
    rows = [(arm, str(builds), f"{med(arm, 'build_s'):.3f}", f"{med(arm, 'build_and_evaluate_s'):.3f}")
            for arm in ("shared", "empty")]  # fmt: skip
    ratio = med("empty", "build_s") / med("shared", "build_s")
    ratio_eval = med("empty", "build_and_evaluate_s") / med("shared", "build_and_evaluate_s")
    return (
        "Calibration cache: exclusion-only builds (same calibration settings, excluded sets = top 0, 1, 2, ... of the "
        "ranking), A/B/A/B: one shared cache warmed by an untimed build, against an empty cache per build "
        "(calibration reruns; the FP32 export is shared by both).\n\n"
        + markdown_table(head, rows)
        + f"\nCache speed-up (empty / shared, median): build {ratio:.2f}x, build + evaluate {ratio_eval:.2f}x.\n"
    )


def _write(out: Path, study: str, text: str, rows: list[dict[str, Any]], cache_rows: list[dict[str, Any]]) -> list[Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{study}.md", out / f"{study}.parquet"]
    paths[0].write_text(text)
    frame = pd.DataFrame(rows)
    for column, dtype in ROW_DTYPES.items():  # stable types, whether or not any row has a value
        frame[column] = (frame[column] if column in frame else pd.Series([None] * len(frame))).astype(dtype)
    frame.to_parquet(paths[1], index=False)
    if cache_rows:
        paths.append(out / f"{study}-cache.parquet")
        pd.DataFrame(cache_rows).assign(study=study).to_parquet(paths[-1], index=False)
    return paths


def _feasible(row: dict[str, Any]) -> str:
    if row.get("feasible"):
        return "yes"
    # a method that ran and found nothing within budget says no; one that did not run has no answer
    return "no" if row.get("accuracy_drop") is not None or row.get("trials") else "—"


def _fmt(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _log(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
