"""Sweeper overhead: a sweep of N tiny trials on Ray against N direct calls of the same trial.

Usage: ``python benchmarks/benchmark_overhead.py [--trials 30] [--out results/benchmarks]``.

The tiny trial is the digits CNN (scikit-learn's 8x8 digits, trained once and cached) on
``onnxruntime_fp32`` with one timed call: it opens the cached ONNX file, evaluates 360 samples and
times one call, so the sweeper's own cost is a visible share of it. The direct calls run
:func:`sweeper.worker.run_trial` in this process after one warm-up call; the sweep runs
:func:`sweeper.study.run_sweep` on an embedded local Ray with one trial in flight. Reported:

- setup: from ``run_sweep`` to its ``start`` event (Ray start, the FP32 baseline in a Ray task);
- per trial: the trial loop's wall time divided by N (with and without the first trial, which
  starts a Ray worker and loads the task there);
- overhead per trial: that minus the mean direct call, in milliseconds and as a share of the
  direct trial time; also minus the trial's own duration measured inside its Ray task
  (``duration_s`` in its row), which isolates Ray, Optuna and the Parquet write.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import _bench_sweeps as bs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    n = args.trials
    info = bs.describe_machine()
    print(f"# benchmark_overhead\n\n{info}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="sweeper-overhead-") as tmp:
        spec = bs.tiny_spec(Path(tmp) / "direct")
        direct = bs.direct_trials(spec, n)
        sweep = bs.timed_sweep(Path(tmp), "overhead", n, max_concurrent=1)

    direct_ms = statistics.mean(direct) * 1000
    loop = sweep["finished"][-1] - sweep["start"]
    steady = (sweep["finished"][-1] - sweep["finished"][0]) / (n - 1) if n > 1 else loop
    inside_ms = statistics.mean(sweep["durations"][1:] or sweep["durations"]) * 1000
    rows = [
        ("direct run_trial, mean per trial", f"{direct_ms:.1f} ms", f"{n} calls in this process"),
        ("sweep setup (Ray start, baseline task)", f"{sweep['start'] - sweep['t0']:.1f} s", "once per sweep"),
        ("sweep trial loop, per trial (all)", f"{loop / n * 1000:.1f} ms", f"{n} trials, 1 in flight"),
        ("sweep trial loop, per trial (after the first)", f"{steady * 1000:.1f} ms", "a warm Ray worker"),
        ("trial time inside its Ray task (after the first)", f"{inside_ms:.1f} ms", "duration_s of the rows"),
        (
            "overhead per trial vs direct call",
            f"{steady * 1000 - direct_ms:.1f} ms",
            f"{(steady * 1000 - direct_ms) / direct_ms * 100:.0f} % of a direct trial",
        ),
        (
            "overhead per trial outside the Ray task",
            f"{steady * 1000 - inside_ms:.1f} ms",
            f"{(steady * 1000 - inside_ms) / (steady * 1000) * 100:.0f} % of the sweep's time per trial "
            "(Ray scheduling, Optuna ask/tell, the Parquet row)",
        ),
        ("sweep wall time in all", f"{sweep['end'] - sweep['t0']:.1f} s", "setup, loop and shutdown"),
    ]
    table = bs.markdown_table(("Measure", "Value", "Note"), rows)
    print(table)
    path = bs.write_markdown(args.out, "benchmark_overhead", f"# benchmark_overhead\n\n{info}\n\n{table}")
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
