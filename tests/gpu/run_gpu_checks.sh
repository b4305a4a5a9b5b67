#!/usr/bin/env bash
# The checks that need an NVIDIA GPU: torch_fp16, torch_autocast on CUDA, a CUDA candidate timed
# against the FP32 model on the same GPU, and tensorrt where TensorRT is installed.
# Run from anywhere on a GPU machine: bash tests/gpu/run_gpu_checks.sh
# With network access it installs the project with its test extra. On a machine without one
# whose Python already has torch (CUDA), numpy, scipy, scikit-learn, onnx, onnxruntime and pytest,
# put wheels of the missing pure dependencies (pydantic and its needs) in .whl/ first: they are
# installed into /tmp/site and the project runs from the checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    python3 -m pip install -q -e '.[test]'
fi

python3 - <<'PY'
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

# GPU-marked tests (the files that hold them, so that no Ray or Optuna is needed to collect them):
# CUDA candidates' agreement and reload, the same-GPU baseline, TensorRT engines. -s shows figures.
python3 -m pytest -q -rs -s -p no:cacheprovider -m gpu \
    tests/unit/test_trial.py tests/unit/test_backend_configs_fp16.py tests/unit/test_tensorrt_plan.py
# The backend contract for the GPU backends (the CPU autocast configs run too).
python3 -m pytest -q -rs -p no:cacheprovider tests/contract -k "torch_fp16 or torch_autocast or tensorrt"
