"""A TensorRT engine: built from an ONNX file following an :class:`EnginePlan`, and run.

Written against TensorRT 10 and 11's Python API: ``build_serialized_network``, the named-tensor
I/O API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), memory pools set with
``set_memory_pool_limit``, explicit batch only. TensorRT 11 removed the precision builder flags
(``BuilderFlag.FP16``, ``BuilderFlag.INT8``) and implicit INT8 calibrators in favour of strongly
typed networks, so every network here is strongly typed (the ``STRONGLY_TYPED`` creation flag,
required on 10.x and implied on 11.x) and the precision lives in the ONNX file (see
:mod:`sweeper.backends.tensorrt`).

The engine has one optimization profile for the dynamic batch axis; larger batches are split,
smaller ones padded. A timing cache per GPU model and TensorRT version is shared by the trials of
a machine. The artifact is the serialized engine (``model.engine``), which only loads with the
same TensorRT version on the same GPU model. Everything here but the plan needs a GPU and the
``[tensorrt]`` extra.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sweeper.backends import BuildContext, Candidate
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "fp16", "int8"]
OnnxSource = Literal["fp32_export", "fp16_conversion", "qdq_int8"]
ENGINE_FILE = "model.engine"
# TensorRT data type names (trt.DataType members) to torch dtype names, for I/O buffers.
TORCH_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool",
}  # fmt: skip
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


def timing_cache_name(device_name: str, capability: tuple[int, int], tensorrt_version: str) -> str:
    """The timing cache's file name: one per GPU model and TensorRT version."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")
    return f"timing-{gpu}-sm{capability[0]}{capability[1]}-trt{tensorrt_version}.cache"


def timing_cache_path(ctx: BuildContext, device: str) -> Path:
    """Where this machine keeps the timing cache of ``device``'s GPU model."""
    import tensorrt as trt
    import torch

    name = timing_cache_name(
        torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), trt.__version__
    )
    return ctx.cache_dir / "tensorrt" / name


def _logger() -> Any:
    """A TensorRT logger that keeps warnings and errors, for error messages."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
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
