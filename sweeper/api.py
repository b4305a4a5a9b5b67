"""The Python API: run a sweep, and open a study to read its winner, rows, report and export.

::

    import sweeper

    study = sweeper.run("search_spaces/quickstart.yaml", trials=10)   # or a dict space
    study.best                # the winner's row (a pandas Series), or None
    study.verdict             # one sentence: the winner, or why there is none
    study.rows                # every row, a DataFrame (as sweeper.load(study.dir))
    study.export("shipped/")  # the winner's model, config and loader
    study.report()            # STUDY/report/report.html

Bad input raises :class:`~sweeper.errors.SweeperInputError` (or a subclass) before anything
starts; its message names the argument. A sweep stopped by Ctrl-C (a notebook's interrupt) or
SIGTERM raises :class:`~sweeper.signals.SweepInterrupted` after recording the trials in flight;
``run(..., resume=True)`` continues it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from sweeper import analysis, results
from sweeper.confirmed import describe_split
from sweeper.errors import SweeperInputError
from sweeper.export import Export, export_trial
from sweeper.location import StudyPath, location
from sweeper.progress import SweepProgress
from sweeper.report import Report, write_report
from sweeper.space import check_constraint, load_space
from sweeper.study import SweepOptions, run_sweep
from sweeper.task import check_task_file, find_task_file, load_task, task_search_dirs

if TYPE_CHECKING:
    import pandas as pd

# Command-line flags in shared messages, and the argument of run() each one is.
_ARGUMENTS = {
    "--resume": "resume=True",
    "--out": "out=",
    "--study": "study=",
    "--address": "address=",
    "--storage": "storage=",
    "--task": "task=",
    "--trials": "trials=",
}


def run(
    space: str | Path | Mapping[str, Any],
    *,
    task: str | Path | None = None,
    trials: int | None = None,
    out: str | Path = "results",
    study: str | None = None,
    max_concurrent: int | None = None,
    address: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    storage: str | None = None,
    progress: bool = True,
) -> Study:
    """Run (or with ``resume=True`` continue) a sweep; return its study.

    Args:
        space: a search-space file, or a dict with the same keys (``task``, ``constraint``,
            ``backends``, ...).
        task: a task name or ``.py`` file, instead of the space's.
        trials: the number of trials in total, instead of the space's.
        out: the results folder (a path or an object-store URI); the study goes in ``out/study``.
        study: the study's name (default: the space's, else its file's name).
        max_concurrent: trials in flight at once.
        address: a Ray cluster to join (``"auto"``, ``"ray://HOST:10001"``); default an embedded Ray.
        resume: continue the study in ``out/study``.
        seed: the sampler's seed.
        storage: an Optuna RDB URL for the study instead of its journal file.
        progress: show a live progress display.

    Raises:
        SweeperInputError: for bad input, with a message naming the argument.
        SweepInterrupted: when SIGINT or SIGTERM stopped the sweep (its rows are kept).
    """
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise SweeperInputError(f"trials={trials!r}: give a whole number of trials, at least 1")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise SweeperInputError(f"max_concurrent={max_concurrent!r}: give a whole number, at least 1")
    try:
        loaded = load_space(space)
        task_ref = str(task) if task is not None else loaded.task
        task_file = check_task_file(find_task_file(task_ref, task_search_dirs(loaded.path)))
        check_constraint(loaded, load_task(str(task_file)))
        options = SweepOptions(
            out=out, study=study, task=str(task) if task is not None else None, trials=trials,
            max_concurrent=max_concurrent, seed=seed, address=address, resume=resume, storage=storage,
        )
        if progress:
            with SweepProgress(Console(), loaded.objective) as display:
                summary = run_sweep(loaded, options, display.on_event)
        else:
            summary = run_sweep(loaded, options)
    except SweeperInputError as exc:
        raise type(exc)(_as_arguments(str(exc))) from None
    return Study(summary.study_dir)


def _as_arguments(message: str) -> str:
    """A message written for the command line, with its flags as run()'s arguments."""
    return re.sub(r"--[a-z-]+", lambda m: _ARGUMENTS.get(m.group(0), m.group(0)), message)


def open_study(where: str | Path) -> Study:
    """Open a finished (or running) study folder: a local path or an object-store URI.

    Raises:
        SweeperInputError: when ``where`` holds no study.
    """
    folder = location(where)
    if not results.trials_dir(folder).is_dir():
        raise SweeperInputError(f"'{where}' is not a study folder (it has no trials/ folder)")
    return Study(folder)


class Study:
    """A study folder and what its rows say."""

    def __init__(self, directory: StudyPath) -> None:
        self.dir = directory

    def __repr__(self) -> str:
        return f"Study({str(self.dir)!r})"

    @property
    def rows(self) -> pd.DataFrame:
        """Every row of the study (read afresh on each access)."""
        return results.load(self.dir)

    @property
    def objective(self) -> str:
        return analysis.study_settings(self.dir).objective

    def feasible(self) -> pd.DataFrame:
        """The feasible trials, best first by the study's objective (its direction followed)."""
        settings = analysis.study_settings(self.dir)
        higher_is_better = settings.baseline.higher_is_better if settings.baseline is not None else True
        maximise = analysis.maximised(settings.objective, metric_higher_is_better=higher_is_better)
        return analysis.best_feasible(self.rows, settings.objective, k=max(1, len(self.rows)), maximise=maximise)

    @property
    def best(self) -> pd.Series | None:
        """The winner's row, or ``None`` when no trial met the constraint (see :attr:`verdict`).

        In a confirmed study the winner is chosen from the finalists' confirmed figures (its row
        carries them as ``confirmed_*``); otherwise from the trials' own."""
        feasible = self.feasible()
        return None if feasible.empty else feasible.iloc[0]

    @property
    def verdict(self) -> str:
        """One sentence: the winner and its figures, or why there is none."""
        rows = self.rows
        best = self.best
        if best is not None and analysis.confirmed_within_budget(best):
            tied = analysis.ties_of(rows, best)
            return (
                f"trial {best.trial_number} {best.backend} is the best feasible, from confirmed figures: "
                f"{best.confirmed_latency_ms_p50:.3f} ms p50, speedup {best.confirmed_speedup:.2f}x, accuracy drop "
                f"{best.confirmed_accuracy_drop:.2f} on {describe_split(best.confirmed_split, best.confirmed_samples)}"
                + (f"; tied within the timing noise with trial(s) {', '.join(map(str, tied['trial_number']))}"
                   if not tied.empty else "")
            )
        if best is not None:
            return (
                f"trial {best.trial_number} {best.backend} is the best feasible (not confirmed: its trial's "
                f"figures): {best.latency_ms_p50:.3f} ms p50, speedup {best.speedup:.2f}x, accuracy drop "
                f"{best.accuracy_drop:.2f}"
            )
        if rows.empty:
            return "no trial has finished"
        close = analysis.closest_infeasible(rows)
        limit = rows["max_drop"].dropna()
        budget = f" {limit.iloc[0]:g}" if not limit.empty else ""
        if close.empty:
            return f"no configuration met max drop{budget}; no trial completed"
        c = close.iloc[0]
        return (
            f"no configuration met max drop{budget}; closest: trial {c.trial_number} {c.backend}, "
            f"drop {c.accuracy_drop:.2f}"
        )

    def export(self, to: str | Path, trial: int | None = None) -> Export:
        """Export the winner (or trial ``trial``): its model, config, one-trial space and loader."""
        return export_trial(self._local("export"), to, trial=trial, best=trial is None)

    def report(self, out: str | Path | None = None) -> Report:
        """Write the HTML report and Markdown summary (default: ``STUDY/report/``)."""
        return write_report(self._local("report"), out)

    def _local(self, what: str) -> Path:
        if not isinstance(self.dir, Path):
            raise SweeperInputError(f"{what} reads a local study folder; '{self.dir}' is on object storage")
        return self.dir
