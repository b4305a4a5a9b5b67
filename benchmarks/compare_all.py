"""Every available backend on every model, side by side: latency, speedups, size, accuracy.

Usage: ``python benchmarks/compare_all.py [--quick] [--models a,b] [--backends x,y] [--threads N]``.
Prints one Markdown table per model and writes it, with a Parquet file of the rows, to
``results/benchmarks/``. See benchmarks/README.md for what each column means and for the tables
measured on the project's machine.
"""

from __future__ import annotations

import sys

from _harness import run

if __name__ == "__main__":
    sys.exit(run("compare_all", "all", __doc__.splitlines()[0]))
