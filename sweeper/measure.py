"""Measurement: latency, accuracy drop, fidelity, and how sure each figure is.

Sections: timing (:func:`time_interleaved`), exclusive timing per machine
(:func:`exclusive_timing`), evaluation (:class:`EvalData`, :func:`predict_rows`), accuracy and
fidelity, and uncertainty (:class:`DropCounts`, :func:`drop_interval`, :func:`should_prune`,
:func:`tied`).

The FP32 baseline is timed in the same process as the candidate, in alternating rounds, so that
``speedup`` compares two models under the same machine load; absolute times on a busy machine
drift, the ratio much less.

Exclusive timing on a machine: one timed phase at a time, and a ledger that checks it.

Builds, calibration and evaluation of concurrent trials may overlap; their timed phases (warm-up
and the interleaved rounds) may not, or one trial's threads bill another's latency. A trial holds
an exclusive ``flock`` on a file in the machine's temporary folder for its timed phase, so every
Ray worker on the machine (every simulated node of a one-machine cluster too: they share the
cores) takes its turn. After the phase the trial reads a ledger of the phases timed on the
machine and counts those that overlapped its own: zero by construction, and checked rather than
assumed (a lock on a filesystem that ignores ``flock`` would show here).

How sure a decision is: an accuracy drop's interval, the pruning test, and latency ties.

An accuracy drop between the FP32 model and a candidate, measured on the same ``n`` samples,
rests on the discordant samples: ``worse`` samples FP32 classifies right and the candidate wrong,
``better`` the other way round. The drop in points is ``100 * (worse - better) / n``. Each
discordant count is binomial, so exact (Clopper-Pearson) bounds on the two rates bound the drop;
splitting the error level between them (Bonferroni) keeps the bound valid without assuming the
two are independent. The bounds are conservative: on a finite evaluation split sampled without
replacement the true spread is smaller.

Latency: two configurations whose medians differ by less than the noise of their timed rounds
are a tie; the noise is a bootstrap interval of the ratio of their medians.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sweeper.spec import Batch, LatencyStats, MeasureSettings

DropMode = Literal["absolute", "relative"]


def latency_stats(seconds: Iterable[float]) -> LatencyStats:
    """Summarise per-call times given in seconds as milliseconds."""
    ms = np.asarray(list(seconds), dtype=np.float64) * 1000.0
    if ms.size == 0:
        raise ValueError("latency_stats needs at least one timed run")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        mean=float(ms.mean()),
        std=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        runs=int(ms.size),
    )


def time_interleaved(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    settings: MeasureSettings,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[LatencyStats, LatencyStats]:
    """Time ``baseline`` and ``candidate`` in alternating rounds; return (baseline, candidate).

    Each round times ``round_size`` calls of one model, then of the other; the order flips every
    round so that neither model always runs right after the other's cache effects.
    """
    for _ in range(settings.warmup_runs):
        baseline()
        candidate()
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    fns = {"baseline": baseline, "candidate": candidate}
    start = clock()
    round_index = 0
    while True:
        done = len(times["candidate"])
        enough_runs = done >= settings.min_runs and clock() - start >= settings.min_time_s
        if enough_runs or done >= settings.max_runs:
            break
        order = ("baseline", "candidate") if round_index % 2 == 0 else ("candidate", "baseline")
        calls = min(settings.round_size, settings.max_runs - done)
        for name in order:
            fn, sink = fns[name], times[name]
            for _ in range(calls):
                t0 = clock()
                fn()
                sink.append(clock() - t0)
        round_index += 1
    return latency_stats(times["baseline"]), latency_stats(times["candidate"])


def accuracy_drop(
    fp32: float, candidate: float, *, higher_is_better: bool = True, mode: DropMode = "absolute"
) -> float:
    """How much worse ``candidate`` is than ``fp32``; positive means worse.

    ``absolute`` is in the metric's own units (points, for a percentage); ``relative`` is in
    percent of the FP32 value.
    """
    drop = fp32 - candidate if higher_is_better else candidate - fp32
    if mode == "absolute":
        return float(drop)
    if mode == "relative":
        if fp32 == 0:
            raise ValueError("a relative accuracy drop is undefined when the FP32 metric is 0")
        return float(drop / abs(fp32) * 100.0)
    raise ValueError(f"unknown drop mode '{mode}'; allowed: absolute, relative")


def agreement_pct(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Percent of samples whose top-1 class matches the reference's (last axis = classes)."""
    if reference.shape != outputs.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the reference's {reference.shape}")
    return float(np.mean(np.argmax(reference, -1) == np.argmax(outputs, -1)) * 100.0)


def max_abs_error(reference: np.ndarray, outputs: np.ndarray) -> float:
    """Largest absolute difference between two outputs of the same shape."""
    if reference.shape != outputs.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the reference's {reference.shape}")
    return float(np.max(np.abs(reference.astype(np.float64) - outputs.astype(np.float64))))


# The ledger keeps this many recent phases; older ones cannot overlap a phase starting now.
LEDGER_ENTRIES = 1000


@dataclass(frozen=True)
class EvalData:
    """The evaluation split as the task yields it: its batches (kept as they are, so batches of
    different widths stay valid) and every sample's label, in order."""

    batches: list[Batch]
    labels: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        """Where each batch starts in the split, and the split's end."""
        sizes = [len(next(iter(b.values()))) for b in self.batches]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def of(cls, labeled_batches: Iterable[tuple[Batch, np.ndarray]]) -> EvalData:
        """The split a task's ``eval_batches`` (or ``confirm_batches``) yields, kept in memory."""
        batches, labels = [], []
        for batch, y in labeled_batches:
            batches.append(batch)
            labels.append(np.asarray(y))
        return cls(batches=batches, labels=np.concatenate(labels))

    def select(self, rows: np.ndarray) -> EvalData:
        """The samples at the sorted indices ``rows``, each batch cut to its chosen rows."""
        offsets, batches = self.offsets, []
        for i, batch in enumerate(self.batches):
            chosen = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
            if len(chosen):
                batches.append({name: value[chosen] for name, value in batch.items()})
        return EvalData(batches=batches, labels=self.labels[rows])

    def digest(self) -> str:
        """A hash of every input array and the labels."""
        sha = hashlib.sha256()
        for batch in self.batches:
            for name in sorted(batch):
                array = np.ascontiguousarray(batch[name])
                sha.update(f"{name}{array.dtype}{array.shape}".encode())
                sha.update(array.tobytes())
        sha.update(np.ascontiguousarray(self.labels).tobytes())
        return sha.hexdigest()[:16]


def predict_rows(predict: Callable[[Batch], Any], data: EvalData, rows: np.ndarray | None = None) -> np.ndarray:
    """``predict``'s outputs on the given sorted sample indices of ``data`` (all when ``None``),
    in that order; each batch is cut to its chosen rows."""
    pieces = []
    offsets = data.offsets
    for i, batch in enumerate(data.batches):
        start, stop = offsets[i], offsets[i + 1]
        if rows is not None:
            chosen = rows[(rows >= start) & (rows < stop)] - start
            if len(chosen) == 0:
                continue
            if len(chosen) < stop - start:
                batch = {name: value[chosen] for name, value in batch.items()}
        pieces.append(np.asarray(predict(batch), dtype=np.float32))
    return np.concatenate(pieces)


def predict_rows_by_length(
    predict: Callable[[Batch], Any],
    data: EvalData,
    rows: np.ndarray | None,
    lengths: Callable[[Batch], np.ndarray],
    padded: Collection[str],
    batch_size: int = 64,
) -> np.ndarray:
    """:func:`predict_rows` for padded sequences: the chosen samples are sorted by ``lengths``
    (each sample's unpadded length), batched ``batch_size`` at a time, and each batch's
    ``padded`` inputs are cut along axis 1 to its longest sample; outputs come back in row order.

    Falls back to :func:`predict_rows` when the batches differ in width (nothing to concatenate).
    """
    chosen = data if rows is None else data.select(rows)
    if not chosen.batches or any(len({b[name].shape[1:] for b in chosen.batches}) > 1 for name in chosen.batches[0]):
        return predict_rows(predict, data, rows)
    inputs = {name: np.concatenate([b[name] for b in chosen.batches]) for name in chosen.batches[0]}
    length = np.maximum(np.asarray(lengths(inputs)), 1)
    order = np.argsort(length, kind="stable")
    outputs: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        longest = int(length[picked].max())
        batch = {name: (v[picked, :longest] if name in padded else v[picked]) for name, v in inputs.items()}
        out = np.asarray(predict(batch), dtype=np.float32)
        if outputs is None:
            outputs = np.empty((len(order), *out.shape[1:]), dtype=np.float32)
        outputs[picked] = out
    assert outputs is not None
    return outputs


# The evaluation split is divided once into a trial part and a held-out part (for the finalists'
# confirmation): this share is held out, seeded, stratified by label, but never so much that the
# trial part falls below MIN_TRIAL_SAMPLES; a split too small for MIN_HELD_OUT held-out samples
# holds nothing out.
HELD_OUT_FRACTION = 1.0 / 3.0
HELD_OUT_SEED = 0
MIN_TRIAL_SAMPLES = 200
MIN_HELD_OUT = 30


def held_out_indices(labels: np.ndarray, fraction: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """Sorted indices of the evaluation samples held out for confirmation (maybe none).

    Stratified by label when the labels are one integer class per sample, else a seeded random
    share; sized so that the trial part keeps at least ``MIN_TRIAL_SAMPLES`` samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    wanted = min(round(n * fraction), n - MIN_TRIAL_SAMPLES)
    if wanted < MIN_HELD_OUT:
        return np.zeros(0, dtype=np.int64)
    if labels.ndim == 1 and labels.dtype.kind in "iub":
        chosen = stratified_subset(labels, wanted / n, seed)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=wanted, replace=False))
    return chosen.astype(np.int64)

def trial_indices(labels: np.ndarray, own_confirmation_split: bool = False) -> np.ndarray | None:
    """The evaluation samples trials are scored on: all (``None``) when the task has a
    confirmation split of its own or the split is too small to hold a part out."""
    if own_confirmation_split:
        return None
    held = held_out_indices(labels)
    if not len(held):
        return None
    return np.setdiff1d(np.arange(len(labels)), held)


@dataclass
class TimedPhase:
    """What a timed phase recorded: how long it waited for the lock, and how many other timed
    phases on this machine overlapped it."""

    wait_s: float = 0.0
    concurrent: int = 0


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "sweeper-timing"


@contextmanager
def exclusive_timing(lock_dir: Path | None = None) -> Iterator[TimedPhase]:
    """Hold the machine's timing lock for the block; fill in the wait and the overlap count."""
    directory = lock_dir or default_lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    phase = TimedPhase()
    with open(directory / "timing.lock", "a+") as lock:
        asked = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        phase.wait_s = time.monotonic() - asked
        start = time.time()
        try:
            yield phase
        finally:
            end = time.time()
            phase.concurrent = record_phase(directory / "timing-ledger.jsonl", start, end)
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_phase(ledger: Path, start: float, end: float) -> int:
    """Append the phase ``[start, end]`` to the ledger; return how many recorded phases overlap it.

    Called with the timing lock held, so the ledger has one writer at a time.
    """
    entries = []
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    overlapping = sum(1 for e in entries if e["start"] < end and e["end"] > start)
    entries.append({"start": start, "end": end, "pid": os.getpid()})
    text = "".join(json.dumps(e) + "\n" for e in entries[-LEDGER_ENTRIES:])
    tmp = ledger.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, ledger)
    return overlapping


@dataclass(frozen=True, kw_only=True)
class DropCounts:
    """The paired counts behind an accuracy drop on ``n`` samples (top-1 classification)."""

    n: int
    worse: int
    better: int

    @classmethod
    def from_predictions(cls, fp32_correct: np.ndarray, candidate_correct: np.ndarray) -> DropCounts:
        fp32_correct = np.asarray(fp32_correct, dtype=bool)
        candidate_correct = np.asarray(candidate_correct, dtype=bool)
        return cls(
            n=len(fp32_correct),
            worse=int(np.sum(fp32_correct & ~candidate_correct)),
            better=int(np.sum(~fp32_correct & candidate_correct)),
        )

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.worse - self.better) / self.n


def _rate_bounds(k: int, n: int, level: float) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) bounds on a binomial rate at confidence ``level``."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def drop_interval(counts: DropCounts, confidence: float = 0.95) -> tuple[float, float]:
    """A two-sided interval (points) for the drop on the population the ``n`` samples came from."""
    # Each of the four one-sided bounds gets (1 - confidence) / 4; a two-sided bound at level
    # 1 - 2a has one-sided error a on each side.
    level = 1.0 - (1.0 - confidence) / 2.0
    worse_low, worse_high = _rate_bounds(counts.worse, counts.n, level)
    better_low, better_high = _rate_bounds(counts.better, counts.n, level)
    return 100.0 * (worse_low - better_high), 100.0 * (worse_high - better_low)


def drop_lower_bound(counts: DropCounts, confidence: float = 0.95) -> float:
    """A one-sided lower confidence bound (points) on the drop."""
    # One-sided error (1 - confidence) / 2 on each rate: a two-sided interval at level ``confidence``.
    worse_low, _ = _rate_bounds(counts.worse, counts.n, confidence)
    _, better_high = _rate_bounds(counts.better, counts.n, confidence)
    return 100.0 * (worse_low - better_high)


def should_prune(counts: DropCounts, max_drop_points: float, confidence: float = 0.95) -> bool:
    """Whether the drop on the whole split exceeds ``max_drop_points`` with ``confidence``.

    A candidate whose true drop is at the limit is pruned with probability at most
    ``1 - confidence``.
    """
    return drop_lower_bound(counts, confidence) > max_drop_points


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random share of each label's samples (at least one each)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = max(1, round(len(rows) * fraction))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


def latency_ratio_interval(
    a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of ``median(a) / median(b)`` from two samples of per-call latencies."""
    a = np.asarray(a_ms, dtype=float)
    b = np.asarray(b_ms, dtype=float)
    rng = np.random.default_rng(seed)
    a_medians = np.median(rng.choice(a, (resamples, len(a))), axis=1)
    ratios = a_medians / np.median(rng.choice(b, (resamples, len(b))), axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1.0 - tail))


def tied(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = 0.95, margin: float = 0.0) -> bool:
    """Whether two latency samples are within each other's noise: the ratio interval of their
    medians reaches into ``[1 / (1 + margin), 1 + margin]`` (with ``margin`` 0: holds 1).

    ``margin`` is the difference taken as no difference at all: one run's rounds measure the noise
    within that run, not how far a second run on the same machine lands from it.
    """
    low, high = latency_ratio_interval(a_ms, b_ms, confidence)
    return low <= 1.0 + margin and high >= 1.0 / (1.0 + margin)
