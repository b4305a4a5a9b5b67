"""Compilation and runtimes (ONNX Runtime, TorchScript, torch.compile, TensorRT) against PyTorch FP32.

Usage: ``python benchmarks/benchmark_compilation.py [--quick] [--models a,b] [--threads N]``.
The rows are every available backend that compiles or converts the model without changing its
precision (TensorRT's precisions included, where a GPU has it), with one default config each.
Output as for compare_all.py.
"""

from __future__ import annotations

import sys

from _harness import run

if __name__ == "__main__":
    sys.exit(run("benchmark_compilation", "compilation", __doc__.splitlines()[0]))
