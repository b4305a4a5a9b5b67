"""Backend configs: validation with clear errors, JSON round trips, and the backend registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from sweeper.backends import BACKENDS, Backend, BackendConfig, get_backend
from sweeper.backends.onnx.runtime import check_nodes_to_exclude
from sweeper.backends.onnxruntime_static_int8 import _even_batches
from sweeper.errors import ConfigError

# Non-default configs of every backend; each backend's default config is added below.
NON_DEFAULT: dict[str, list[dict[str, Any]]] = {
    "onnxruntime_fp32": [{"opset": 13}, {"exporter": "dynamo", "opset": 21}, {"exporter": "torchscript", "opset": 20}],
    "onnxruntime_static_int8": [
        {
            "opset": 18,
            "exporter": "dynamo",
            "calibration_method": "entropy",
            "calibration_samples": 300,
            "per_channel": True,
            "quant_format": "qoperator",
            "activation_type": "int8",
            "weight_type": "int8",
            "reduce_range": True,
            "nodes_to_exclude": ("/features/features.0/Conv", "/classifier/classifier.1/Gemm"),
        },
        {"calibration_method": "percentile", "activation_type": "uint8", "weight_type": "uint8"},
        {"calibration_method": "distribution"},
    ],
    "onnxruntime_dynamic_int8": [
        {"weight_type": "uint8", "per_channel": True, "reduce_range": True, "quantize_conv": True},
        {"nodes_to_exclude": ("/head/MatMul",), "exporter": "dynamo", "opset": 18},
    ],
    "torch_dynamic_int8": [{"layers": ("gru",), "engine": "qnnpack"}, {"layers": ("linear", "lstm"), "engine": "onednn"}],
}


def _configs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, {}) for name in BACKENDS] + [(name, c) for name, cs in NON_DEFAULT.items() for c in cs]


def _config_cls(name: str) -> type[BackendConfig]:
    return get_backend(name).Config


# --- registry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_get_backend_returns_the_named_backend(name: str) -> None:
    backend = get_backend(name)
    assert isinstance(backend, Backend)
    assert backend.name == name
    assert issubclass(backend.Config, BackendConfig)
    assert backend.hardware <= {"cpu", "gpu"} and backend.hardware
    assert 0.0 < backend.min_agreement_pct <= 100.0


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_is_usable_here(name: str) -> None:
    # Everything the CPU backends need is a core dependency of the project; GPU-only backends
    # (torch_fp16, tensorrt) are checked by tests/gpu on a GPU machine.
    backend = get_backend(name)
    if "cpu" not in backend.hardware:
        pytest.skip(f"{name} runs on {', '.join(sorted(backend.hardware))} only")
    assert backend.unavailable_reason() is None


def test_unknown_backend_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError) as info:
        get_backend("onnxruntime_static_int")
    message = str(info.value)
    assert "Did you mean 'onnxruntime_static_int8'?" in message
    assert all(name in message for name in BACKENDS)


def test_unknown_backend_without_a_close_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="Known backends: .*torch_dynamic_int8"):
        get_backend("tensorflow_lite")


# --- JSON round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), _configs(), ids=lambda v: v if isinstance(v, str) else None)
def test_config_round_trips_through_json(name: str, values: dict[str, Any]) -> None:
    config = _config_cls(name)(**values)
    restored = _config_cls(name).model_validate_json(config.model_dump_json())
    assert restored == config
    assert restored.model_dump() == config.model_dump()


@pytest.mark.parametrize(("name", "values"), _configs(), ids=lambda v: v if isinstance(v, str) else None)
def test_config_round_trips_through_a_python_dict(name: str, values: dict[str, Any]) -> None:
    config = _config_cls(name)(**values)
    assert _config_cls(name).model_validate(config.model_dump()) == config


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """A config value that validation must reject, and words the error must contain."""

    backend: str
    values: dict[str, Any]
    mentions: tuple[str, ...]


REJECTED = [
    # wrong types (configs are strict: no silent coercion)
    Rejected("onnxruntime_static_int8", {"calibration_samples": "64"}, ("calibration_samples", "integer")),
    Rejected("onnxruntime_static_int8", {"calibration_samples": 64.0}, ("calibration_samples", "integer")),
    Rejected("onnxruntime_static_int8", {"per_channel": 1}, ("per_channel", "boolean")),
    Rejected("onnxruntime_fp32", {"opset": "17"}, ("opset", "integer")),
    Rejected("onnxruntime_dynamic_int8", {"nodes_to_exclude": "/head/MatMul"}, ("nodes_to_exclude", "tuple")),
    # ranges
    Rejected("onnxruntime_static_int8", {"calibration_samples": 0}, ("calibration_samples", "greater than or equal to 1")),
    Rejected("onnxruntime_fp32", {"opset": 12}, ("opset", "greater than or equal to 13")),
    Rejected("onnxruntime_fp32", {"opset": 22, "exporter": "dynamo"}, ("opset", "less than or equal to 21")),
    # bad literals name the allowed values
    Rejected("onnxruntime_static_int8", {"calibration_method": "kl"}, ("'minmax'", "'entropy'", "'percentile'", "'distribution'")),
    Rejected("onnxruntime_static_int8", {"quant_format": "QDQ"}, ("'qdq'", "'qoperator'")),
    Rejected("onnxruntime_static_int8", {"activation_type": "int4"}, ("'int8'", "'uint8'")),
    Rejected("onnxruntime_dynamic_int8", {"weight_type": "int16"}, ("'int8'", "'uint8'")),
    Rejected("onnxruntime_fp32", {"exporter": "onnxscript"}, ("'torchscript'", "'dynamo'")),
    Rejected("torch_dynamic_int8", {"engine": "mkldnn"}, ("'x86'", "'fbgemm'", "'qnnpack'", "'onednn'")),
    Rejected("torch_dynamic_int8", {"weight_dtype": "float16"}, ("'qint8'",)),
    Rejected("torch_dynamic_int8", {"layers": ("linear", "conv")}, ("'linear'", "'lstm'", "'gru'")),
    # combinations
    Rejected("onnxruntime_fp32", {"exporter": "torchscript", "opset": 21}, ("torchscript", "13..20", "dynamo")),
    Rejected("onnxruntime_static_int8", {"exporter": "dynamo", "opset": 17}, ("dynamo", "18..21", "torchscript")),
    Rejected(
        "onnxruntime_static_int8",
        {"activation_type": "int8", "weight_type": "uint8"},
        ("activation_type 'int8' with weight_type 'uint8'", "(uint8, int8)", "(int8, int8)"),
    ),
    Rejected("torch_dynamic_int8", {"layers": ()}, ("at least one of linear, lstm, gru",)),
    Rejected("torch_dynamic_int8", {"layers": ("gru", "gru")}, ("must not repeat",)),
    # unknown fields
    Rejected("onnxruntime_static_int8", {"calibration_sample": 64}, ("calibration_sample", "Extra inputs are not permitted")),
    Rejected("torch_dynamic_int8", {"dtype": "qint8"}, ("dtype", "Extra inputs are not permitted")),
]


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: f"{c.backend}-{'-'.join(map(str, c.values))}")
def test_invalid_config_is_rejected_with_a_clear_message(case: Rejected) -> None:
    with pytest.raises(ValidationError) as info:
        _config_cls(case.backend)(**case.values)
    message = str(info.value)
    for words in case.mentions:
        assert words in message


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_configs_are_frozen(name: str) -> None:
    config = _config_cls(name)()
    field = next(iter(type(config).model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(config, field, getattr(config, field))


def test_torch_layers_are_kept_in_a_canonical_order() -> None:
    config_cls = _config_cls("torch_dynamic_int8")
    assert config_cls(layers=("gru", "linear")) == config_cls(layers=("linear", "gru"))
    assert config_cls(layers=("gru", "linear")).layers == ("linear", "gru")


def test_json_lists_are_accepted_for_tuple_fields() -> None:
    config_cls = _config_cls("onnxruntime_static_int8")
    config = config_cls.model_validate_json('{"nodes_to_exclude": ["a", "b"]}')
    assert config.nodes_to_exclude == ("a", "b")


# --- helpers that need no heavy library ----------------------------------------------------------


@pytest.mark.parametrize(("n", "sizes"), [(100, [32, 32, 32, 4]), (96, [32, 32, 32]), (7, [7]), (30, [10, 20])])
def test_calibration_samples_are_re_split_into_equal_batches(n: int, sizes: list[int]) -> None:
    # ORT's histogram calibrators stack batches, so they must all hold the same number of samples.
    data = np.arange(n, dtype=np.float32)
    start, batches = 0, []
    for size in sizes:
        batches.append({"input": data[start : start + size]})
        start += size
    out = list(_even_batches(iter(batches), n))
    assert len({len(b["input"]) for b in out}) == 1
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in out]), data)


def test_prime_sample_count_gives_batches_of_one() -> None:
    out = list(_even_batches(iter([{"input": np.zeros((37, 2), np.float32)}]), 37))
    assert len(out) == 37 and all(b["input"].shape == (1, 2) for b in out)


def test_calibration_reader_hands_ort_one_stride_at_a_time() -> None:
    # ORT's CalibStridedMinMax: len() batches, then set_range(i, i + 1) and get_next until None.
    from sweeper.backends.onnxruntime_static_int8 import CALIBRATION_OPTIONS, CalibrationReader

    data = np.arange(96, dtype=np.float32)
    reader = CalibrationReader(iter([{"input": data[:50]}, {"input": data[50:]}]), 96)
    assert len(reader) == 3 and CALIBRATION_OPTIONS["CalibStridedMinMax"] == 1
    seen = []
    for start in range(len(reader)):
        reader.set_range(start_index=start, end_index=start + 1)
        while (batch := reader.get_next()) is not None:
            seen.append(batch["input"])
    assert [len(b) for b in seen] == [32, 32, 32]
    np.testing.assert_array_equal(np.concatenate(seen), data)


def test_unknown_node_to_exclude_lists_quantizable_nodes() -> None:
    quantizable = [("/conv1/Conv", "Conv"), ("/fc/Gemm", "Gemm")]
    check_nodes_to_exclude(("/fc/Gemm",), quantizable, "task 't'")
    with pytest.raises(ConfigError) as info:
        check_nodes_to_exclude(("/fc/Gem", "/fc/Gemm"), quantizable, "task 't'")
    message = str(info.value)
    assert "['/fc/Gem']" in message and "task 't'" in message
    assert "Did you mean '/fc/Gemm'?" in message
    assert "'/conv1/Conv' (Conv)" in message
