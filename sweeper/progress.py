"""Live progress of a sweep on the terminal (rich)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.progress import Progress
from rich.table import Column
from rich.text import Text

from sweeper.confirmed import describe_split
from sweeper.events import (
    ConfirmationFinished,
    ConfirmationStarted,
    Event,
    SensitivityProgress,
    SweepPhase,
    SweepStarted,
    TrialFinished,
    TrialStarted,
)


class _Progress(Progress):
    """Bars first, then each task's status as wrapping lines under them, so that a narrow
    terminal wraps the best trial's backend name instead of cutting it short."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            status = task.fields.get("status")
            if status:
                yield Padding(Text(status), (0, 0, 0, 2), expand=False)


class SweepProgress:
    """A live progress bar: trials done / running / failed / pruned and the best feasible so far.

    Sensitivity scoring before the trials gets a bar of its own.
    """

    def __init__(self, console: Console, objective: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.objective = objective
        self.progress = _Progress(
            TextColumn("[bold]{task.description}", table_column=Column(overflow="fold")), BarColumn(bar_width=24),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False,
        )
        self.task_id: Any = None
        self.phase_id: Any = None
        self.running = self.failed = self.complete = self.pruned = 0
        self.sensitivity: dict[str, Any] = {}
        self.best: float | None = None
        self.best_desc = "none yet"

    def __enter__(self) -> SweepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def on_event(self, event: Event) -> None:
        if isinstance(event, SweepPhase):
            # A line stays in the log (and in a pipe); on a terminal a live line keeps the clock.
            self.console.print(Text(f"{event.text} ...", style="dim"))
            if not self.console.is_terminal:
                return
            if self.phase_id is None:
                self.phase_id = self.progress.add_task(escape(event.text), total=None, status="")
            else:
                self.progress.update(self.phase_id, description=escape(event.text))
            return
        if isinstance(event, ConfirmationStarted | ConfirmationFinished):
            self.console.print(Text(_confirmation_line(event)))
            return
        if isinstance(event, SweepStarted) and self.phase_id is not None:
            self.progress.remove_task(self.phase_id)
            self.phase_id = None
        if isinstance(event, SweepStarted):
            self.console.print(Text(
                f"Study '{event.study}' in {event.study_dir}: FP32 metric {event.accuracy_fp32:.2f}, "
                f"{event.done} trials already done, {event.trials} to run, {event.max_concurrent} at a time"
            ))
            self.task_id = self.progress.add_task(escape(event.study), total=event.trials, status="")
        elif isinstance(event, SensitivityProgress):
            backend = event.backend
            if backend not in self.sensitivity:
                self.sensitivity[backend] = self.progress.add_task(
                    escape(f"layers scored, {backend}"), total=event.total, status=""
                )
            self.progress.update(self.sensitivity[backend], completed=event.done, total=event.total)
        elif isinstance(event, TrialStarted):
            self.running += 1
        elif isinstance(event, TrialFinished):
            data = event.row
            self.running = max(0, self.running - 1)
            if data["state"] == "complete":
                self.complete += 1
                value = data.get(self.objective)
                if data.get("feasible") and value is not None and (self.best is None or value < self.best):
                    self.best = value
                    self.best_desc = f"{value:.3f} ({data['backend']}, trial {data['trial_number']})"
            elif data["state"] == "pruned":
                self.pruned += 1
            else:
                self.failed += 1
            if self.task_id is not None:
                self.progress.advance(self.task_id)
        if self.task_id is not None:
            self.progress.update(
                self.task_id,
                status=(
                    f"running {self.running}  failed {self.failed}  pruned {self.pruned}  "
                    f"best feasible {self.objective}: {self.best_desc}"
                ),
            )


def _confirmation_line(event: ConfirmationStarted | ConfirmationFinished) -> str:
    if isinstance(event, ConfirmationStarted):
        trials = ", ".join(str(n) for n in event.trials)
        return (
            f"Confirming {len(event.trials)} finalists (trials {trials}): re-timed together round-robin with FP32, "
            f"at least {event.min_runs} runs each, and re-scored on {describe_split(event.split, event.samples)} ..."
        )
    held = sum(1 for r in event.rows if r.get("confirmed_feasible"))
    failed = sum(1 for r in event.rows if r.get("confirmed_error"))
    return (
        f"Confirmed {len(event.rows)} finalists: {held} within the budget on the confirmation split"
        + (f", {failed} could not be confirmed" if failed else "")
    )
