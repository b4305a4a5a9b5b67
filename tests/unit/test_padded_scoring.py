"""Scoring padded sequences on length-sorted batches cut to their longest sample
(:func:`sweeper.measure.predict_rows_by_length`, used by the sensitivity scoring)."""

from __future__ import annotations

import numpy as np

from sweeper.measure import EvalData, predict_rows, predict_rows_by_length


def _padded_split(lengths: list[int], width: int = 12, batch: int = 4) -> EvalData:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(len(lengths), width))
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = ids * mask  # padding (id 0) after each sentence
    batches = [{"ids": ids[i : i + batch], "mask": mask[i : i + batch]} for i in range(0, len(lengths), batch)]
    return EvalData(batches=batches, labels=np.arange(len(lengths)))


def _masked_model(seen_widths: list[int]):
    """Logits that depend on the unpadded tokens only, as a masked encoder's do."""

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        seen_widths.append(batch["ids"].shape[1])
        assert batch["ids"].shape == batch["mask"].shape
        kept = batch["ids"] * batch["mask"]
        return np.stack([kept.sum(axis=1), (kept**2).sum(axis=1)], axis=1).astype(np.float32)

    return predict


def _lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["mask"].sum(axis=1)


def test_sorted_cut_batches_give_the_padded_outputs_in_row_order() -> None:
    lengths = [3, 12, 1, 7, 2, 2, 9, 4, 11, 5]
    data = _padded_split(lengths)
    for rows in (None, np.array([0, 2, 3, 6, 9])):
        padded_widths: list[int] = []
        cut_widths: list[int] = []
        expected = predict_rows(_masked_model(padded_widths), data, rows)
        got = predict_rows_by_length(_masked_model(cut_widths), data, rows, _lengths, ["ids", "mask"], batch_size=3)
        np.testing.assert_array_equal(got, expected)
        assert set(padded_widths) == {12}
        chosen = np.asarray(lengths) if rows is None else np.asarray(lengths)[rows]
        # batches of 3 in length order, each as wide as its longest sentence
        assert cut_widths == [
            int(chosen[np.argsort(chosen, kind="stable")][i : i + 3].max()) for i in range(0, len(chosen), 3)
        ]
        assert sum(cut_widths) < sum(padded_widths[: len(cut_widths)])


def test_inputs_that_are_not_padded_pass_whole() -> None:
    data = _padded_split([2, 5, 3, 1])
    data.batches[:] = [b | {"extra": np.ones((len(b["ids"]), 6))} for b in data.batches]
    widths: list[int] = []

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        widths.append(batch["extra"].shape[1])
        return _masked_model([])(batch)

    predict_rows_by_length(predict, data, None, _lengths, ["ids", "mask"], batch_size=2)
    assert widths == [6, 6]


def test_batches_of_different_widths_are_scored_as_they_are() -> None:
    data = _padded_split([2, 5, 3, 1, 4, 6], batch=3)
    data.batches[1] = {name: np.pad(value, ((0, 0), (0, 4))) for name, value in data.batches[1].items()}
    widths: list[int] = []
    got = predict_rows_by_length(_masked_model(widths), data, None, _lengths, ["ids", "mask"], batch_size=2)
    np.testing.assert_array_equal(got, predict_rows(_masked_model([]), data, None))
    assert widths == [12, 16]


class _PaddedTask:
    input_names = ("ids", "mask")
    dynamic_axes = {"ids": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}

    def padded_lengths(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return _lengths(batch)


def test_sensitivity_cuts_batches_only_for_backends_that_take_any_length() -> None:
    from sweeper.scoring import _predict

    data = _padded_split([3, 10, 1, 7, 2, 2, 9, 4])  # padded to 12
    expected = predict_rows(_masked_model([]), data, None)
    for backend, cut in (("onnxruntime_static_int8", True), ("onnxruntime_fp32", True), ("torch_dynamic_int8", False)):
        widths: list[int] = []
        np.testing.assert_array_equal(_predict(_PaddedTask(), backend, _masked_model(widths), data, None), expected)
        assert (max(widths) < 12) == cut, backend
    # a task that pads nothing is scored on its own batches
    unpadded = _PaddedTask()
    unpadded.padded_lengths = lambda batch: None  # type: ignore[method-assign]
    widths = []
    _predict(unpadded, "onnxruntime_fp32", _masked_model(widths), data, None)
    assert set(widths) == {12}
