"""The real tasks (Fashion-MNIST CNN, EfficientNet-Lite0, MiniLM sentiment) and the latency-only shapes.

Fast by design: data loading, splits, shapes and dynamic axes. Nothing is trained here; a check
that needs the trained weights or the FP32 labels runs only when they are already cached (the
benchmarks or a sweep create them) and is skipped with the reason otherwise. A task whose package
or data is absent is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.task import Task, load_task

ROOT = Path(__file__).resolve().parents[2]


def _task(name: str) -> Task:
    return load_task(str(ROOT / "tasks" / f"{name}.py"))


def _module(name: str):  # the task's module, for its helpers
    import sys

    return sys.modules[type(_task(name)).__module__]


def _skip_unless_available(name: str) -> None:
    reason = _module(name).unavailable_reason()
    if reason:
        pytest.skip(reason)


def _forward(model: torch.nn.Module, task: Task, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model(*(torch.from_numpy(batch[n]) for n in task.input_names)).numpy()


# --- Fashion-MNIST ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion() -> Task:
    _skip_unless_available("fashion_mnist_cnn")
    return _task("fashion_mnist_cnn")


def test_fashion_mnist_splits_are_the_real_files_disjoint(fashion: Task) -> None:
    assert fashion.splits.sizes() == {"train": 55_000, "calibration": 5_000, "evaluation": 10_000}
    for split in fashion.splits.named().values():
        assert split.inputs.shape[1:] == (1, 28, 28) and split.inputs.dtype == np.float32
        assert 0.0 <= split.inputs.min() and split.inputs.max() <= 1.0
        assert set(np.unique(split.labels)) == set(range(10))
    # the official test set, in file order, with ids after the training file's
    assert fashion.splits.evaluation.ids[0] == 60_000
    assert np.bincount(fashion.splits.evaluation.labels).tolist() == [1_000] * 10


def test_fashion_mnist_model_takes_any_batch(fashion: Task) -> None:
    torch.manual_seed(0)
    model = fashion.make_model().eval()
    for n in (1, 3):
        assert _forward(model, fashion, fashion.example_inputs(n)).shape == (n, 10)


def test_fashion_mnist_trained_accuracy_when_cached(fashion: Task) -> None:
    if not fashion.weights_path().exists():
        pytest.skip("the Fashion-MNIST CNN is not trained on this machine yet (about 3 minutes, once)")
    model = fashion.build_model()
    batch, labels = next(fashion.eval_batches(2_000))
    # Measured: 92.5 % on the 10,000 test images; the margin absorbs a retrain elsewhere.
    assert fashion.metric(_forward(model, fashion, batch), labels) > 88.0


def test_read_idx_rejects_a_file_that_is_not_uint8_idx(tmp_path: Path) -> None:
    import gzip

    from sweeper.errors import TaskError

    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")
    with pytest.raises(TaskError, match="not a uint8 IDX"):
        _module("fashion_mnist_cnn").read_idx(bad)


# --- EfficientNet-Lite0 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet() -> Task:
    _skip_unless_available("efficientnet_lite0")
    return _task("efficientnet_lite0")


def test_efficientnet_evaluates_labelled_imagenet_photos_and_calibrates_on_others(effnet: Task) -> None:
    module = _module("efficientnet_lite0")
    views = effnet.views
    assert views["evaluation"].shape == (1080, 3, 224, 224) and views["evaluation"].dtype == np.uint8
    assert views["calibration"].shape == (1188, 3, 224, 224)
    assert effnet.calibration_size == 1188
    assert not set(views["evaluation_photos"]) & set(views["calibration_photos"])
    # the labels are the ImageNet classes in the photos' file names, one per view
    photos = module.imagenet_photos()
    assert [label for _, label in photos][:3] == [243, 559, 438]
    assert (views["labels"] == np.repeat([label for _, label in photos], module.VIEWS_PER_PHOTO)).all()
    labels = np.concatenate([labels for _, labels in effnet.eval_batches(batch_size=500)])
    assert (labels == views["labels"]).all()
    # calibration views are interleaved, so any first n mix the photos
    assert len(set(views["calibration_photos"][: len(module.CALIBRATION_PHOTOS)])) == len(module.CALIBRATION_PHOTOS)
    batch = effnet.example_inputs(2)["input"]
    assert batch.dtype == np.float32 and -1.0 <= batch.min() and batch.max() <= 1.0


def test_efficientnet_without_its_imagenet_photos_says_what_to_install(
    effnet: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import metadata

    from sweeper.errors import TaskError

    module = _module("efficientnet_lite0")

    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(TaskError, match=r"'foolbox' package is not installed \(pip install 'sweeper\[tasks\]'\)"):
        module.imagenet_photos()
    assert "foolbox" in (module.unavailable_reason() or "")


def test_efficientnet_pretrained_model_takes_any_batch_and_names_the_photos(effnet: Task) -> None:
    model = effnet.build_model()
    for n in (1, 3):
        assert _forward(model, effnet, effnet.example_inputs(n)).shape == (n, 1000)
    # the centre view of the first two photos (a bull mastiff, a folding chair): a real
    # pretrained model gets them right
    views, labels = effnet.views["evaluation"], effnet.views["labels"]
    module = _module("efficientnet_lite0")
    first = [0, module.VIEWS_PER_PHOTO]
    logits = _forward(model, effnet, {"input": module.normalise(views[first])})
    assert logits.argmax(axis=1).tolist() == labels[first].tolist() == [243, 559]


# --- MiniLM sentiment ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Task:
    _skip_unless_available("minilm_sentiment")
    from sweeper.errors import TaskError

    task = _task("minilm_sentiment")
    try:
        _ = task.data  # the first use fetches the vaderSentiment sdist with pip
    except TaskError as exc:
        pytest.skip(str(exc))
    return task


def test_minilm_data_are_the_rated_movie_snippets(minilm: Task) -> None:
    module = _module("minilm_sentiment")
    texts, scores = module.read_snippets(module.sdist_path(download=False))
    assert len(texts) == 10_605 and int((scores == 0).sum()) == 37
    data = minilm.data
    assert len(data["labels"]) == 10_566
    assert data["input_ids"].shape == (10_566, module.SEQ_LEN) and data["input_ids"].dtype == np.int64
    assert 0.45 < data["labels"].mean() < 0.55


def test_minilm_splits_are_disjoint_and_sized(minilm: Task) -> None:
    rows = minilm.split_rows
    assert {k: len(v) for k, v in rows.items()} == {"train": 8_066, "calibration": 500, "evaluation": 2_000}
    ids = {k: set(minilm.data["ids"][v]) for k, v in rows.items()}
    assert not ids["train"] & ids["calibration"] and not ids["train"] & ids["evaluation"]
    assert not ids["calibration"] & ids["evaluation"]
    batches = list(minilm.calibration_batches(40, batch_size=16))
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    assert minilm.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}


def test_minilm_model_takes_any_batch_and_sequence_length(minilm: Task) -> None:
    module = _module("minilm_sentiment")
    torch.manual_seed(0)
    model = module.SentenceClassifier(module.load_encoder()).eval()  # untrained head: shapes only
    batch = minilm.example_inputs(3)
    full = _forward(model, minilm, batch)
    assert full.shape == (3, 2)
    # trimming the padding changes nothing: the mask, not the length, decides
    width = int(batch["attention_mask"].sum(axis=1).max())
    trimmed = _forward(model, minilm, {k: v[:, :width] for k, v in batch.items()})
    np.testing.assert_allclose(full, trimmed, atol=1e-4)


# --- latency-only shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50_latency", "mobilenet_v2_latency", "bert_base_latency"])
def test_latency_only_tasks_say_so(name: str) -> None:
    task = _task(name)
    assert getattr(task, "latency_only", False) is True
    assert "synthetic" in task.metric_name
    assert task.name == name


def test_latency_only_inputs_have_the_real_shapes() -> None:
    assert _task("resnet50_latency").example_inputs(2)["input"].shape == (2, 3, 224, 224)
    bert = _task("bert_base_latency").example_inputs(2)
    assert bert["input_ids"].shape == (2, 128) and bert["input_ids"].dtype == np.int64
    assert (bert["input_ids"][:, 0] == 101).all() and (bert["attention_mask"] == 1).all()


def test_mobilenet_latency_model_is_seeded_and_takes_any_batch() -> None:
    task = _task("mobilenet_v2_latency")
    a, b = task.build_model(), task.build_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    for n in (1, 2):
        assert _forward(a, task, task.example_inputs(n)).shape == (n, 1000)


def test_minilm_converts_to_onnx_float16(minilm: Task, tmp_path) -> None:
    """A transformer export (int64 inputs, a Cast of the attention mask) loads and predicts in FP16."""
    from sweeper.backends import BuildContext, get_backend

    model = minilm.build_model()
    ctx = BuildContext(model=model, task=minilm, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    candidate = get_backend("onnxruntime_fp16").build(ctx, get_backend("onnxruntime_fp16").config({}))
    batch = minilm.example_inputs(4)
    expected = _forward(model, minilm, batch)
    got = candidate.predict(batch)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    assert np.abs(got - expected).max() < 0.05


def test_minilm_export_and_its_int8_take_any_sequence_length(minilm: Task, tmp_path) -> None:
    """The export has a dynamic sequence axis: with the padding trimmed away, the FP32 export's
    and ORT static INT8's logits stay the same (the mask, not the length, decides) and ORT dynamic
    INT8 runs and agrees (its activation ranges are taken per call, padding included, so its
    logits move a little)."""
    import onnx

    from sweeper.backends import BuildContext, get_backend

    model = minilm.build_model()
    ctx = BuildContext(model=model, task=minilm, workdir=tmp_path, cache_dir=tmp_path, num_threads=1)
    batch = minilm.example_inputs(4)
    width = int(batch["attention_mask"].sum(axis=1).max())
    assert width < batch["input_ids"].shape[1]
    trimmed = {k: v[:, :width] for k, v in batch.items()}
    expected = _forward(model, minilm, batch)
    assert minilm.padded_lengths(batch).tolist() == batch["attention_mask"].sum(axis=1).tolist()
    # static INT8's ranges are fixed at calibration, so cutting the padding changes nothing but
    # float rounding: sensitivity scores its single-layer models on cut batches (fully quantized it
    # loses ~12 points, so its classes are not compared with FP32's)
    cases = (
        ("onnxruntime_fp32", {}, 1e-4, True),
        ("onnxruntime_dynamic_int8", {}, 0.2, True),
        ("onnxruntime_static_int8", {"calibration_samples": 32}, 1e-3, False),
    )
    for name, params, atol, agrees in cases:
        backend = get_backend(name)
        assert backend.any_length, name
        candidate = backend.build(ctx, backend.config(params))
        inputs = onnx.load(str(candidate.path)).graph.input
        assert [d.dim_param for d in inputs[0].type.tensor_type.shape.dim] == ["batch", "sequence"], name
        full, short = candidate.predict(batch), candidate.predict(trimmed)
        np.testing.assert_allclose(short, full, atol=atol, err_msg=name)
        assert np.array_equal(short.argmax(-1), full.argmax(-1)), name
        assert not agrees or np.array_equal(short.argmax(-1), expected.argmax(-1)), name
