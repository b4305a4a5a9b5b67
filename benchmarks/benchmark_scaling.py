"""Scaling: trial throughput of a sweep with 1 and with 2 trials in flight on this machine.

Usage: ``python benchmarks/benchmark_scaling.py [--trials 24] [--workers 1,2] [--out results/benchmarks]``.

Each sweep runs the same trials (digits CNN on ``onnxruntime_fp32``, about half a second of timed
calls each, 1 CPU per trial) on a fresh embedded local Ray with ``max_concurrent`` = 1, then 2.
Throughput is trials per minute over the trial loop (from the driver's start event to the last
finished trial), so Ray's start and the FP32 baseline task are left out; the steady figure leaves
out the first trial of each worker as well (worker start and task loading). Speedup is against one
worker. On a 2-core machine shared with other work, 2 workers cannot reach 2x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _bench_sweeps as bs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", default="1,2", help="comma-separated max_concurrent values")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    info = bs.describe_machine()
    print(f"# benchmark_scaling\n\n{info}\n", flush=True)
    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="sweeper-scaling-") as tmp:
        for workers in (int(w) for w in args.workers.split(",")):
            times = bs.timed_sweep(Path(tmp), f"scaling-{workers}", args.trials, max_concurrent=workers,
                                   measure=bs.SMALL)  # fmt: skip
            loop = times["finished"][-1] - times["start"]
            steady_trials = args.trials - workers
            steady = times["finished"][-1] - times["finished"][workers - 1]
            per_min = args.trials / loop * 60
            steady_per_min = steady_trials / steady * 60 if steady_trials > 0 and steady > 0 else float("nan")
            inside = sum(times["durations"]) / len(times["durations"])
            first = first or (per_min, steady_per_min)
            rows.append((
                str(workers), str(args.trials), f"{loop:.1f} s", f"{per_min:.1f}", f"{steady_per_min:.1f}",
                f"{per_min / first[0]:.2f}x", f"{steady_per_min / first[1]:.2f}x", f"{inside:.2f} s",
            ))  # fmt: skip
            print(f"... {workers} worker(s): {per_min:.1f} trials/min", file=sys.stderr, flush=True)
    table = bs.markdown_table(
        ("Workers", "Trials", "Loop wall time", "Trials/min", "Trials/min (steady)", "Speedup", "Speedup (steady)",
         "Mean trial time in its task"),
        rows,
    )  # fmt: skip
    print(table)
    path = bs.write_markdown(args.out, "benchmark_scaling", f"# benchmark_scaling\n\n{info}\n\n{table}")
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
