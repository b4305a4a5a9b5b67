"""Exclusive timing: phases of several processes never overlap, and the ledger checks it."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from sweeper.measure import exclusive_timing, record_phase


def _phases(lock_dir: str, out: multiprocessing.Queue) -> None:
    for _ in range(3):
        with exclusive_timing(Path(lock_dir)) as phase:
            start = time.time()
            time.sleep(0.1)
            end = time.time()
        out.put((start, end, phase.wait_s, phase.concurrent))


def test_phases_of_concurrent_processes_never_overlap(tmp_path: Path) -> None:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_phases, args=(str(tmp_path), queue)) for _ in range(3)]
    for w in workers:
        w.start()
    phases = [queue.get(timeout=30) for _ in range(9)]
    for w in workers:
        w.join(timeout=30)
    spans = sorted((start, end) for start, end, _, _ in phases)
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), "no overlap"
    assert all(concurrent == 0 for *_, concurrent in phases)
    assert max(wait for _, _, wait, _ in phases) > 0.05, "some phase waited for the lock"


def test_the_ledger_counts_overlapping_phases(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    assert record_phase(ledger, 10.0, 20.0) == 0
    assert record_phase(ledger, 20.0, 30.0) == 0  # touching is not overlapping
    assert record_phase(ledger, 15.0, 25.0) == 2  # what a lock that failed would let happen
