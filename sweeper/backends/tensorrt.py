"""TensorRT: an engine built from the ONNX model for one NVIDIA GPU, in FP32, FP16 or INT8.

Written against TensorRT 10 and 11's Python API: ``build_serialized_network``, the named-tensor
I/O API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), memory pools set with
``set_memory_pool_limit``, explicit batch only. TensorRT 11 removed the precision builder flags
(``BuilderFlag.FP16``, ``BuilderFlag.INT8``) and implicit INT8 calibrators in favour of strongly
typed networks, so every network here is strongly typed (the ``STRONGLY_TYPED`` creation flag,
required on 10.x and implied on 11.x) and the precision lives in the ONNX file:

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

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import Field, model_validator

from sweeper.backends._base import Backend, BuildContext, Candidate, Hardware
from sweeper.backends.onnx.config import OnnxExportConfig
from sweeper.backends.onnx.export import export_onnx
from sweeper.backends.onnxruntime_static_int8 import (
    CalibrationMethod,
    OnnxRuntimeStaticInt8Config,
)
from sweeper.backends.torch.device import cuda_device, cuda_unavailable_reason
from sweeper.errors import BackendUnavailableError
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "fp16", "int8"]
OnnxSource = Literal["fp32_export", "fp16_conversion", "qdq_int8"]

# Which ONNX file each precision builds from (see the module docstring).
ONNX_SOURCES: dict[str, OnnxSource] = {"fp32": "fp32_export", "fp16": "fp16_conversion", "int8": "qdq_int8"}
ENGINE_FILE = "model.engine"
MIN_TENSORRT_MAJOR = 10
# TensorRT data type names (trt.DataType members) to torch dtype names, for I/O buffers.
TORCH_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool",
}  # fmt: skip


class TensorRTConfig(OnnxExportConfig):
    """Settings of a TensorRT engine.

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
    calibration_method: CalibrationMethod = "minmax"
    calibration_samples: int = Field(default=128, ge=1)
    per_channel: bool = True
    nodes_to_exclude: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_batch_profile(self) -> Self:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"the batch profile needs min_batch <= opt_batch <= max_batch, got min_batch "
                f"{self.min_batch}, opt_batch {self.opt_batch}, max_batch {self.max_batch}"
            )
        return self


Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class EnginePlan:
    """Everything the engine build is given, decided without TensorRT or a GPU.

    Attributes:
        precision: the config's precision.
        onnx_source: which ONNX file the engine is built from.
        profile: for each input, its (min, opt, max) shapes.
        workspace_bytes: the workspace memory pool limit.
        builder_optimization_level: TensorRT's builder optimization level.
        tf32: whether TF32 stays allowed.
        strongly_typed: always true (see the module docstring).
    """

    precision: Precision
    onnx_source: OnnxSource
    profile: dict[str, tuple[Shape, Shape, Shape]]
    workspace_bytes: int
    builder_optimization_level: int
    tf32: bool
    strongly_typed: bool = True


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
    return OnnxRuntimeStaticInt8Config(
        **config.export_settings().model_dump(),
        calibration_method=config.calibration_method,
        calibration_samples=config.calibration_samples,
        per_channel=config.per_channel,
        quant_format="qdq",
        activation_type="int8",
        weight_type="int8",
        qdq_target="tensorrt",
        nodes_to_exclude=config.nodes_to_exclude,
    )


def prepare_onnx(ctx: BuildContext, config: TensorRTConfig) -> Path:
    """Make (on the CPU) the ONNX file the engine for ``config.precision`` is built from."""
    source = ONNX_SOURCES[config.precision]
    if source == "fp32_export":
        return export_onnx(ctx, config)
    if source == "fp16_conversion":
        from sweeper.backends.onnxruntime_fp16 import float16_model

        return float16_model(ctx, config, config.nodes_to_exclude)
    from sweeper.backends.onnxruntime_static_int8 import OnnxRuntimeStaticInt8

    return OnnxRuntimeStaticInt8().build(ctx, qdq_config(config)).path


def timing_cache_name(device_name: str, capability: tuple[int, int], tensorrt_version: str) -> str:
    """The timing cache's file name: one per GPU model and TensorRT version."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return f"timing-{gpu}-sm{capability[0]}{capability[1]}-trt{tensorrt_version}.cache"


class TensorRT(Backend[TensorRTConfig]):
    """A TensorRT engine built from the exported (and converted or quantized) ONNX model."""

    name: ClassVar[str] = "tensorrt"
    Config: type[TensorRTConfig] = TensorRTConfig
    hardware: ClassVar[frozenset[Hardware]] = frozenset({"gpu"})
    # Not measured on a GPU yet (none was available). The ONNX files it builds from, run on ORT's
    # CPU provider, agree with FP32 on 100% of digits (360 samples) for fp32, fp16 and int8
    # (symmetric QDQ, minmax, per-channel); the margin is int8's.
    min_agreement_pct: ClassVar[float] = 97.0

    def preflight(self, ctx: BuildContext, config: TensorRTConfig) -> None:
        """Export the model before any trial (runs on a CPU too; the engine build needs the GPU)."""
        from sweeper.backends.onnx.export import preflight_export

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
        timing_cache = _timing_cache_path(ctx, device) if config.timing_cache else None
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


def _timing_cache_path(ctx: BuildContext, device: str) -> Path:
    import tensorrt as trt
    import torch

    name = timing_cache_name(
        torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), trt.__version__
    )
    return ctx.cache_dir / "tensorrt" / name


def _logger() -> Any:
    """A TensorRT logger that keeps warnings and errors, for error messages."""
    import tensorrt as trt

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"{severity.name}: {msg}")

    return _Logger()


def build_engine(onnx_path: Path, plan: EnginePlan, device: str, timing_cache: Path | None) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine following ``plan`` (needs a GPU).

    Raises:
        RuntimeError: with the parser's or the builder's messages when either fails.
    """
    import tensorrt as trt
    import torch

    logger = _logger()
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        flags = 0
        if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected '{onnx_path.name}': {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        config.builder_optimization_level = plan.builder_optimization_level
        if not plan.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in plan.profile.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        if timing_cache is not None:
            known = timing_cache.read_bytes() if timing_cache.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(known), ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(
                f"TensorRT could not build a {plan.precision} engine from '{onnx_path.name}': "
                + (" | ".join(logger.messages[-8:]) or "no message")
            )
        if timing_cache is not None:
            _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _write_atomically(path: Path, data: bytes) -> None:
    # Trials on one machine may write the cache at once: the last whole file wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def batch_chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split ``n`` samples into engine-sized runs: ``(start, stop, padded_size)`` each.

    Runs hold at most ``max_batch`` samples; one smaller than ``min_batch`` is padded up to it.
    """
    chunks = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        chunks.append((start, stop, max(stop - start, min_batch)))
    return chunks


class TensorRTCandidate(Candidate):
    """A deserialized TensorRT engine with one execution context on a CUDA device."""

    def __init__(self, engine_bytes: bytes, task: Task, device: str) -> None:
        import tensorrt as trt
        import torch

        self.device = device
        self._engine_bytes = engine_bytes
        self._logger = _logger()  # TensorRT needs the logger to outlive the runtime and engine
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise RuntimeError(
                    "TensorRT could not load the engine (it loads only with the TensorRT version and GPU "
                    f"model that built it): {' | '.join(self._logger.messages[-4:]) or 'no message'}"
                )
            self.context = self.engine.create_execution_context()
            # A stream of its own: TensorRT syncs extra when enqueued on the legacy default stream.
            self._stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output = next((n for n in task.output_names if n in self.outputs), self.outputs[0])
        self.dtypes: dict[str, torch.dtype] = {
            n: getattr(torch, TORCH_DTYPES[self.engine.get_tensor_dtype(n).name]) for n in names
        }
        low, _, high = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])

    def predict(self, batch: Batch) -> np.ndarray:
        missing = [n for n in self.inputs if n not in batch]
        if missing:
            raise KeyError(f"the engine's inputs are {sorted(self.inputs)}; the batch has {sorted(batch)}")
        n = len(batch[self.inputs[0]])
        parts = []
        for start, stop, size in batch_chunks(n, self.min_batch, self.max_batch):
            rows = np.arange(start, start + size) % n if size > stop - start else slice(start, stop)
            parts.append(self._run({name: np.asarray(batch[name])[rows] for name in self.inputs})[: stop - start])
        return np.concatenate(parts)

    def _run(self, feeds: Batch) -> np.ndarray:
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            tensors = {}
            for name in self.inputs:
                # Inputs arrive as float32 numpy; the engine may want another type.
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, self.dtypes[name])
                tensors[name] = tensor
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run: {' | '.join(self._logger.messages[-4:])}")
            output = tensors[self.output].float().cpu()  # .cpu() waits for the stream
        return output.numpy()

    def _write(self, directory: Path) -> Path:
        target = directory / ENGINE_FILE
        target.write_bytes(self._engine_bytes)
        return target
