"""ONNX export options shared by every ONNX backend: simplification, validation, the cache key."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from sweeper.backends import BuildContext, get_backend
from sweeper.backends.onnx.config import OnnxExportConfig, OnnxValidationError
from sweeper.backends.onnx.export import VALIDATION_BATCH_SIZES, export_onnx
from sweeper.errors import ConfigError
from sweeper.task import Batch, LabeledBatch, Task, load_task

# --- config ------------------------------------------------------------------------------------


def test_export_fields_have_defaults_that_change_nothing() -> None:
    config = OnnxExportConfig()
    assert (config.simplify, config.validate_atol) == ("none", 1e-3)


@pytest.mark.parametrize(("values", "mentions"), [
    ({"simplify": "onnx-simplifier"}, ("'none'", "'onnxslim'", "'onnxsim'")),
    ({"validate_atol": 0.0}, ("validate_atol", "greater than 0")),
    ({"validate_atol": float("nan")}, ("validate_atol", "finite")),
    ({"validate_atol": "1e-3"}, ("validate_atol", "float")),
    ({"exporter": "tf2onnx", "opset": 19}, ("tf2onnx", "13..18")),
])  # fmt: skip
def test_invalid_export_options_are_rejected(values: dict, mentions: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        OnnxExportConfig(**values)
    for words in mentions:
        assert words in str(info.value)


def test_every_onnx_backend_takes_the_export_options() -> None:
    for name in ("onnxruntime_fp32", "onnxruntime_static_int8", "onnxruntime_dynamic_int8", "onnxruntime_fp16", "tensorrt"):
        config_cls = get_backend(name).Config
        config = config_cls(simplify="onnxslim", validate_atol=0.01)
        assert config_cls.model_validate_json(config.model_dump_json()) == config
        assert config.export_settings() == OnnxExportConfig(simplify="onnxslim", validate_atol=0.01)


# --- on the digits task ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_task_path: Path) -> tuple[Task, object]:
    task = load_task(str(digits_task_path))
    return task, task.build_model()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


def _ctx(task: Task, model: object, cache: Path, tmp_path: Path) -> BuildContext:
    return BuildContext(model=model, task=task, workdir=tmp_path, cache_dir=cache, num_threads=1)  # type: ignore[arg-type]


def _report(path: Path) -> dict:
    return json.loads(path.with_name(f"{path.stem}.validation.json").read_text())


@pytest.mark.parametrize("simplify", ["onnxslim", "onnxsim"])
def test_a_simplified_export_is_checked_validated_and_keeps_the_batch_axis(
    simplify: str, digits: tuple, cache: Path, tmp_path: Path
) -> None:
    import onnx

    pytest.importorskip(simplify, reason=f"{simplify} is not installed")
    task, model = digits
    plain = export_onnx(_ctx(task, model, cache, tmp_path))
    simplified = export_onnx(_ctx(task, model, cache, tmp_path), simplify=simplify)
    assert simplified != plain and f"-{simplify}-" in simplified.name
    onnx.checker.check_model(str(simplified))
    report = _report(simplified)
    assert report["max_abs_error"] < 1e-4 and report["output_scale"] > 1.0
    assert onnx.load(str(simplified)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    backend = get_backend("onnxruntime_fp32")
    candidate = backend.build(_ctx(task, model, cache, tmp_path), backend.Config(simplify=simplify))
    assert candidate.path == simplified
    assert candidate.predict(task.example_inputs(7)).shape == (7, 10)


def test_the_cache_key_holds_the_export_options_and_not_the_tolerance(
    digits: tuple, cache: Path, tmp_path: Path
) -> None:
    task, model = digits
    ctx = _ctx(task, model, cache, tmp_path)
    first = export_onnx(ctx, OnnxExportConfig())
    stamps = (first.stat().st_mtime_ns, first.with_name(f"{first.stem}.validation.json").stat().st_mtime_ns)
    # A looser tolerance reuses the file and its measured error; nothing is exported again.
    assert export_onnx(ctx, OnnxExportConfig(validate_atol=0.5)) == first
    assert (first.stat().st_mtime_ns, first.with_name(f"{first.stem}.validation.json").stat().st_mtime_ns) == stamps
    assert export_onnx(ctx, OnnxExportConfig(simplify="onnxslim")) != first


def test_a_tolerance_below_the_measured_error_fails_with_the_maximum_error(
    digits: tuple, cache: Path, tmp_path: Path
) -> None:
    task, model = digits
    ctx = _ctx(task, model, cache, tmp_path)
    error = _report(export_onnx(ctx))["max_abs_error"]
    assert error > 0
    with pytest.raises(OnnxValidationError) as info:
        export_onnx(ctx, validate_atol=1e-12)
    message = str(info.value)
    assert f"maximum absolute error {error:.3g}" in message and "validate_atol 1e-12" in message
    assert "task 'digits_cnn'" in message and "exporter 'torchscript' at opset 17" in message


def test_a_missing_simplifier_is_a_clear_config_error(
    digits: tuple, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxsim" else real(name, *a))
    task, model = digits
    with pytest.raises(ConfigError, match=r"simplify 'onnxsim' needs the 'onnxsim' package.*sweeper\[onnxsim\]"):
        export_onnx(_ctx(task, model, cache, tmp_path), simplify="onnxsim")


def test_export_takes_a_config_or_fields_not_both(digits: tuple, cache: Path, tmp_path: Path) -> None:
    task, model = digits
    with pytest.raises(TypeError, match="not both"):
        export_onnx(_ctx(task, model, cache, tmp_path), OnnxExportConfig(), opset=13)


# --- an export that is wrong: a batch-size branch frozen by tracing -----------------------------


class _BranchOnBatch:
    """A model whose output depends on the batch size through Python control flow.

    TorchScript tracing (at batch size 2) keeps only the branch it took, so the export doubles
    every output whatever the batch size, while the model does so only for batches of 2.
    """

    @staticmethod
    def make() -> object:
        import torch

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.linear(x)
                return y * 2 if x.shape[0] == 2 else y

        torch.manual_seed(0)
        return Model().eval()


class _BranchTask(Task):
    name: ClassVar[str] = "branch_on_batch"

    def build_model(self) -> object:
        return _BranchOnBatch.make()

    def example_inputs(self, batch_size: int = 1) -> Batch:
        return {"input": np.random.default_rng(batch_size).standard_normal((batch_size, 4)).astype(np.float32)}

    @property
    def calibration_size(self) -> int:
        return 8

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        yield self.example_inputs(n)

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        yield self.example_inputs(8), np.zeros(8, dtype=np.int64)


def test_an_export_that_differs_from_the_model_fails_validation(tmp_path: Path) -> None:
    task = _BranchTask()
    ctx = _ctx(task, task.build_model(), tmp_path, tmp_path)
    backend = get_backend("onnxruntime_fp32")
    with pytest.raises(OnnxValidationError) as info:
        backend.build(ctx, backend.Config())
    match = re.search(r"maximum absolute error ([0-9.e+-]+) \(at batch size (\d+)\)", str(info.value))
    assert match is not None and float(match.group(1)) > 0.1
    assert int(match.group(2)) in VALIDATION_BATCH_SIZES
