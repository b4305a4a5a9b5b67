"""Configs of the PyTorch static/QAT int8, TorchScript and torch.compile backends, and the checks
those backends make before any heavy work (layer names, training split, engine, traceability).

The round trips and rejections need no heavy library; the checks build the digits model (its
weights are cached) or a toy one, and take well under a second each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from sweeper.backends import BackendConfig, BuildContext, get_backend
from sweeper.errors import ConfigError, TaskError
from sweeper.task import Batch, LabeledBatch, Task, load_task

ROOT = Path(__file__).resolve().parents[2]
DIGITS_LAYERS = [
    ("features.0", "Conv2d"),
    ("features.3", "Conv2d"),
    ("features.7", "Conv2d"),
    ("classifier.1", "Linear"),
    ("classifier.3", "Linear"),
]

NON_DEFAULT: dict[str, list[dict[str, Any]]] = {
    "torch_static_int8": [
        {"engine": "qnnpack", "per_channel": False, "observer": "minmax", "calibration_samples": 1},
        {"engine": "onednn", "observer": "moving_average", "excluded_layers": ("features.0", "classifier.3")},
        {"engine": "fbgemm", "observer": "histogram", "calibration_samples": 360},
    ],
    "torch_qat_int8": [
        {"epochs": 1, "learning_rate": 1e-5, "engine": "fbgemm", "per_channel": False},
        {"epochs": 20, "learning_rate": 1.0, "excluded_layers": ("features.7",)},
    ],
    "torchscript": [
        {"mode": "script", "freeze": False, "optimize_for_inference": False},
        {"mode": "trace", "freeze": True, "optimize_for_inference": True},
    ],
    "torch_compile": [
        {"mode": "reduce-overhead", "dynamic": True},
        {"mode": "max-autotune-no-cudagraphs", "freezing": True},
    ],
}


def _configs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, {}) for name in NON_DEFAULT] + [(name, c) for name, cs in NON_DEFAULT.items() for c in cs]


def _config_cls(name: str) -> type[BackendConfig]:
    return get_backend(name).Config


@pytest.mark.parametrize(("name", "values"), _configs(), ids=lambda v: v if isinstance(v, str) else None)
def test_config_round_trips_through_json_and_a_dict(name: str, values: dict[str, Any]) -> None:
    config = _config_cls(name)(**values)
    assert _config_cls(name).model_validate_json(config.model_dump_json()) == config
    assert _config_cls(name).model_validate(config.model_dump()) == config


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_backends_run_on_the_cpu_only(name: str) -> None:
    assert get_backend(name).hardware == frozenset({"cpu"})


@dataclass(frozen=True)
class Rejected:
    """A config value that validation must reject, and words the error must contain."""

    backend: str
    values: dict[str, Any]
    mentions: tuple[str, ...]


ENGINES = ("'x86'", "'fbgemm'", "'qnnpack'", "'onednn'")
REJECTED = [
    # wrong types (configs are strict: no silent coercion)
    Rejected("torch_static_int8", {"calibration_samples": "64"}, ("calibration_samples", "integer")),
    Rejected("torch_static_int8", {"calibration_samples": 64.0}, ("calibration_samples", "integer")),
    Rejected("torch_static_int8", {"per_channel": 1}, ("per_channel", "boolean")),
    Rejected("torch_static_int8", {"excluded_layers": "features.0"}, ("excluded_layers", "tuple")),
    Rejected("torch_qat_int8", {"epochs": 2.0}, ("epochs", "integer")),
    Rejected("torch_qat_int8", {"learning_rate": "1e-4"}, ("learning_rate", "number")),
    Rejected("torchscript", {"freeze": "yes"}, ("freeze", "boolean")),
    Rejected("torch_compile", {"dynamic": 0}, ("dynamic", "boolean")),
    # ranges
    Rejected("torch_static_int8", {"calibration_samples": 0}, ("calibration_samples", "greater than or equal to 1")),
    Rejected("torch_qat_int8", {"epochs": 0}, ("epochs", "greater than or equal to 1")),
    Rejected("torch_qat_int8", {"epochs": 21}, ("epochs", "less than or equal to 20")),
    Rejected("torch_qat_int8", {"learning_rate": 0.0}, ("learning_rate", "greater than 0")),
    Rejected("torch_qat_int8", {"learning_rate": 2.0}, ("learning_rate", "less than or equal to 1")),
    # bad literals name the allowed values
    Rejected("torch_static_int8", {"engine": "mkldnn"}, ENGINES),
    Rejected("torch_qat_int8", {"engine": "X86"}, ENGINES),
    Rejected("torch_static_int8", {"observer": "entropy"}, ("'minmax'", "'histogram'", "'moving_average'")),
    Rejected("torchscript", {"mode": "export"}, ("'trace'", "'script'")),
    Rejected(
        "torch_compile", {"mode": "max-autotune"}, ("'default'", "'reduce-overhead'", "'max-autotune-no-cudagraphs'")
    ),
    # combinations and repeats
    Rejected("torchscript", {"freeze": False, "optimize_for_inference": True}, ("needs freeze=True",)),
    Rejected("torch_static_int8", {"excluded_layers": ("features.0", "features.0")}, ("must not repeat",)),
    # unknown fields
    Rejected(
        "torch_static_int8", {"calibration_method": "minmax"}, ("calibration_method", "Extra inputs are not permitted")
    ),
    Rejected("torch_qat_int8", {"calibration_samples": 64}, ("calibration_samples", "Extra inputs are not permitted")),
    Rejected("torch_qat_int8", {"observer": "minmax"}, ("observer", "Extra inputs are not permitted")),
    Rejected("torch_compile", {"backend": "eager"}, ("backend", "Extra inputs are not permitted")),
]


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: f"{c.backend}-{'-'.join(map(str, c.values))}")
def test_invalid_config_is_rejected_with_a_clear_message(case: Rejected) -> None:
    with pytest.raises(ValidationError) as info:
        _config_cls(case.backend)(**case.values)
    message = str(info.value)
    for words in case.mentions:
        assert words in message


@pytest.mark.parametrize("name", ["torch_static_int8", "torch_qat_int8"])
def test_excluded_layers_are_a_sorted_set(name: str) -> None:
    config_cls = _config_cls(name)
    assert config_cls(excluded_layers=("features.7", "classifier.1")).excluded_layers == ("classifier.1", "features.7")
    assert config_cls.model_validate_json('{"excluded_layers": ["b", "a"]}').excluded_layers == ("a", "b")


# --- checks made before any heavy work -----------------------------------------------------------


@cache
def _digits() -> tuple[Task, Any]:
    task = load_task(str(ROOT / "tasks" / "digits_cnn.py"))
    return task, task.build_model()


def _ctx(task: Task, model: Any, tmp_path: Path) -> BuildContext:
    return BuildContext(model=model, task=task, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)


@pytest.mark.parametrize("name", ["torch_static_int8", "torch_qat_int8"])
def test_quantizable_layers_are_the_conv_and_linear_modules_in_call_order(name: str, tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend(name)
    assert backend.exclusion_field == "excluded_layers"
    assert backend.quantizable_layers(_ctx(task, model, tmp_path), backend.Config()) == DIGITS_LAYERS


def test_a_recurrent_model_offers_only_its_linear_head(tmp_path: Path) -> None:
    task = load_task(str(ROOT / "tasks" / "mnist1d_gru.py"))
    backend = get_backend("torch_static_int8")
    ctx = _ctx(task, task.build_model(), tmp_path)
    assert backend.quantizable_layers(ctx, backend.Config()) == [("head", "Linear")]


@pytest.mark.parametrize("name", ["torch_static_int8", "torch_qat_int8"])
def test_unknown_excluded_layer_lists_the_quantizable_ones(name: str, tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend(name)
    with pytest.raises(ConfigError) as info:
        backend.build(_ctx(task, model, tmp_path), backend.Config(excluded_layers=("classifier.4", "features.1")))
    message = str(info.value)
    assert name in message and "task 'digits_cnn'" in message
    assert "'classifier.4', 'features.1' (BatchNorm2d)" in message
    assert "Did you mean 'classifier.3'?" in message
    assert "'features.0' (Conv2d)" in message and "'classifier.3' (Linear)" in message


def test_excluding_every_layer_is_rejected(tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend("torch_static_int8")
    config = backend.Config(excluded_layers=tuple(name for name, _ in DIGITS_LAYERS))
    with pytest.raises(ConfigError, match="nothing would be quantized"):
        backend.build(_ctx(task, model, tmp_path), config)


def test_static_calibration_samples_beyond_the_task_are_rejected(tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend("torch_static_int8")
    with pytest.raises(TaskError, match=f"1..{task.calibration_size}"):
        backend.build(_ctx(task, model, tmp_path), backend.Config(calibration_samples=task.calibration_size + 1))


def test_an_engine_this_build_lacks_is_rejected_with_the_supported_ones() -> None:
    import torch

    from sweeper.backends.torch.fx_int8 import set_engine

    with pytest.raises(ConfigError) as info:
        set_engine("no_such_engine", "torch_static_int8")
    assert all(engine in str(info.value) for engine in torch.backends.quantized.supported_engines if engine != "none")


def test_excluded_layers_stay_in_float_after_reloading(tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend("torch_static_int8")
    config = backend.Config(excluded_layers=("classifier.3", "features.0"), calibration_samples=32)
    candidate = backend.build(_ctx(task, model, tmp_path), config)
    loaded = backend.load(candidate.save(tmp_path / "artifact"), _ctx(task, model, tmp_path), config)
    for built in (candidate, loaded):
        # Float weights are parameters; int8 ones are packed. Only the excluded layers have any.
        owners = {name.rsplit(".", 1)[0] for name, _ in built.module.named_parameters()}
        assert owners == {"features.0.0", "classifier.3"}


class _WithoutTrainingSplit(Task):
    """The digits task minus its training split."""

    name = "digits_without_training_split"

    def __init__(self, inner: Task) -> None:
        self.inner = inner

    def build_model(self) -> Any:
        return self.inner.build_model()

    def example_inputs(self, batch_size: int = 1) -> Batch:
        return self.inner.example_inputs(batch_size)

    @property
    def calibration_size(self) -> int:
        return self.inner.calibration_size

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        return self.inner.calibration_batches(n, batch_size)

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        return self.inner.eval_batches(batch_size)


def test_qat_needs_a_training_split(tmp_path: Path) -> None:
    task, model = _digits()
    backend = get_backend("torch_qat_int8")
    ctx = _ctx(_WithoutTrainingSplit(task), model, tmp_path)
    message = "task 'digits_without_training_split' has no training split; torch_qat_int8 needs one"
    with pytest.raises(TaskError, match=message):
        backend.preflight(ctx, backend.Config())
    with pytest.raises(TaskError, match=message):
        backend.build(ctx, backend.Config())
    backend.preflight(_ctx(task, model, tmp_path), backend.Config())


# --- toy models the tracers reject -----------------------------------------------------------------


def _toy_modules() -> dict[str, Any]:
    from torch import nn

    class BatchDependent(nn.Module):
        """Python control flow on the batch size: tracing records one branch only."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Any) -> Any:
            if x.shape[0] > 2:
                return self.fc(x) * 2.0
            return self.fc(x)

    class Unscriptable(nn.Module):
        """A try block, which TorchScript's compiler does not accept."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Any) -> Any:
            try:
                return self.fc(x)
            except RuntimeError:
                return x

    return {"batch_dependent": BatchDependent(), "unscriptable": Unscriptable()}


class _ToyTask(Task):
    name = "toy"

    def __init__(self, model: Any) -> None:
        self.model = model

    def build_model(self) -> Any:
        return self.model.eval()

    def example_inputs(self, batch_size: int = 1) -> Batch:
        return {"input": np.linspace(-1, 1, batch_size * 4, dtype=np.float32).reshape(batch_size, 4)}

    @property
    def calibration_size(self) -> int:
        return 8

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        yield self.example_inputs(n)

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        yield self.example_inputs(8), np.zeros(8, dtype=np.int64)


@pytest.mark.parametrize(
    ("toy", "values", "mentions"),
    [
        ("batch_dependent", {"mode": "trace"}, "cannot trace the model of task 'toy'"),
        ("unscriptable", {"mode": "script"}, "cannot script the model of task 'toy' (try mode 'trace'"),
    ],
)
def test_a_model_torchscript_cannot_take_is_rejected_with_the_reason(
    toy: str, values: dict[str, Any], mentions: str, tmp_path: Path
) -> None:
    from sweeper.backends.torch.jit import TorchScriptError
    from sweeper.errors import SweeperInputError

    task = _ToyTask(_toy_modules()[toy])
    backend = get_backend("torchscript")
    with pytest.raises(TorchScriptError) as info:
        backend.build(_ctx(task, task.build_model(), tmp_path), backend.Config(**values))
    assert isinstance(info.value, SweeperInputError)
    assert mentions in str(info.value)


def test_a_model_fx_cannot_trace_is_rejected_before_quantizing(tmp_path: Path) -> None:
    from sweeper.backends.torch.fx_int8 import QuantizationError

    task = _ToyTask(_toy_modules()["batch_dependent"])
    backend = get_backend("torch_static_int8")
    with pytest.raises(
        QuantizationError, match=r"torch_static_int8: the model of task 'toy' cannot be traced by torch\.fx"
    ):
        backend.preflight(_ctx(task, task.build_model(), tmp_path), backend.Config())


def test_torch_compile_without_a_cpp_compiler_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    reason = get_backend("torch_compile").unavailable_reason()
    assert reason is not None and "'no-such-c++-compiler'" in reason and "not on PATH" in reason


def test_a_transformers_model_is_rejected_with_the_backends_that_quantize_it() -> None:
    import torch

    transformers = pytest.importorskip("transformers")
    from sweeper.backends.torch.fx_int8 import QuantizationError, quantizable_layers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = transformers.BertModel(config)
            self.head = torch.nn.Linear(32, 2)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(hidden[:, 0])

    with pytest.raises(QuantizationError) as info:
        quantizable_layers(Classifier().eval())
    message = str(info.value)
    assert "cannot be traced by torch.fx" in message and "transformers modules" in message
    assert "torch_dynamic_int8" in message and "onnxruntime_static_int8" in message
    with pytest.raises(QuantizationError) as plain:
        quantizable_layers(_toy_modules()["batch_dependent"])
    assert "transformers" not in str(plain.value), "the hint is only for models built by transformers"


def _same_padded_net() -> Any:
    """The digits CNN's shape with TensorFlow-style "same" convolutions, written as
    efficientnet_pytorch writes them (a Conv2d subclass that pads with a ZeroPad2d child)."""
    import math

    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    class SamePadConv(nn.Conv2d):
        def __init__(self, cin: int, cout: int, kernel: int, stride: int, image: int) -> None:
            super().__init__(cin, cout, kernel, stride)
            pad = max((math.ceil(image / stride) - 1) * stride + kernel - image, 0)
            self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    torch.manual_seed(0)
    features = nn.Sequential(
        SamePadConv(1, 8, 3, 1, 8), nn.BatchNorm2d(8), nn.ReLU(),  # pads (1, 1, 1, 1)
        SamePadConv(8, 8, 3, 2, 8), nn.BatchNorm2d(8), nn.ReLU(),  # pads (0, 1, 0, 1)
    )  # fmt: skip
    for bn in (features[1], features[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


def test_same_padded_convolutions_become_plain_ones_with_the_same_outputs() -> None:
    import copy

    import torch
    from torch import nn

    from sweeper.backends.torch.fx_int8 import unpad_same_convs

    net = _same_padded_net()
    plain = unpad_same_convs(copy.deepcopy(net))
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), net(x), rtol=0, atol=1e-6)
    first, second = plain[0][0], plain[0][3]
    assert type(first) is nn.Conv2d and first.padding == (1, 1)
    # the stride-2 layer pads one more pixel at the bottom and right: that part stays a pad
    assert isinstance(second, nn.Sequential) and second[0].padding == (0, 1, 0, 1)
    assert type(second[1]) is nn.Conv2d and second[1].padding == (0, 0)


def test_static_int8_fuses_same_padded_convolutions_with_their_batchnorms(tmp_path: Path) -> None:
    import re

    task, _ = _digits()
    net = _same_padded_net()
    backend = get_backend("torch_static_int8")
    candidate = backend.build(_ctx(task, net, tmp_path), backend.config({"calibration_samples": 64}))
    ops = re.findall(r"quantized::\w+", str(candidate.module.inlined_graph))
    # both Conv+BN+ReLU blocks fused: no quantized BatchNorm of its own
    assert ops.count("quantized::conv2d_relu") == 2 and not any("batch_norm" in op for op in ops), ops
    # the task's model is not changed, and the layer keeps its name for excluded_layers
    assert type(net[0][0]).__name__ == "SamePadConv"
    config = backend.config({"calibration_samples": 64, "excluded_layers": ["0.3"]})
    excluded = backend.build(_ctx(task, net, tmp_path / "excluded"), config)
    owners = {name.rsplit(".", 1)[0] for name, _ in excluded.module.named_parameters()}
    assert owners == {"0.3.1.0"}  # the float Conv of the fused float ConvReLU2d behind the pad
