"""Scoring padded sentences cut to their length, against scoring them padded, side by side.

Usage: ``python benchmarks/benchmark_padded_scoring.py [--samples 512] [--rounds 3] [--out results/benchmarks]``.

Sensitivity scores a padded task's single-layer models on length-sorted batches cut to their
longest sentence (:func:`sweeper.measure.predict_rows_by_length`) when the backend's models take
any length. This measures what that buys and what it changes on MiniLM (``tasks/minilm_sentiment.py``,
sentences padded to 64 tokens): ORT FP32, ORT dynamic INT8 and ORT static INT8 (per-channel minmax,
128 calibration sentences) built as a sweep builds them, one thread, the same seeded random
``--samples`` evaluation sentences scored both ways in alternation, ``--rounds`` times. Reported
per model: the median seconds of each way and their ratio, the largest logit difference and the
share of sentences whose class the two ways agree on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bench_sweeps as bs
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = (
    ("onnxruntime_fp32", {}),
    ("onnxruntime_dynamic_int8", {}),
    ("onnxruntime_static_int8", {"per_channel": True, "calibration_samples": 128}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)

    from sweeper.backends import BuildContext, get_backend
    from sweeper.measure import EvalData, predict_rows, predict_rows_by_length
    from sweeper.task import load_task
    from sweeper.worker import set_threads

    set_threads(1)
    task = load_task(str(ROOT / "tasks" / "minilm_sentiment.py"))
    data = EvalData.of(task.eval_batches(256))
    n = min(args.samples, len(data.labels))
    rows = np.sort(np.random.default_rng(0).choice(len(data.labels), n, replace=False))
    lengths = np.concatenate([task.padded_lengths(b) for b in data.select(rows).batches])
    info = bs.describe_machine().split(" Trials:")[0]  # no sweep runs here
    header = (
        f"# benchmark_padded_scoring\n\n{info}\n\n{len(rows)} MiniLM evaluation sentences padded to 64 tokens "
        f"({np.mean(lengths):.1f} tokens on average), one thread, {args.rounds} rounds.\n"
    )
    print(header, flush=True)
    head = ("model", "padded s", "cut s", "speedup", "max logit diff", "same class")
    table = []
    with tempfile.TemporaryDirectory(prefix="sweeper-padded-") as tmp:
        ctx = BuildContext(model=task.build_model(), task=task, workdir=Path(tmp), cache_dir=Path(tmp), num_threads=1)
        for name, params in MODELS:
            backend = get_backend(name)
            candidate = backend.build(ctx, backend.config(params))
            padded, cut = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                full = predict_rows(candidate.predict, data, rows)
                padded.append(time.perf_counter() - start)
                start = time.perf_counter()
                short = predict_rows_by_length(candidate.predict, data, rows, task.padded_lengths, task.input_names)
                cut.append(time.perf_counter() - start)
            padded_s, cut_s = statistics.median(padded), statistics.median(cut)
            same = np.mean(full.argmax(-1) == short.argmax(-1)) * 100
            table.append((
                name, f"{padded_s:.2f}", f"{cut_s:.2f}", f"{padded_s / cut_s:.2f}x",
                f"{float(np.abs(full - short).max()):.2g}", f"{same:.1f} %",
            ))  # fmt: skip
            print(bs.markdown_table(head, table[-1:]), flush=True)
    text = bs.markdown_table(head, table)
    print(text)
    path = bs.write_markdown(args.out, "benchmark_padded_scoring", header + "\n" + text)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
