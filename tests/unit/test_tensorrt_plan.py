"""The TensorRT backend: what is decided without TensorRT or a GPU, tested here for real.

Config validation, the optimization profile, the build plan, and the ONNX file each precision is
built from (made on the CPU: the FP32 export, its float16 conversion, the TensorRT-ready QDQ
model). Building and running engines needs an NVIDIA GPU and the ``[tensorrt]`` extra: those tests
are marked ``gpu`` and skip elsewhere. Nothing here imitates TensorRT.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from sweeper.backends import BuildContext, get_backend
from sweeper.backends.tensorrt import (
    ONNX_SOURCES,
    TensorRTConfig,
    plan_engine,
    prepare_onnx,
    profile_shapes,
    qdq_config,
)
from sweeper.backends.tensorrt_engine import TORCH_DTYPES, batch_chunks, timing_cache_name
from sweeper.errors import BackendUnavailableError
from sweeper.task import Batch, LabeledBatch, Task, load_task


def _usable() -> bool:
    return get_backend("tensorrt").unavailable_reason() is None


requires_tensorrt = pytest.mark.skipif(
    not _usable(), reason=f"tensorrt is unavailable here: {get_backend('tensorrt').unavailable_reason()}"
)

# --- config ------------------------------------------------------------------------------------


def test_defaults_and_json_round_trip() -> None:
    config = TensorRTConfig()
    assert (config.precision, config.min_batch, config.opt_batch, config.max_batch) == ("fp16", 1, 32, 256)
    custom = TensorRTConfig(precision="int8", min_batch=2, opt_batch=2, max_batch=64, workspace_mib=256,
                            builder_optimization_level=5, tf32=False, timing_cache=False, calibration_method="entropy",
                            calibration_samples=64, per_channel=False, nodes_to_exclude=("/a/Conv",))  # fmt: skip
    assert TensorRTConfig.model_validate_json(custom.model_dump_json()) == custom


@pytest.mark.parametrize(("values", "mentions"), [
    ({"min_batch": 8, "opt_batch": 4}, ("min_batch <= opt_batch <= max_batch", "min_batch 8, opt_batch 4")),
    ({"opt_batch": 512}, ("opt_batch 512, max_batch 256",)),
    ({"min_batch": 0}, ("min_batch", "greater than or equal to 1")),
    ({"precision": "fp8"}, ("'fp32'", "'fp16'", "'int8'")),
    ({"builder_optimization_level": 6}, ("builder_optimization_level", "less than or equal to 5")),
    ({"workspace_mib": 0}, ("workspace_mib",)),
    ({"calibration_method": "kl"}, ("'minmax'", "'entropy'")),
    ({"max_batch": 64.0}, ("max_batch", "integer")),
])  # fmt: skip
def test_invalid_configs_are_rejected(values: dict[str, Any], mentions: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        TensorRTConfig(**values)
    for words in mentions:
        assert words in str(info.value)


def test_declared_gpu_only_and_importable_without_tensorrt() -> None:
    backend = get_backend("tensorrt")
    assert backend.hardware == {"gpu"}
    assert backend.Config is TensorRTConfig


# --- profile and plan --------------------------------------------------------------------------


class _TwoInputs(Task):
    """Token ids and a mask of a fixed sequence length: two inputs sharing the batch axis."""

    name: ClassVar[str] = "two_inputs"
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

    def build_model(self) -> Any:
        raise NotImplementedError

    def example_inputs(self, batch_size: int = 1) -> Batch:
        return {name: np.ones((batch_size, 16), dtype=np.int64) for name in self.input_names}

    @property
    def calibration_size(self) -> int:
        return 1

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        yield self.example_inputs(n)

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        yield self.example_inputs(1), np.zeros(1, dtype=np.int64)


@pytest.fixture(scope="module")
def digits(digits_task_path: Path) -> Task:
    return load_task(str(digits_task_path))


def test_the_profile_replaces_only_the_batch_axis(digits: Task) -> None:
    config = TensorRTConfig(min_batch=2, opt_batch=16, max_batch=128)
    assert profile_shapes(digits, config) == {"input": ((2, 1, 8, 8), (16, 1, 8, 8), (128, 1, 8, 8))}
    two = profile_shapes(_TwoInputs(), config)
    assert two == {name: ((2, 16), (16, 16), (128, 16)) for name in ("input_ids", "attention_mask")}
    for low, opt, high in two.values():
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))


@pytest.mark.parametrize(("precision", "source"), [("fp32", "fp32_export"), ("fp16", "fp16_conversion"), ("int8", "qdq_int8")])
def test_the_plan_for_each_precision(precision: str, source: str, digits: Task) -> None:
    plan = plan_engine(digits, TensorRTConfig(precision=precision, workspace_mib=512, tf32=False))
    assert plan.precision == precision and plan.onnx_source == source == ONNX_SOURCES[precision]
    assert plan.workspace_bytes == 512 * 1024 * 1024
    assert plan.strongly_typed and not plan.tf32 and plan.builder_optimization_level == 3
    assert plan.profile == {"input": ((1, 1, 8, 8), (32, 1, 8, 8), (256, 1, 8, 8))}


def test_the_int8_model_is_the_static_backends_tensorrt_qdq() -> None:
    config = qdq_config(TensorRTConfig(precision="int8", opset=13, calibration_method="percentile", per_channel=False))
    assert (config.quant_format, config.activation_type, config.weight_type) == ("qdq", "int8", "int8")
    assert config.qdq_target == "tensorrt" and config.opset == 13
    assert (config.calibration_method, config.per_channel) == ("percentile", False)


@pytest.mark.parametrize(("n", "low", "high", "expected"), [
    (600, 1, 256, [(0, 256, 256), (256, 512, 256), (512, 600, 88)]),
    (7, 1, 256, [(0, 7, 7)]),
    (2, 4, 16, [(0, 2, 4)]),
    (18, 4, 16, [(0, 16, 16), (16, 18, 4)]),
])  # fmt: skip
def test_batches_are_split_to_the_profile_and_padded(n: int, low: int, high: int, expected: list) -> None:
    assert batch_chunks(n, low, high) == expected


def test_timing_cache_is_named_per_gpu_model_and_version() -> None:
    name = timing_cache_name("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35")
    assert name == "timing-NVIDIA_H100_80GB_HBM3-sm90-trt10.13.0.35.cache"


def test_every_io_type_maps_to_a_torch_dtype() -> None:
    import torch

    assert all(isinstance(getattr(torch, dtype), torch.dtype) for dtype in TORCH_DTYPES.values())


# --- the ONNX files, made on the CPU --------------------------------------------------------------


@pytest.fixture(scope="module")
def built_onnx(digits: Task, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = digits.build_model()
    cache = tmp_path_factory.mktemp("trt-cache")
    paths = {}
    for precision in ("fp32", "fp16", "int8"):
        workdir = tmp_path_factory.mktemp(f"trt-{precision}")
        ctx = BuildContext(model=model, task=digits, workdir=workdir, cache_dir=cache, num_threads=1)
        paths[precision] = prepare_onnx(ctx, TensorRTConfig(precision=precision, calibration_samples=64))
    return paths


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_fp32_builds_from_the_validated_export(built_onnx: dict[str, Path]) -> None:
    path = built_onnx["fp32"]
    assert path.with_name(f"{path.stem}.validation.json").is_file()
    assert {array.dtype for array in _initializers(path).values() if array.dtype.kind == "f"} == {np.dtype(np.float32)}


def test_fp16_builds_from_the_float16_conversion_with_float32_edges(built_onnx: dict[str, Path]) -> None:
    import onnx

    path = built_onnx["fp16"]
    graph = onnx.load(str(path)).graph
    assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}
    floats = {a.dtype for a in _initializers(path).values() if a.dtype.kind == "f"}
    assert floats == {np.dtype(np.float16)}


def test_int8_builds_from_a_qdq_model_tensorrt_accepts(built_onnx: dict[str, Path]) -> None:
    import onnx

    path = built_onnx["int8"]
    graph = onnx.load(str(path)).graph
    inits = _initializers(path)
    quantize = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert quantize, "no Q/DQ nodes"
    zero_points = [inits[n.input[2]] for n in quantize if len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # TensorRT rejects DequantizeLinear of int32 (quantized biases) and wants float weights.
    dequantized_constants = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert all(a.dtype != np.int32 for a in dequantized_constants)
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in graph.node if conv.input[1] in n.output)
    assert weight_dq.op_type == "DequantizeLinear"


def test_the_files_run_and_agree_on_the_cpu(built_onnx: dict[str, Path], digits: Task) -> None:
    import torch

    from sweeper.backends.onnx.runtime import OnnxCandidate

    model = digits.build_model()
    batches = [batch for batch, _ in digits.eval_batches()]
    with torch.inference_mode():
        expected = np.concatenate([model(torch.from_numpy(b["input"])).numpy() for b in batches])
    for precision, path in built_onnx.items():
        actual = np.concatenate([OnnxCandidate(path, 1).predict(b) for b in batches])
        agreement = float(np.mean(actual.argmax(-1) == expected.argmax(-1)) * 100)
        assert agreement >= get_backend("tensorrt").min_agreement_pct, precision


def test_quantizable_layers_follow_the_precision(digits: Task, tmp_path: Path) -> None:
    from sweeper.backends.onnx.export import export_onnx
    from sweeper.backends.onnxruntime_fp16 import convertible_nodes
    from sweeper.backends.onnxruntime_static_int8 import static_quantizable_nodes

    backend = get_backend("tensorrt")
    assert backend.exclusion_field == "nodes_to_exclude"
    ctx = BuildContext(model=digits.build_model(), task=digits, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    fp32 = export_onnx(ctx, backend.config({}))
    assert backend.quantizable_layers(ctx, backend.config({"precision": "int8"})) == static_quantizable_nodes(fp32)
    assert backend.quantizable_layers(ctx, backend.config({"precision": "fp16"})) == convertible_nodes(fp32)
    assert backend.quantizable_layers(ctx, backend.config({"precision": "fp32"})) == []


# --- without TensorRT or a GPU ------------------------------------------------------------------


@pytest.mark.skipif(_usable(), reason="tensorrt is usable here")
def test_unavailable_with_the_reason_and_build_refuses(digits: Task, tmp_path: Path) -> None:
    backend = get_backend("tensorrt")
    reason = backend.unavailable_reason()
    assert reason is not None
    if importlib.util.find_spec("tensorrt") is None:
        assert "sweeper[tensorrt]" in reason
    else:
        assert "CUDA" in reason or "TensorRT" in reason
    ctx = BuildContext(model=digits.build_model(), task=digits, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    with pytest.raises(BackendUnavailableError, match="tensorrt cannot run here"):
        backend.build(ctx, TensorRTConfig())


# --- on a GPU with TensorRT -------------------------------------------------------------------------


@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_build_run_reload_and_agree(precision: str, digits: Task, tmp_path: Path) -> None:
    import torch

    backend = get_backend("tensorrt")
    model = digits.build_model()
    ctx = BuildContext(model=model, task=digits, workdir=tmp_path, cache_dir=tmp_path / "cache", num_threads=1)
    config = TensorRTConfig(precision=precision, min_batch=2, opt_batch=8, max_batch=64, workspace_mib=256)
    candidate = backend.build(ctx, config)
    assert list((tmp_path / "cache" / "tensorrt").glob("timing-*.cache")), "no timing cache written"
    batches = [batch for batch, _ in digits.eval_batches()]  # batches of 256 > max_batch: split
    with torch.inference_mode():
        expected = np.concatenate([model(torch.from_numpy(b["input"])).numpy() for b in batches])
    actual = np.concatenate([candidate.predict(b) for b in batches])
    agreement = float(np.mean(actual.argmax(-1) == expected.argmax(-1)) * 100)
    print(f"tensorrt {precision}: agreement {agreement:.2f}%, max error {np.abs(actual - expected).max():.3g}")
    assert agreement >= backend.min_agreement_pct
    one = candidate.predict(digits.example_inputs(1))  # below min_batch: padded
    assert one.shape == (1, 10) and one.dtype == np.float32
    loaded = backend.load(candidate.save(tmp_path / "artifact"), ctx, config)
    np.testing.assert_array_equal(loaded.predict(batches[0]), candidate.predict(batches[0]))
