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

EfficientNet-Lite0 (``tasks/efficientnet_lite0.py``): measured with torch 2.14, batch 1, one
thread, 180 calibration views, on the task's 1,080 evaluation views (FP32: 85.46 % top-1, 24-29 ms
per call):

- engine ``onednn`` (histogram observer): **10.0 ms, 85.65 % top-1** (91.2 % of the views keep
  the FP32 class). With the minmax observer: 11.0 ms, 80.93 %.
- engine ``x86`` (the default, torch's recipe): 44 ms and 71.67 % (histogram), 60.09 % (minmax).
  ``x86`` and ``fbgemm`` quantize activations to 7 bits (``reduce_range``), and FBGEMM's
  convolutions ran slower than FP32 here.

The model's convolutions are ``efficientnet_lite_pytorch``'s ``Conv2dStaticSamePadding``, a
subclass of ``nn.Conv2d`` that pads with a ``ZeroPad2d`` and convolves with ``padding=0``. FX's
fusion patterns match ``nn.Conv2d`` itself, so before
:func:`~sweeper.backends.torch.fx_int8.unpad_same_convs` made them plain convolutions, no
Conv+BatchNorm pair fused: each of the 49 BatchNorms ran as its own quantized op, each pad
dequantized and requantized, and the model ran at 255-333 ms per call (0.09x FP32) with about half
of its top-1 classes changed (engine ``x86``).
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

