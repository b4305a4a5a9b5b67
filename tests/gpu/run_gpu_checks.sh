#!/usr/bin/env bash
# The checks that need an NVIDIA GPU: torch_fp16, torch_autocast on CUDA, and tensorrt where the
# [tensorrt] extra is installed. Run from anywhere on a GPU machine: bash tests/gpu/run_gpu_checks.sh
# It installs the project with its test extra only; tensorrt tests skip (with the reason) unless
# TensorRT is already installed. A few minutes on one GPU, most of it pip and the first import.
set -euo pipefail
cd "$(dirname "$0")/../.."

python -m pip install -q -e '.[test]'

python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing to check")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
try:
    import tensorrt
    print(f"TensorRT {tensorrt.__version__}")
except ImportError:
    print("TensorRT is not installed: the tensorrt checks skip (pip install -e '.[tensorrt]' to run them)")
PY

# GPU-marked tests: CUDA candidates' agreement and reload, TensorRT engines (fp32, fp16, int8).
# -s shows the agreement each prints.
pytest -q -rs -s -m gpu tests/unit
# The backend contract for the GPU backends (the CPU autocast configs run too).
pytest -q -rs tests/contract -k "torch_fp16 or torch_autocast or tensorrt"
