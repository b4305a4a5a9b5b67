"""The live progress display says what the sweep does from its first second, in a pipe too."""

from __future__ import annotations

import io

from rich.console import Console

from sweeper.events import SweepPhase, SweepStarted
from sweeper.progress import SweepProgress


def test_phases_before_the_trials_are_printed_then_give_way_to_the_trials() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True)
    with SweepProgress(console, "latency_ms_p50") as progress:
        progress.on_event(SweepPhase(text="starting an embedded local Ray"))
        assert progress.phase_id is not None, "a terminal gets a live line with a clock"
        progress.on_event(SweepPhase(text="measuring the FP32 baseline of digits_cnn"))
        progress.on_event(SweepStarted(study="s", study_dir="/tmp/s", trials=3, done=0, max_concurrent=2,
                                       accuracy_fp32=99.0))
        assert progress.phase_id is None and progress.task_id is not None
    text = out.getvalue()
    assert "starting an embedded local Ray ..." in text and "measuring the FP32 baseline of digits_cnn ..." in text


def test_in_a_pipe_phases_are_plain_lines() -> None:
    out = io.StringIO()
    with SweepProgress(Console(file=out, width=80), "latency_ms_p50") as progress:
        progress.on_event(SweepPhase(text="joining the Ray cluster at auto"))
        assert progress.phase_id is None
    assert out.getvalue().splitlines()[0] == "joining the Ray cluster at auto ..."
