"""Quantization (INT8, FP16, mixed precision) against PyTorch FP32 and ONNX Runtime FP32.

Usage: ``python benchmarks/benchmark_quantization.py [--quick] [--models a,b] [--threads N]``.
The rows are every available backend that changes precision, with one default config each (and
the per-channel and QOperator variants of ONNX Runtime static INT8), plus the two FP32 references.
Output as for compare_all.py.
"""

from __future__ import annotations

import sys

from _harness import run

if __name__ == "__main__":
    sys.exit(run("benchmark_quantization", "quantization", __doc__.splitlines()[0]))
