"""FP16 and mixed precision backends: configs, availability, and what runs on a CPU.

``torch_fp16`` and ``torch_autocast`` with ``device="cuda"`` need a CUDA GPU: here they must be
unavailable with a reason, and the tests marked ``gpu`` run them where a GPU exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from sweeper.backends import BuildContext, get_backend
from sweeper.errors import BackendUnavailableError, ConfigError
from sweeper.task import load_task


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
without_cuda = pytest.mark.skipif(_cuda(), reason="a CUDA GPU is available here")

# --- configs -----------------------------------------------------------------------------------

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("torch_fp16", {}),
    ("torch_fp16", {"channels_last": True}),
    ("torch_autocast", {}),
    ("torch_autocast", {"device": "cuda", "dtype": "float16"}),
    ("torch_autocast", {"device": "cpu", "dtype": "float16"}),
    ("onnxruntime_fp16", {}),
    ("onnxruntime_fp16", {"exporter": "dynamo", "opset": 18, "simplify": "onnxsim", "nodes_to_exclude": ("/head/Gemm",)}),
]


@pytest.mark.parametrize(("name", "values"), CONFIGS)
def test_configs_round_trip_through_json(name: str, values: dict[str, Any]) -> None:
    config_cls = get_backend(name).Config
    config = config_cls(**values)
    assert config_cls.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(("name", "values", "mentions"), [
    ("torch_autocast", {"device": "mps"}, ("'cpu'", "'cuda'")),
    ("torch_autocast", {"dtype": "float32"}, ("'bfloat16'", "'float16'")),
    ("torch_fp16", {"channels_last": "yes"}, ("channels_last", "boolean")),
    ("torch_fp16", {"half": True}, ("half", "Extra inputs are not permitted")),
    ("onnxruntime_fp16", {"nodes_to_exclude": "/head/Gemm"}, ("nodes_to_exclude", "tuple")),
])  # fmt: skip
def test_invalid_configs_are_rejected(name: str, values: dict[str, Any], mentions: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        get_backend(name).Config(**values)
    for words in mentions:
        assert words in str(info.value)


def test_hardware_is_declared_honestly() -> None:
    assert get_backend("torch_fp16").hardware == {"gpu"}
    assert get_backend("torch_autocast").hardware == {"cpu", "gpu"}
    assert get_backend("onnxruntime_fp16").hardware == {"cpu"}


# --- availability without a GPU ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_task_path: Path) -> tuple[Any, Any]:
    task = load_task(str(digits_task_path))
    return task, task.build_model()


def _ctx(digits: tuple[Any, Any], tmp_path: Path, cache: Path | None = None) -> BuildContext:
    task, model = digits
    return BuildContext(model=model, task=task, workdir=tmp_path, cache_dir=cache or tmp_path, num_threads=1)


def test_torch_fp16_is_unavailable_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_backend("torch_fp16").unavailable_reason()
    assert reason is not None and "no CUDA GPU" in reason


@without_cuda
def test_building_on_cuda_without_a_gpu_says_why(digits: tuple, tmp_path: Path) -> None:
    fp16 = get_backend("torch_fp16")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        fp16.build(_ctx(digits, tmp_path), fp16.Config())
    autocast = get_backend("torch_autocast")
    with pytest.raises(BackendUnavailableError, match="device 'cuda' cannot run here: no CUDA GPU"):
        autocast.build(_ctx(digits, tmp_path), autocast.Config(device="cuda", dtype="float16"))


# --- on the CPU --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_on_cpu_takes_float32_and_returns_float32(dtype: str, digits: tuple, tmp_path: Path) -> None:
    import torch

    task, model = digits
    backend = get_backend("torch_autocast")
    candidate = backend.build(_ctx(digits, tmp_path), backend.Config(device="cpu", dtype=dtype))
    batch = task.example_inputs(7)
    out = candidate.predict(batch)
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch["input"])).numpy()
    assert out.dtype == np.float32 and out.shape == expected.shape
    # Reduced precision really ran: the outputs differ from FP32, but only by rounding.
    assert 0 < np.abs(out - expected).max() < 0.1 * np.abs(expected).max()


def test_an_autocast_dtype_torch_would_silently_ignore_is_refused() -> None:
    from sweeper.backends.torch_autocast import check_autocast

    check_autocast("cpu", "bfloat16")
    # torch's CPU autocast does not take float64: it warns and runs float32, which the check catches.
    with pytest.raises(ConfigError, match="does not run float64 autocast on 'cpu'"):
        check_autocast("cpu", "float64")


def test_half_inputs_are_cast_at_the_candidate_boundary(digits: tuple) -> None:
    import copy

    import torch

    from sweeper.backends.torch.device import DeviceTorchCandidate

    task, model = digits
    candidate = DeviceTorchCandidate(copy.deepcopy(model).half(), task.input_names, 1, input_dtype=torch.float16)
    out = candidate.predict(task.example_inputs(3))  # float32 in, float16 inside, float32 out
    assert out.dtype == np.float32 and out.shape == (3, 10)


def test_onnxruntime_fp16_converts_weights_and_keeps_float32_at_the_edges(
    digits: tuple, tmp_path: Path
) -> None:
    import onnx

    backend = get_backend("onnxruntime_fp16")
    kept = "/classifier/classifier.3/Gemm"
    candidate = backend.build(_ctx(digits, tmp_path), backend.Config(nodes_to_exclude=(kept,)))
    graph = onnx.load(str(candidate.save(tmp_path / "artifact"))).graph
    elem = onnx.TensorProto
    assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {elem.FLOAT}
    types = {init.name: init.data_type for init in graph.initializer}
    gemm = next(node for node in graph.node if node.name == kept)
    assert types[gemm.input[1]] == elem.FLOAT  # the excluded node keeps float32 weights
    assert sum(t == elem.FLOAT16 for t in types.values()) >= 6  # the convolutions' weights are float16
    assert candidate.predict(digits[0].example_inputs(7)).dtype == np.float32


def test_onnxruntime_fp16_rejects_unknown_nodes_and_reuses_its_conversion(digits: tuple, tmp_path: Path) -> None:
    backend = get_backend("onnxruntime_fp16")
    with pytest.raises(ConfigError, match=r"\['/no/Such'\].*'/features/features.0/Conv' \(Conv\)"):
        backend.build(_ctx(digits, tmp_path), backend.Config(nodes_to_exclude=("/no/Such",)))
    first = backend.build(_ctx(digits, tmp_path), backend.Config()).path
    stamp = first.stat().st_mtime_ns
    assert backend.build(_ctx(digits, tmp_path), backend.Config()).path == first
    assert first.stat().st_mtime_ns == stamp


# --- on a CUDA GPU -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), [
    ("torch_fp16", {}),
    ("torch_fp16", {"channels_last": True}),
    ("torch_autocast", {"device": "cuda", "dtype": "float16"}),
    ("torch_autocast", {"device": "cuda", "dtype": "bfloat16"}),
])  # fmt: skip
@pytest.mark.gpu
@requires_cuda
def test_cuda_candidates_agree_with_fp32_and_reload(
    name: str, values: dict[str, Any], digits: tuple, tmp_path: Path
) -> None:
    import torch

    task, model = digits
    backend = get_backend(name)
    config = backend.Config(**values)
    candidate = backend.build(_ctx(digits, tmp_path), config)
    batches = [batch for batch, _ in task.eval_batches()]
    with torch.inference_mode():
        expected = np.concatenate([model(torch.from_numpy(b["input"])).numpy() for b in batches])
    actual = np.concatenate([candidate.predict(b) for b in batches])
    agreement = float(np.mean(actual.argmax(-1) == expected.argmax(-1)) * 100)
    print(f"{name} {values}: agreement {agreement:.2f}%, max error {np.abs(actual - expected).max():.3g}")
    assert agreement >= backend.min_agreement_pct
    loaded = backend.load(candidate.save(tmp_path / "artifact"), _ctx(digits, tmp_path), config)
    np.testing.assert_array_equal(loaded.predict(batches[0]), candidate.predict(batches[0]))


def test_onnxruntime_fp16_exclusion_field_takes_its_quantizable_layers(digits: tuple, tmp_path: Path) -> None:
    backend = get_backend("onnxruntime_fp16")
    assert backend.exclusion_field == "nodes_to_exclude"
    layers = backend.quantizable_layers(_ctx(digits, tmp_path), backend.config({}))
    assert ("/classifier/classifier.3/Gemm", "Gemm") in layers and ("/features/features.0/Conv", "Conv") in layers
    config = backend.config({backend.exclusion_field: [layers[0][0]]})
    assert backend.build(_ctx(digits, tmp_path), config).predict(digits[0].example_inputs(2)).shape == (2, 10)

