"""Validation of an ONNX export against the model it came from.

``onnx.checker`` runs while exporting; here the export's outputs on the task's example inputs
(batch sizes 1 and 7, which exercises the dynamic batch axis) are compared with the original
model's (PyTorch, or Keras for a tf2onnx export). The measured error is cached beside the ONNX file,
since it depends only on the file and the model; each config compares it with its
``validate_atol``, so a trial with a mismatch fails with the maximum error in its row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sweeper.backends._base import BuildContext
from sweeper.backends.onnx.config import (
    OnnxExportConfig,
    OnnxValidationError,
    describe_export,
)
from sweeper.backends.onnx.runtime import (
    ORT_DTYPES,
    make_session,
)
from sweeper.cache import cached_file
from sweeper.task import Batch, Task

if TYPE_CHECKING:
    import torch

# Batch sizes of the example inputs an export is validated on: 1, and an odd size other than the
# size of 2 it was exported with, so a batch axis frozen by the exporter shows up.
VALIDATION_BATCH_SIZES = (1, 7)


def check_export(ctx: BuildContext, path: Path, settings: OnnxExportConfig) -> None:
    """Raise ``OnnxValidationError`` if the export at ``path`` is off by more than ``validate_atol``.

    The measurement (maximum absolute error and output scale over the validation batch sizes) is
    cached beside the file, since it depends only on the file and the model.
    """
    report_path = path.with_name(f"{path.stem}.validation.json")
    if not report_path.is_file():
        report = measure_export_error(ctx, path, settings)
        cached_file(report_path, lambda tmp: tmp.write_text(json.dumps(report)))
    report = json.loads(report_path.read_text())
    error, scale = float(report["max_abs_error"]), float(report["output_scale"])
    tolerance = settings.validate_atol * max(1.0, scale)
    if not error <= tolerance:  # also true for NaN
        raise OnnxValidationError(
            f"the ONNX export of {describe_export(ctx.task, settings)} does not match the original model on "
            f"the task's example inputs: maximum absolute error {error:.3g} (at batch size "
            f"{report['worst_batch_size']}) exceeds validate_atol {settings.validate_atol:g} x output "
            f"scale {max(1.0, scale):.3g} = {tolerance:.3g}"
        )


def measure_export_error(ctx: BuildContext, path: Path, settings: OnnxExportConfig) -> dict[str, float]:
    """Compare the ONNX file's outputs with ``ctx.model``'s on the task's example inputs.

    Returns:
        ``max_abs_error`` (NaN outputs count as infinite), ``output_scale`` (the largest absolute
        reference output) and ``worst_batch_size``.

    Raises:
        OnnxValidationError: when an output's shape differs from the model's.
    """
    session = make_session(path, ctx.num_threads)
    dtypes = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
    error, scale, worst = -1.0, 0.0, 0
    for batch_size in VALIDATION_BATCH_SIZES:
        batch = ctx.task.example_inputs(batch_size)
        expected = reference_outputs(ctx.model, ctx.task, batch)
        feeds = {name: np.asarray(batch[name], dtype=dtype) for name, dtype in dtypes.items()}
        actual = np.asarray(session.run(None, feeds)[0], dtype=np.float64)
        if actual.shape != expected.shape:
            raise OnnxValidationError(
                f"the ONNX export of {describe_export(ctx.task, settings)} gives outputs of shape {actual.shape} "
                f"for a batch of {batch_size}, the original model {expected.shape}"
            )
        diff = np.abs(actual - expected)
        batch_error = float(np.nanmax(diff)) if not np.isnan(diff).any() else float("inf")
        if batch_error > error:
            error, worst = batch_error, batch_size
        scale = max(scale, float(np.max(np.abs(expected))))
    return {"max_abs_error": error, "output_scale": scale, "worst_batch_size": worst}


def reference_outputs(model: torch.nn.Module, task: Task, batch: Batch) -> np.ndarray:
    """Return the original model's first output for ``batch`` as a float64 array."""
    from sweeper.backends.onnx.tf2onnx import is_keras_model, keras_outputs

    if is_keras_model(model):
        return np.asarray(keras_outputs(model, task, batch), dtype=np.float64)
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(batch[name])) for name in task.input_names]
    with torch.inference_mode():
        output = model(*args)
    if isinstance(output, tuple | list):
        output = output[0]
    return output.detach().cpu().double().numpy()
