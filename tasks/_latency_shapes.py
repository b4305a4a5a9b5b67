"""Latency-only model shapes for the requirements' tables: no trained weights, no accuracy claim.

ResNet50 and MobileNetV2 (torchvision architectures) and a BERT-base-sized encoder
(``transformers.BertConfig()`` defaults: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary
30,522, with a 2-class sequence-classification head) built with **random weights** (seed 0):
pretrained weights would come from a hub at run time, which this project does not do. Their
latency and size are those of the real models (same layers, same shapes); their outputs mean
nothing.

Every class here sets ``latency_only = True``. Their inputs are synthetic (seeded normal pixels,
random token ids) and their metric, ``top1_agreement_with_fp32_synthetic_pct``, is the percent of
synthetic evaluation inputs whose top-1 class a candidate shares with the FP32 model: a fidelity
figure that lets a sweep run, never an accuracy. The benchmarks print no accuracy for them.

The task modules ``resnet50_latency``, ``mobilenet_v2_latency`` and ``bert_base_latency`` each
expose one of these as ``TASK``; this module (leading underscore) is not a task itself.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from sweeper.task import Batch, LabeledBatch, Task

_MODEL_SEED = 0
_CALIBRATION_SEED = 1
_EVALUATION_SEED = 2


class LatencyOnlyTask(Task):
    """A model with random weights and synthetic inputs, for latency and size only.

    Subclasses implement :meth:`make_model` and :meth:`make_inputs`.
    """

    latency_only: ClassVar[bool] = True
    metric_name = "top1_agreement_with_fp32_synthetic_pct"
    calibration_samples: ClassVar[int] = 64
    evaluation_samples: ClassVar[int] = 32

    @abstractmethod
    def make_model(self) -> nn.Module:
        """Return the untrained model (its random initialisation is seeded by the caller)."""

    @abstractmethod
    def make_inputs(self, n: int, rng: np.random.Generator) -> Batch:
        """Return ``n`` synthetic samples drawn from ``rng``."""

    def build_model(self) -> nn.Module:
        """The model with seeded random weights (the same on every call and machine), eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_MODEL_SEED)
            model = self.make_model()
        return model.eval()

    @cached_property
    def _calibration(self) -> Batch:
        return self.make_inputs(self.calibration_samples, np.random.default_rng(_CALIBRATION_SEED))

    @cached_property
    def _evaluation(self) -> LabeledBatch:
        inputs = self.make_inputs(self.evaluation_samples, np.random.default_rng(_EVALUATION_SEED))
        model = self.build_model()
        with torch.inference_mode():
            logits = model(*(torch.from_numpy(inputs[name]) for name in self.input_names))
        return inputs, logits.argmax(dim=-1).numpy().astype(np.int64)

    def example_inputs(self, batch_size: int = 1) -> Batch:
        rows = np.arange(batch_size) % self.calibration_samples
        return {name: array[rows] for name, array in self._calibration.items()}

    @property
    def calibration_size(self) -> int:
        return self.calibration_samples

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        data = self._calibration
        return ({k: v[i : min(i + batch_size, n)].copy() for k, v in data.items()} for i in range(0, n, batch_size))

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        """Synthetic inputs labelled with the FP32 model's own top-1 classes (fidelity, not accuracy)."""
        inputs, labels = self._evaluation
        n = len(labels)
        return (
            ({k: v[i : i + batch_size].copy() for k, v in inputs.items()}, labels[i : i + batch_size].copy())
            for i in range(0, n, batch_size)
        )


class ImageLatencyTask(LatencyOnlyTask):
    """An ImageNet-shaped CNN: ``(N, 3, 224, 224)`` float32 input, 1,000 logits."""

    input_names = ("input",)
    output_names = ("logits",)

    def make_inputs(self, n: int, rng: np.random.Generator) -> Batch:
        return {"input": rng.standard_normal((n, 3, 224, 224), dtype=np.float32)}


class ResNet50Latency(ImageLatencyTask):
    """torchvision ResNet50 (25.6 M parameters), random weights."""

    name = "resnet50_latency"

    def make_model(self) -> nn.Module:
        from torchvision.models import resnet50

        return resnet50(weights=None)


class MobileNetV2Latency(ImageLatencyTask):
    """torchvision MobileNetV2 (3.5 M parameters), random weights."""

    name = "mobilenet_v2_latency"

    def make_model(self) -> nn.Module:
        from torchvision.models import mobilenet_v2

        return mobilenet_v2(weights=None)


class BertLogits(nn.Module):
    """``BertForSequenceClassification`` returning its logits tensor (one output, for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class BertBaseLatency(LatencyOnlyTask):
    """A BERT-base-sized encoder (109.5 M parameters) with a 2-class head, random weights.

    Inputs: ``input_ids`` and ``attention_mask``, int64 ``(N, 128)``; only the batch axis is
    dynamic in the ONNX export (see ``tasks/minilm_sentiment.py`` for why not the sequence).
    """

    name = "bert_base_latency"
    input_names = ("input_ids", "attention_mask")
    output_names = ("logits",)
    seq_len: ClassVar[int] = 128
    calibration_samples = 32
    evaluation_samples = 16

    def make_model(self) -> nn.Module:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        config = transformers.BertConfig(num_labels=2, attn_implementation="eager")
        return BertLogits(transformers.BertForSequenceClassification(config))

    def make_inputs(self, n: int, rng: np.random.Generator) -> Batch:
        # Ordinary word-piece ids between the special tokens, [CLS] first and [SEP] last.
        ids = rng.integers(1_000, 30_522, size=(n, self.seq_len), dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        return {"input_ids": ids, "attention_mask": np.ones((n, self.seq_len), dtype=np.int64)}



RESNET50 = ResNet50Latency()
MOBILENET_V2 = MobileNetV2Latency()
BERT_BASE = BertBaseLatency()
