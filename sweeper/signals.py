"""Stopping a sweep cleanly on SIGINT or SIGTERM (Ctrl-C, ``kill``, ``timeout``, ``ray job stop``).

While trials run, a signal only raises a flag: the driver's loop stops asking, cancels the trials
in flight, records them as ``interrupted:`` rows, queues them to be asked again on ``--resume``,
and raises :class:`SweepInterrupted`. Outside the loop (the FP32 baseline, the sensitivity
ranking), or on a second signal, the handler raises at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sweeper.errors import SweeperError
from sweeper.location import StudyPath

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """Raised by the handler when a signal arrives where the sweep cannot stop gracefully.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SweepInterrupted(SweeperError):
    """The sweep was stopped by a signal; its rows are kept and ``--resume`` continues it."""

    def __init__(self, signum: int, study_dir: StudyPath | None, interrupted: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name}: {interrupted} trial(s) in flight were cancelled and recorded as "
            "interrupted; every finished row is kept"
        )
        self.signum = signum
        self.study_dir = study_dir
        self.interrupted = interrupted

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@dataclass
class StopFlag:
    """What the handler saw: the first stop signal, and whether the loop will act on it."""

    signum: int | None = None
    deferred: bool = False
    main_thread: bool = False

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not first or not self.deferred:
            raise StopRequested(signum)

    def install(self) -> None:
        """(Re)install the handlers; ``ray.init`` sets a SIGTERM handler of its own."""
        if self.main_thread:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.handle)


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install SIGINT/SIGTERM handlers for the block (main thread only) and restore the old ones.

    Signals reach the main thread only; elsewhere the flag stays down and KeyboardInterrupt
    behaves as usual.
    """
    flag = StopFlag(main_thread=threading.current_thread() is threading.main_thread())
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if flag.main_thread else {}
    flag.install()
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
