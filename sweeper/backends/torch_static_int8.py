"""PyTorch static int8: weights and activations quantized, ranges from the task's calibration data.

Flow: FX graph mode (``prepare_fx`` -> calibrate -> ``convert_fx``), which fuses Conv+BN+ReLU
and Linear+ReLU and excludes layers by module name without editing the model; see
:mod:`sweeper.backends.torch.fx_int8` for why this flow rather than eager mode or PT2E.

The converted model is traced to TorchScript: the candidate runs the traced module, and its
artifact is that module's ``torch.jit.save`` file, which :meth:`TorchStaticInt8.load` reloads
with ``torch.jit.load`` (no calibration, no model code). Models that ``torch.fx`` cannot trace
are rejected with the tracer's reason. Recurrent layers (GRU, LSTM) have no static int8 kernels
in torch: FX leaves them in float and quantizes the Conv and Linear layers around them.

Calibration takes milliseconds on models of the size of the project's tasks, so it is not cached
across exclusion sets (the ONNX Runtime backend caches its ranges because ORT's take seconds).

Why this backend is slow and inaccurate on EfficientNet-Lite0 (``tasks/efficientnet_lite0.py``),
measured with torch 2.14, engine ``x86``, batch 1, one thread: 255 ms per call against 23 ms for
the FP32 model (0.09x) and 45.7 % top-1 agreement on 116 views. The model's convolutions are
``efficientnet_lite_pytorch``'s ``Conv2dStaticSamePadding``, a subclass of ``nn.Conv2d`` that pads
with a ``ZeroPad2d`` and convolves with ``padding=0``. FX's fusion patterns match ``nn.Conv2d``
itself, so no Conv+BatchNorm pair is fused: each of the 49 BatchNorms runs as its own
``quantized::batch_norm2d`` with its own output quantization (the accuracy loss), and each pad
dequantizes and requantizes. ``quantized::conv2d`` took 96.5 % of the time, nearly all of it in
the depthwise convolutions of the padded inputs (a 5x5 one over 672 channels: 27 ms per call);
FBGEMM's fast depthwise kernels cover particular kernel, stride and padding combinations, and
these calls, with ``padding=0``, do not appear to take them (not verified in FBGEMM's source). A model with plain
``nn.Conv2d`` layers (padding in the convolution) does not have either problem; the ORT backends
quantize this model from its ONNX export, where the padding is an attribute of each Conv.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from sweeper.backends import BuildContext
from sweeper.backends.torch.eager import quiet_torch_quantization
from sweeper.backends.torch.fx_int8 import (
    FxInt8Backend,
    Int8Config,
    activation_range,
    check_converted,
    check_layers,
    fp32_copy,
    qconfig_mapping,
    set_engine,
    weight_observer,
)
from sweeper.backends.torch.jit import TorchScriptCandidate, example_args, trace
from sweeper.task import check_sample_count

Observer = Literal["minmax", "histogram", "moving_average"]


class TorchStaticInt8Config(Int8Config):
    """Settings of PyTorch static quantization (besides ``engine``, ``per_channel`` and
    ``excluded_layers``, see :class:`sweeper.backends.torch.fx_int8.Int8Config`).

    The defaults are torch's own recipe for x86 (``get_default_qconfig_mapping("x86")``).

    Attributes:
        calibration_samples: how many calibration samples to observe (at most the task's
            calibration size, checked at build).
        observer: how activation ranges are computed: ``minmax`` (running min and max),
            ``histogram`` (the range minimising quantization error over a histogram) or
            ``moving_average`` (exponential moving average of each batch's min and max).
    """

    calibration_samples: int = Field(default=128, ge=1)
    observer: Observer = "histogram"


class TorchStaticInt8(FxInt8Backend[TorchStaticInt8Config]):
    """PyTorch FX graph mode static int8 quantization, run and saved as TorchScript."""

    name: ClassVar[str] = "torch_static_int8"
    Config: type[TorchStaticInt8Config] = TorchStaticInt8Config
    # Measured: 100% top-1 agreement on digits (360 samples) with every engine, observer and
    # weight granularity, with and without excluded layers. The margin allows for CPUs without
    # VNNI, where 8-bit activations (qnnpack, onednn) can saturate.
    min_agreement_pct: ClassVar[float] = 97.0




    def build(self, ctx: BuildContext, config: TorchStaticInt8Config) -> TorchScriptCandidate:
        import torch
        from torch.ao.quantization import QConfig, observer
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        check_sample_count(ctx.task, config.calibration_samples)
        expected = check_layers(ctx.model, config, ctx.task, self.name)
        set_engine(config.engine, self.name)
        observers: dict[str, Any] = {
            "minmax": observer.MinMaxObserver,
            "histogram": observer.HistogramObserver,
            "moving_average": observer.MovingAverageMinMaxObserver,
        }
        activation = observers[config.observer].with_args(**activation_range(config.engine))
        qconfig = QConfig(activation=activation, weight=weight_observer(config.per_channel))
        mapping = qconfig_mapping(qconfig, config.excluded_layers)
        torch.set_num_threads(ctx.num_threads)
        with quiet_torch_quantization(), torch.no_grad():
            prepared = prepare_fx(fp32_copy(ctx.model, train=False), mapping, example_args(ctx.task, 2))
            for batch in ctx.task.calibration_batches(config.calibration_samples):
                prepared(*(torch.from_numpy(batch[name]) for name in ctx.task.input_names))
            converted = convert_fx(prepared)
        check_converted(converted, expected, self.name, ctx.task)
        return TorchScriptCandidate(trace(converted, ctx.task), ctx.task.input_names, ctx.num_threads)

