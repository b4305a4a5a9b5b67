"""The backend contract, run once for every registered backend (Optuna's sampler-test pattern).

Each case builds a candidate on a real task and checks: predictions have the FP32 output's shape
for batch sizes 1 and 7; the artifact saves, has a size, and reloads into a candidate that predicts
the same; and top-1 agreement with FP32 on the evaluation split reaches the backend's
``min_agreement_pct``. A backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sweeper.backends import (
    BACKENDS,
    Backend,
    BackendConfig,
    BuildContext,
    Candidate,
    get_backend,
)
from sweeper.task import Task, load_task

ROOT = Path(__file__).resolve().parents[2]
TASK_FILES = {"digits": ROOT / "tasks" / "digits_cnn.py", "gru": ROOT / "tasks" / "mnist1d_gru.py"}
# Backends for which recurrent layers matter: they also run on the GRU task.
RECURRENT = {"onnxruntime_fp32", "onnxruntime_dynamic_int8", "torch_dynamic_int8", "torchscript"}
# Non-default configs exercised besides each backend's default one (on the digits task).
EXTRA_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "onnxruntime_fp32": [{"exporter": "dynamo", "opset": 18}],
    "onnxruntime_static_int8": [
        {"quant_format": "qoperator"},
        {"calibration_method": "entropy", "calibration_samples": 100},
        {"calibration_method": "percentile", "per_channel": True},
        {"calibration_method": "distribution", "activation_type": "int8", "calibration_samples": 64},
        {"quant_format": "qoperator", "activation_type": "int8", "per_channel": True, "reduce_range": True},
        {"qdq_target": "tensorrt", "activation_type": "int8", "per_channel": True},
    ],
    "onnxruntime_dynamic_int8": [{"quantize_conv": True, "weight_type": "uint8", "per_channel": True}],
    "torch_dynamic_int8": [{"engine": "qnnpack", "layers": ("linear",)}],
    "torch_static_int8": [
        {"engine": "qnnpack", "per_channel": False, "observer": "minmax", "calibration_samples": 32},
        {"engine": "fbgemm", "observer": "moving_average", "excluded_layers": ("classifier.3", "features.0")},
    ],
    "torch_qat_int8": [
        {"engine": "fbgemm", "per_channel": False, "epochs": 1, "learning_rate": 3e-4, "excluded_layers": ("features.7",)}
    ],
    "torchscript": [{"mode": "script", "freeze": False}, {"mode": "trace", "optimize_for_inference": True}],
    "torch_autocast": [{"dtype": "float16"}],
    "onnxruntime_fp16": [{"simplify": "onnxslim", "nodes_to_exclude": ("/classifier/classifier.3/Gemm",)}],
}


@dataclass(frozen=True)
class Case:
    backend: str
    task: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        settings = ",".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in self.values.items())
        return f"{self.backend}-{self.task}" + (f"-{settings}" if settings else "")


def _cases() -> list[Case]:
    cases = []
    for name in BACKENDS:
        for task in ("digits", "gru") if name in RECURRENT else ("digits",):
            cases.append(Case(name, task))
        cases.extend(Case(name, "digits", values) for values in EXTRA_CONFIGS.get(name, []))
    return cases


@dataclass(frozen=True)
class Reference:
    """A task, its FP32 model and the model's outputs on the evaluation split."""

    task: Task
    model: Any
    eval_inputs: list[dict[str, np.ndarray]]
    outputs: np.ndarray


@cache
def _reference(task_key: str) -> Reference:
    import torch

    task = load_task(str(TASK_FILES[task_key].resolve()))
    model = task.build_model()
    inputs = [batch for batch, _ in task.eval_batches()]
    with torch.inference_mode():
        outputs = [model(*(torch.from_numpy(b[n]) for n in task.input_names)).numpy() for b in inputs]
    return Reference(task=task, model=model, eval_inputs=inputs, outputs=np.concatenate(outputs))


def _fp32(ref: Reference, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return ref.model(*(torch.from_numpy(batch[n]) for n in ref.task.input_names)).numpy()


def _predict_eval(candidate: Candidate, ref: Reference) -> np.ndarray:
    return np.concatenate([candidate.predict(batch) for batch in ref.eval_inputs])


@dataclass
class Built:
    backend: Backend
    config: BackendConfig
    ctx: BuildContext
    ref: Reference
    candidate: Candidate


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session, as trials on one machine share theirs."""
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="class", params=_cases(), ids=lambda case: case.id)
def built(request: pytest.FixtureRequest, shared_cache_dir: Path) -> Iterator[Built]:
    case: Case = request.param
    backend = get_backend(case.backend)
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{case.backend} is unavailable here: {reason}")
    ref = _reference(case.task)
    config = backend.Config(**case.values)
    with tempfile.TemporaryDirectory(prefix="contract-") as workdir:
        ctx = BuildContext(
            model=ref.model, task=ref.task, workdir=Path(workdir), cache_dir=shared_cache_dir, num_threads=1
        )
        yield Built(backend, config, ctx, ref, backend.build(ctx, config))


class TestBackendContract:
    """What every backend promises, whatever it does inside."""

    @pytest.mark.parametrize("batch_size", [1, 7])
    def test_predict_matches_the_fp32_output_shape(self, built: Built, batch_size: int) -> None:
        batch = built.ref.task.example_inputs(batch_size)
        out = built.candidate.predict(batch)
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.float32
        assert out.shape == _fp32(built.ref, batch).shape

    def test_size_needs_a_saved_artifact(self, built: Built) -> None:
        fresh = built.backend.build(built.ctx, built.config)
        with pytest.raises(RuntimeError, match="save"):
            fresh.size_bytes()

    def test_saved_artifact_reloads_and_predicts_the_same(self, built: Built, tmp_path: Path) -> None:
        artifact = built.candidate.save(tmp_path / "artifact")
        assert artifact.exists()
        assert artifact.is_relative_to(tmp_path / "artifact")
        assert built.candidate.size_bytes() > 0
        loaded = built.backend.load(artifact, built.ctx, built.config)
        np.testing.assert_array_equal(_predict_eval(loaded, built.ref), _predict_eval(built.candidate, built.ref))

    def test_top1_agreement_with_fp32(self, built: Built) -> None:
        outputs = _predict_eval(built.candidate, built.ref)
        assert outputs.shape == built.ref.outputs.shape
        agreement = float(np.mean(outputs.argmax(-1) == built.ref.outputs.argmax(-1)) * 100.0)
        assert agreement >= built.backend.min_agreement_pct, (
            f"{built.backend.name} {built.config.model_dump()} agrees with FP32 on {agreement:.2f}% "
            f"of '{built.ref.task.name}' (needs {built.backend.min_agreement_pct}%)"
        )

    def test_build_leaves_the_fp32_model_untouched(self, built: Built) -> None:
        from sweeper.backends import model_fingerprint

        assert not built.ref.model.training
        assert model_fingerprint(built.ref.model) == model_fingerprint(built.ref.task.build_model())


# --- behaviour particular to one backend ------------------------------------------------------


def _context(ref: Reference, cache_dir: Path, workdir: Path) -> BuildContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return BuildContext(model=ref.model, task=ref.task, workdir=workdir, cache_dir=cache_dir, num_threads=1)


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 17), ("dynamo", 18)])
def test_a_model_that_will_not_export_names_task_exporter_opset_and_reason(
    exporter: str, opset: int, tmp_path: Path
) -> None:
    from sweeper.backends.onnx.config import OnnxExportError
    from sweeper.errors import SweeperInputError

    task = load_task(str(ROOT / "tests" / "fixtures" / "tasks" / "digits_unexportable.py"))
    ctx = BuildContext(model=task.build_model(), task=task, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    backend = get_backend("onnxruntime_fp32")
    with pytest.raises(OnnxExportError) as info:
        backend.build(ctx, backend.Config(exporter=exporter, opset=opset))
    message = str(info.value)
    assert isinstance(info.value, SweeperInputError)
    assert f"task '{task.name}'" in message and f"exporter '{exporter}'" in message and f"opset {opset}" in message
    assert "cummax" in message
    assert "\x1b[" not in message and len(message) < 1500
    assert not list((tmp_path / "onnx").glob("*.onnx")), "a failed export must not leave a cache entry"


def test_the_export_is_cached_per_machine(shared_cache_dir: Path, tmp_path: Path) -> None:
    from sweeper.backends.onnx.export import export_onnx

    ctx = _context(_reference("digits"), shared_cache_dir, tmp_path)
    first = export_onnx(ctx, opset=17, exporter="torchscript")
    stamp = first.stat().st_mtime_ns
    assert export_onnx(ctx, opset=17, exporter="torchscript") == first
    assert first.stat().st_mtime_ns == stamp
    assert export_onnx(ctx, opset=13, exporter="torchscript") != first


def test_static_calibration_ranges_are_cached_and_reused(shared_cache_dir: Path, tmp_path: Path) -> None:
    backend = get_backend("onnxruntime_static_int8")
    ref = _reference("digits")
    config = backend.Config(calibration_method="percentile", calibration_samples=48)
    first = backend.build(_context(ref, shared_cache_dir, tmp_path / "a"), config)
    (ranges,) = (shared_cache_dir / "calibration").glob("*-percentile-48-*.json")
    stamp = ranges.stat().st_mtime_ns
    # Another format and weight layout reuses the ranges: same method and sample count.
    other = backend.Config(calibration_method="percentile", calibration_samples=48, quant_format="qoperator")
    backend.build(_context(ref, shared_cache_dir, tmp_path / "b"), other)
    again = backend.build(_context(ref, shared_cache_dir, tmp_path / "c"), config)
    assert ranges.stat().st_mtime_ns == stamp
    batch = ref.eval_inputs[0]
    np.testing.assert_array_equal(again.predict(batch), first.predict(batch))


def test_static_calibration_samples_beyond_the_task_are_rejected(shared_cache_dir: Path, tmp_path: Path) -> None:
    from sweeper.errors import TaskError

    backend = get_backend("onnxruntime_static_int8")
    ref = _reference("digits")
    too_many = ref.task.calibration_size + 1
    with pytest.raises(TaskError, match=f"1..{ref.task.calibration_size}"):
        backend.build(_context(ref, shared_cache_dir, tmp_path), backend.Config(calibration_samples=too_many))


def test_static_nodes_to_exclude_stay_in_float(shared_cache_dir: Path, tmp_path: Path) -> None:
    import onnx

    from sweeper.backends.onnx.export import export_onnx

    backend = get_backend("onnxruntime_static_int8")
    ref = _reference("digits")
    ctx = _context(ref, shared_cache_dir, tmp_path)
    nodes = backend.quantizable_nodes(export_onnx(ctx, opset=17, exporter="torchscript"))
    convs = [name for name, op in nodes if op == "Conv"]
    assert len(convs) == 3
    config = backend.Config(quant_format="qoperator", nodes_to_exclude=(convs[0],))
    artifact = backend.build(ctx, config).save(tmp_path / "artifact")
    ops = [node.op_type for node in onnx.load(str(artifact)).graph.node]
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == 2


@pytest.mark.parametrize("disabled", [True, False])
def test_a_qdq_layer_left_in_float_keeps_float_weights_in_the_session(
    disabled: bool, shared_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT's WeightBiasQuantization quantizes an excluded Conv's weights per tensor when a session
    opens (its input comes from a DequantizeLinear); the sessions this package opens keep them in
    float. ``disabled=False`` shows the optimization does it when left on."""
    import onnx

    from sweeper.backends.onnx import runtime
    from sweeper.backends.onnx.export import export_onnx

    if not disabled:
        monkeypatch.setattr(runtime, "DISABLED_OPTIMIZERS", ())
    backend = get_backend("onnxruntime_static_int8")
    ctx = _context(_reference("digits"), shared_cache_dir, tmp_path)
    nodes = backend.quantizable_nodes(export_onnx(ctx, opset=17, exporter="torchscript"))
    convs = [name for name, op in nodes if op == "Conv"]
    candidate = backend.build(ctx, backend.Config(per_channel=True, nodes_to_exclude=(convs[1],)))
    runtime.make_session(candidate.path, 1, optimized_to=tmp_path / "optimized.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # The two quantized Convs run as QLinearConv; the excluded one too when its weights were quantized.
    assert ops.count("QLinearConv") == (2 if disabled else 3), ops


@pytest.mark.parametrize("name", ["onnxruntime_static_int8", "onnxruntime_dynamic_int8"])
def test_unknown_nodes_to_exclude_are_rejected_with_the_quantizable_ones(
    name: str, shared_cache_dir: Path, tmp_path: Path
) -> None:
    from sweeper.errors import ConfigError

    backend = get_backend(name)
    ref = _reference("digits")
    with pytest.raises(ConfigError, match=r"not quantizable nodes of task 'digits_cnn'.*Quantizable nodes: '/"):
        backend.build(_context(ref, shared_cache_dir, tmp_path), backend.Config(nodes_to_exclude=("no_such_node",)))


def test_dynamic_int8_leaves_conv_in_float_unless_asked(shared_cache_dir: Path, tmp_path: Path) -> None:
    import onnx

    backend = get_backend("onnxruntime_dynamic_int8")
    ref = _reference("digits")
    for quantize_conv, expected in ((False, "Conv"), (True, "ConvInteger")):
        candidate = backend.build(_context(ref, shared_cache_dir, tmp_path), backend.Config(quantize_conv=quantize_conv))
        ops = {node.op_type for node in onnx.load(str(candidate.save(tmp_path / str(quantize_conv)))).graph.node}
        assert expected in ops and "MatMulInteger" in ops


def test_torch_dynamic_int8_quantizes_only_the_chosen_layers(tmp_path: Path) -> None:
    backend = get_backend("torch_dynamic_int8")
    ref = _reference("gru")
    ctx = _context(ref, tmp_path, tmp_path)
    kinds = {
        layers: {type(m).__module__ for m in backend.build(ctx, backend.Config(layers=layers)).module.modules()}
        for layers in (("linear",), ("gru",))
    }
    assert any("quantized.dynamic" in k and "linear" in k for k in kinds[("linear",)])
    assert not any("quantized.dynamic" in k and "rnn" in k for k in kinds[("linear",)])
    assert any("quantized.dynamic" in k and "rnn" in k for k in kinds[("gru",)])


def test_dynamic_nodes_to_exclude_name_the_exported_gemm_nodes(shared_cache_dir: Path, tmp_path: Path) -> None:
    import onnx

    from sweeper.backends.onnx.export import export_onnx

    backend = get_backend("onnxruntime_dynamic_int8")
    ctx = _context(_reference("digits"), shared_cache_dir, tmp_path)
    nodes = backend.quantizable_nodes(export_onnx(ctx, opset=17, exporter="torchscript"))
    gemms = [name for name, op in nodes if op == "Gemm"]
    assert len(gemms) == 2

    def integer_matmuls(config: BackendConfig, folder: str) -> int:
        artifact = backend.build(ctx, config).save(tmp_path / folder)
        return [node.op_type for node in onnx.load(str(artifact)).graph.node].count("MatMulInteger")

    assert integer_matmuls(backend.Config(), "all") == 2
    assert integer_matmuls(backend.Config(nodes_to_exclude=(gemms[0],)), "one") == 1
