"""What the benchmarks compare: the models (tasks) and one default configuration per backend.

Backends come from :func:`sweeper.backends.availability`; a backend registered later (by name in
``sweeper.backends.BACKENDS``) is benchmarked with its config's defaults without any change here.
A backend whose config has a ``precision`` field with a fixed set of choices (TensorRT, say) gets
one row per choice.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
Family = Literal["quantization", "compilation", "all"]


@dataclass(frozen=True, kw_only=True)
class Model:
    """One benchmarked model: a task file, how to name it, and how much of it ``--quick`` runs.

    Attributes:
        key: the task's file name in ``tasks/`` (without ``.py``).
        label: the table heading.
        quick_eval_samples: evaluation samples used by ``--quick`` (``None``: all).
        quick_variants: whether ``--quick`` also runs the extra variants of a backend (per-channel,
            QOperator); without them a big model runs one config per backend.
    """

    key: str
    label: str
    quick_eval_samples: int | None = None
    quick_variants: bool = True

    @property
    def task_path(self) -> Path:
        return ROOT / "tasks" / f"{self.key}.py"


MODELS: dict[str, Model] = {
    m.key: m
    for m in (
        Model(key="resnet50_latency", label="ResNet50 (torchvision, random weights: latency only)",
              quick_variants=False),
        Model(key="mobilenet_v2_latency", label="MobileNetV2 (torchvision, random weights: latency only)"),
        Model(key="bert_base_latency", label="BERT-base-sized encoder, seq 128 (random weights: latency only)",
              quick_variants=False),
        Model(key="efficientnet_lite0", label="EfficientNet-Lite0 (pretrained, labelled ImageNet photos)", quick_eval_samples=100),
        Model(key="minilm_sentiment", label="all-MiniLM-L6-v2 + linear head, seq 64 (movie-review sentiment)",
              quick_eval_samples=300, quick_variants=False),
        Model(key="fashion_mnist_cnn", label="Fashion-MNIST CNN (trained here)", quick_eval_samples=1_000),
    )
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row of a table: a backend with fixed config values."""

    label: str
    backend: str
    params: dict[str, Any] = field(default_factory=dict)
    variant: bool = False  # an extra config of a backend already in the table


# Labels and extra variants for the backends known today; anything else gets its defaults.
PRESETS: dict[str, list[Method]] = {
    "onnxruntime_fp32": [Method(label="ONNX Runtime FP32", backend="onnxruntime_fp32")],
    "onnxruntime_dynamic_int8": [Method(label="ORT dynamic INT8", backend="onnxruntime_dynamic_int8")],
    "onnxruntime_static_int8": [
        Method(label="ORT static INT8 (QDQ, per-tensor)", backend="onnxruntime_static_int8"),
        Method(label="ORT static INT8 (QDQ, per-channel)", backend="onnxruntime_static_int8",
               params={"per_channel": True}, variant=True),
        Method(label="ORT static INT8 (QOperator, per-channel)", backend="onnxruntime_static_int8",
               params={"quant_format": "qoperator", "per_channel": True}, variant=True),
        Method(label="ORT static INT8 (QDQ, per-channel, percentile)", backend="onnxruntime_static_int8",
               params={"per_channel": True, "calibration_method": "percentile"}, variant=True),
    ],
    "torch_dynamic_int8": [Method(label="PyTorch dynamic INT8", backend="torch_dynamic_int8")],
    "torch_static_int8": [Method(label="PyTorch static INT8", backend="torch_static_int8")],
    "torch_qat_int8": [Method(label="PyTorch QAT INT8", backend="torch_qat_int8")],
    "torchscript": [Method(label="TorchScript", backend="torchscript")],
    "torch_compile": [Method(label="torch.compile", backend="torch_compile")],
    "torch_fp16": [Method(label="PyTorch FP16", backend="torch_fp16")],
    "torch_autocast": [Method(label="PyTorch autocast (mixed precision)", backend="torch_autocast")],
    "onnxruntime_fp16": [Method(label="ORT FP16", backend="onnxruntime_fp16")],
}  # fmt: skip

# Graph compilers and runtimes that keep the weights' precision (TensorRT's precisions included).
COMPILERS = ("onnxruntime_fp32", "torchscript", "torch_compile")
# Backends --quick leaves out unless named with --backends, and why.
SLOW_IN_QUICK = {
    "torch_qat_int8": "it fine-tunes the model",
    "torch_compile": "it compiles for about a minute per model, and again per new batch shape",
}


def in_family(backend: str, family: Family) -> bool:
    """Whether ``backend`` belongs in the ``family`` table (ORT FP32 is in every table)."""
    if family == "all" or backend == "onnxruntime_fp32":
        return True
    compiler = backend in COMPILERS or backend.startswith("tensorrt")
    return compiler if family == "compilation" else not compiler


def methods_for(backend: str) -> list[Method]:
    """The rows of ``backend``: its presets, or one per ``precision`` choice, or its defaults."""
    if backend in PRESETS:
        return PRESETS[backend]
    from sweeper.backends import get_backend

    config = get_backend(backend).Config
    precision = config.model_fields.get("precision")
    choices = typing.get_args(precision.annotation) if precision is not None else ()
    if choices and all(isinstance(c, str) for c in choices):
        return [
            Method(label=f"{backend} {c}", backend=backend, params={"precision": c}, variant=i > 0)
            for i, c in enumerate(choices)
        ]
    return [Method(label=backend, backend=backend)]
