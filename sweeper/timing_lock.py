"""Exclusive timing on a machine: one timed phase at a time, and a ledger that checks it.

Builds, calibration and evaluation of concurrent trials may overlap; their timed phases (warm-up
and the interleaved rounds) may not, or one trial's threads bill another's latency. A trial holds
an exclusive ``flock`` on a file in the machine's temporary folder for its timed phase, so every
Ray worker on the machine (every simulated node of a one-machine cluster too: they share the
cores) takes its turn. After the phase the trial reads a ledger of the phases timed on the
machine and counts those that overlapped its own: zero by construction, and checked rather than
assumed (a lock on a filesystem that ignores ``flock`` would show here).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# The ledger keeps this many recent phases; older ones cannot overlap a phase starting now.
LEDGER_ENTRIES = 1000


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
