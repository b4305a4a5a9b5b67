"""TensorRT: an engine built from the ONNX model for one NVIDIA GPU, in FP32, FP16 or INT8.

Every network is strongly typed (see :mod:`sweeper.backends.tensorrt_engine`, which builds and
runs the engine), so the precision lives in the ONNX file:

- ``fp32``: the FP32 export (TF32 allowed for FP32 layers unless ``tf32`` is off);
- ``fp16``: the export converted to float16 with float32 inputs and outputs, the same file the
  ``onnxruntime_fp16`` backend runs;
- ``int8``: the explicitly quantized (QDQ) model that ``onnxruntime_static_int8`` makes with
  ``qdq_target="tensorrt"``: symmetric int8 activations and weights (zero points of 0), float
  biases, weights behind their own Q/DQ pair.

Those files are made on the CPU, so which file a precision builds from is tested without a GPU;
building and running the engine needs a GPU and the ``[tensorrt]`` extra. The engine has one
optimization profile for the dynamic batch axis (``min_batch`` / ``opt_batch`` / ``max_batch``,
the other axes as in the task's example input); larger batches are split, smaller ones padded. A
timing cache per GPU model and TensorRT version is shared by the trials of a machine. The
artifact is the serialized engine (``model.engine``), which only loads with the same TensorRT
version on the same GPU model.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import numpy as np
from pydantic import Field, model_validator

from sweeper.backends import Backend, BuildContext, Hardware
from sweeper.backends.onnx.export import export_onnx, preflight_export
from sweeper.backends.onnxruntime_fp16 import convertible_nodes, float16_model
from sweeper.backends.onnxruntime_static_int8 import (
    OnnxRuntimeStaticInt8Config,
    StaticQuantizationConfig,
    quantize_static_int8,
    static_quantizable_nodes,
)
from sweeper.backends.tensorrt_engine import (
    EnginePlan,
    OnnxSource,
    Precision,
    Shape,
    TensorRTCandidate,
    build_engine,
    timing_cache_path,
)
from sweeper.backends.torch.device import cuda_device, cuda_unavailable_reason
from sweeper.errors import BackendUnavailableError
from sweeper.task import Task

# Which ONNX file each precision builds from (see the module docstring).
ONNX_SOURCES: dict[str, OnnxSource] = {"fp32": "fp32_export", "fp16": "fp16_conversion", "int8": "qdq_int8"}
MIN_TENSORRT_MAJOR = 10


class TensorRTConfig(StaticQuantizationConfig):
    """Settings of a TensorRT engine (the calibration fields, ``per_channel`` and
    ``nodes_to_exclude`` come from :class:`~sweeper.backends.onnxruntime_static_int8.StaticQuantizationConfig`).

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (see the module docstring for the ONNX file each
            builds from).
        min_batch: the smallest batch size the engine accepts (smaller batches are padded).
        opt_batch: the batch size TensorRT tunes its kernels for.
        max_batch: the largest batch size the engine accepts (larger batches are split).
        workspace_mib: the workspace memory pool limit, in MiB.
        builder_optimization_level: TensorRT's builder optimization level, 0..5 (3 is its
            default; higher searches longer for faster kernels).
        tf32: allow TF32 for float32 layers (TensorRT's default).
        timing_cache: reuse and extend the machine's timing cache (faster builds).
        calibration_method: ``int8`` only: how activation ranges are computed.
        calibration_samples: ``int8`` only: how many calibration samples.
        per_channel: ``int8`` only: one weight scale per output channel.
        nodes_to_exclude: ONNX node names to keep in float32: left unquantized for ``int8``,
            left in float32 for ``fp16``; ignored for ``fp32``.
    """

    precision: Precision = "fp16"
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=32, ge=1)
    max_batch: int = Field(default=256, ge=1)
    workspace_mib: int = Field(default=1024, ge=1)
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    tf32: bool = True
    timing_cache: bool = True
    per_channel: bool = True  # unlike onnxruntime_static_int8, whose default is per tensor

    @model_validator(mode="after")
    def _check_batch_profile(self) -> Self:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"the batch profile needs min_batch <= opt_batch <= max_batch, got min_batch "
                f"{self.min_batch}, opt_batch {self.opt_batch}, max_batch {self.max_batch}"
            )
        return self


def profile_shapes(task: Task, config: TensorRTConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Return each input's (min, opt, max) shape: its example shape with the batch axis (0) replaced."""
    example = task.example_inputs(1)
    profile = {}
    for name in task.input_names:
        rest = tuple(int(size) for size in np.shape(example[name])[1:])
        profile[name] = ((config.min_batch, *rest), (config.opt_batch, *rest), (config.max_batch, *rest))
    return profile


def plan_engine(task: Task, config: TensorRTConfig) -> EnginePlan:
    """Return the build plan of ``config`` for ``task``."""
    return EnginePlan(
        precision=config.precision,
        onnx_source=ONNX_SOURCES[config.precision],
        profile=profile_shapes(task, config),
        workspace_bytes=config.workspace_mib << 20,
        builder_optimization_level=config.builder_optimization_level,
        tf32=config.tf32,
    )


def qdq_config(config: TensorRTConfig) -> OnnxRuntimeStaticInt8Config:
    """The ``onnxruntime_static_int8`` config whose QDQ model an INT8 engine is built from."""
    shared = {name: getattr(config, name) for name in StaticQuantizationConfig.model_fields}
    return OnnxRuntimeStaticInt8Config(
        **shared, quant_format="qdq", activation_type="int8", weight_type="int8", qdq_target="tensorrt"
    )


def prepare_onnx(ctx: BuildContext, config: TensorRTConfig) -> Path:
    """Make (on the CPU) the ONNX file the engine for ``config.precision`` is built from."""
    source = ONNX_SOURCES[config.precision]
    if source == "fp32_export":
        return export_onnx(ctx, config)
    if source == "fp16_conversion":
        return float16_model(ctx, config, config.nodes_to_exclude)
    return quantize_static_int8(ctx, qdq_config(config))


class TensorRT(Backend[TensorRTConfig]):
    """A TensorRT engine built from the exported (and converted or quantized) ONNX model."""

    name: ClassVar[str] = "tensorrt"
    Config: type[TensorRTConfig] = TensorRTConfig
    hardware: ClassVar[frozenset[Hardware]] = frozenset({"gpu"})
    # Not measured on a GPU yet (none was available). The ONNX files it builds from, run on ORT's
    # CPU provider, agree with FP32 on 100% of digits (360 samples) for fp32, fp16 and int8
    # (symmetric QDQ, minmax, per-channel); the margin is int8's.
    min_agreement_pct: ClassVar[float] = 97.0
    exclusion_field: ClassVar[str] = "nodes_to_exclude"

    def quantizable_layers(self, ctx: BuildContext, config: TensorRTConfig) -> list[tuple[str, str]]:
        """The nodes ``config.precision`` lowers (int8: those ``quantize_static`` quantizes; fp16:
        every node of the export; fp32: none): what ``nodes_to_exclude`` may keep in float32."""
        if config.precision == "fp32":
            return []
        fp32 = export_onnx(ctx, config)
        return static_quantizable_nodes(fp32) if config.precision == "int8" else convertible_nodes(fp32)

    def preflight(self, ctx: BuildContext, config: TensorRTConfig) -> None:
        """Export the model before any trial (runs on a CPU too; the engine build needs the GPU)."""
        preflight_export(self.name, ctx, config)

    def unavailable_reason(self) -> str | None:
        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            return "the 'tensorrt' package is not installed (pip install 'sweeper[tensorrt]'; it needs an NVIDIA GPU)"
        reason = cuda_unavailable_reason()
        if reason is not None:
            return reason
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:  # a wheel without its CUDA libraries fails here
            return f"the 'tensorrt' package does not import: {type(exc).__name__}: {exc}"
        if int(trt.__version__.split(".")[0]) < MIN_TENSORRT_MAJOR:
            return f"TensorRT {trt.__version__} is installed; this backend needs TensorRT {MIN_TENSORRT_MAJOR} or newer"
        return None

    def build(self, ctx: BuildContext, config: TensorRTConfig) -> TensorRTCandidate:
        self._require()
        plan = plan_engine(ctx.task, config)
        onnx_path = prepare_onnx(ctx, config)
        device = cuda_device(ctx)
        timing_cache = timing_cache_path(ctx, device) if config.timing_cache else None
        engine = build_engine(onnx_path, plan, device, timing_cache)
        return TensorRTCandidate(engine, ctx.task, device)

    def load(self, artifact: Path, ctx: BuildContext, config: TensorRTConfig) -> TensorRTCandidate:
        self._require()
        if not artifact.is_file():
            raise FileNotFoundError(f"no TensorRT engine at '{artifact}'")
        return TensorRTCandidate(artifact.read_bytes(), ctx.task, cuda_device(ctx))

    def _require(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"tensorrt cannot run here: {reason}")
