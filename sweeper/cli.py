"""The ``sweeper`` command line: run a sweep, list backends, show a study."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sweeper.errors import SweeperInputError

app = typer.Typer(
    help="Find the fastest deployable form of a trained model within an accuracy budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# Exit codes: 0 a feasible configuration was found; 2 bad input (nothing started);
# 3 the sweep finished but no configuration met the constraint (every row is kept).
INPUT_ERROR = 2
NOTHING_FEASIBLE = 3


def _fail(exc: BaseException, debug: bool) -> typer.Exit:
    if debug:
        err_console.print(traceback.format_exc())
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(INPUT_ERROR)


@app.command()
def run(
    space_file: Annotated[Path, typer.Argument(help="search space YAML file", metavar="SPACE")],
    task: Annotated[str | None, typer.Option(help="task name or .py file (overrides the space's)")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="trials to run in total (overrides the space's)")] = None,
    out: Annotated[Path, typer.Option(help="results folder; the study goes in OUT/STUDY")] = Path("results"),
    study: Annotated[str | None, typer.Option(help="study name (default: the space's, else its file name)")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="trials in flight at once")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: embedded local Ray")] = None,
    resume: Annotated[bool, typer.Option(help="continue an existing study")] = False,
    seed: Annotated[int | None, typer.Option(help="sampler seed")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks and Ray worker logs")] = False,
) -> None:
    """Run a sweep: Optuna proposes configurations, Ray tasks build and measure them."""
    from sweeper.progress import SweepProgress
    from sweeper.space import load_space
    from sweeper.study import SweepOptions, run_sweep

    try:
        space = load_space(space_file)
        options = SweepOptions(
            out=out, study=study, task=task, trials=trials, max_concurrent=max_concurrent,
            seed=seed, address=address, resume=resume, debug=debug,
        )
        with SweepProgress(console, space.objective) as progress:
            summary = run_sweep(space, options, progress.on_event)
    except SweeperInputError as exc:
        raise _fail(exc, debug) from None
    from sweeper import results

    df = results.load(summary.study_dir)
    console.print(f"Study folder: {summary.study_dir}  (wall time {summary.wall_time_s:.1f} s)")
    if not _print_summary(df, space.objective):
        raise typer.Exit(NOTHING_FEASIBLE)


@app.command()
def backends() -> None:
    """List every backend and whether it can run here."""
    from sweeper.backends import BACKENDS, availability, get_backend

    table = Table(title="Backends")
    # Names stay whole however narrow the terminal; the other columns wrap.
    table.add_column("backend", no_wrap=True, min_width=max(map(len, BACKENDS)))
    for col in ("hardware", "available", "parameters"):
        table.add_column(col)
    for name, reason in availability().items():
        try:
            backend = get_backend(name)
            hardware = ", ".join(sorted(backend.hardware))
            params = ", ".join(backend.Config.model_fields)
        except ImportError:
            hardware = params = "?"
        table.add_row(name, hardware, "yes" if reason is None else f"no: {reason}", params)
    console.print(table)
    console.print(f"{len(BACKENDS)} backends registered")


@app.command()
def show(
    study_dir: Annotated[Path, typer.Argument(help="a study folder (OUT/STUDY) or a results folder")],
    objective: Annotated[str, typer.Option(help="column to rank feasible trials by")] = "latency_ms_p50",
) -> None:
    """Summarise a finished study from its Parquet rows."""
    from sweeper import results

    try:
        df = results.load(study_dir)
    except FileNotFoundError as exc:
        raise _fail(exc, False) from None
    if df.empty:
        raise _fail(SweeperInputError(f"'{study_dir}' holds no trial rows"), False)
    if objective not in df.columns:
        raise _fail(SweeperInputError(f"unknown column '{objective}'; try latency_ms_p50 or size_bytes"), False)
    console.print(f"{df['study'].nunique()} study(ies), {len(df)} rows: {', '.join(sorted(df['study'].unique()))}")
    _print_summary(df, objective)


def _print_summary(df: Any, objective: str) -> bool:
    """Print the verdict and the best trials; return whether any trial is feasible."""
    from sweeper.analysis import best_feasible, closest_infeasible, state_counts

    counts = state_counts(df)
    console.print(
        f"Trials: {len(df)}  complete {counts['complete']}  failed {counts['failed']}  pruned {counts['pruned']}"
    )
    best = best_feasible(df, objective)
    if best.empty:
        max_drop = df["max_drop"].dropna().iloc[0] if df["max_drop"].notna().any() else float("nan")
        close = closest_infeasible(df)
        verdict = f"No configuration met max drop {max_drop:g}"
        if close.empty:
            console.print(f"[bold yellow]{verdict}; no trial completed.[/]")
        else:
            c = close.iloc[0]
            console.print(
                f"[bold yellow]{verdict}; closest: trial {c.trial_number} {c.backend} with drop "
                f"{c.accuracy_drop:.2f} at {c.latency_ms_p50:.3f} ms p50.[/]"
            )
            console.print(_trials_table(close, title="Closest trials"))
        return False
    top = best.iloc[0]
    console.print(
        f"[bold green]Best feasible:[/] trial {top.trial_number} {top.backend}: "
        f"{top.latency_ms_p50:.3f} ms p50, speedup {top.speedup:.2f}x vs FP32 PyTorch, "
        f"accuracy drop {top.accuracy_drop:.2f} ({top.accuracy:.2f} vs {top.accuracy_fp32:.2f}), "
        f"size {top.size_bytes / 1e3:.1f} kB"
    )
    console.print(f"  config: {top.params_json}")
    console.print(_trials_table(best, title="Best feasible trials"))
    return True


def _trials_table(df: Any, title: str | None = None) -> Table:
    table = Table(title=title)
    for col in ("trial", "backend", "p50 ms", "speedup", "drop", "agreement %", "size kB", "params"):
        table.add_column(col)
    for r in df.itertuples():
        params = json.loads(r.params_json) if r.params_json else {}
        short = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("opset", "exporter"))
        table.add_row(
            str(r.trial_number), r.backend, f"{r.latency_ms_p50:.3f}", f"{r.speedup:.2f}x",
            f"{r.accuracy_drop:.2f}", f"{r.agreement:.1f}", f"{r.size_bytes / 1e3:.1f}", short,
        )
    return table


@app.command()
def sensitivity(
    task: Annotated[str, typer.Option(help="task name (looked up in ./tasks) or .py file")],
    backend: Annotated[str, typer.Option(help="a backend that can leave layers in float")],
    param: Annotated[list[str] | None, typer.Option(help="a config value, KEY=VALUE (YAML); repeatable")] = None,
    out: Annotated[Path, typer.Option(help="folder for the table (TASK-BACKEND-sensitivity.parquet)")] = Path("results"),
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs (and threads) per Ray task")] = 1,
    chunk_size: Annotated[int, typer.Option(min=1, help="layers scored per Ray task")] = 2,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join; default: embedded local Ray")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks and Ray worker logs")] = False,
) -> None:
    """Rank a backend's quantizable layers by how much quantizing each one alone costs."""
    import yaml
    from rich.progress import Progress

    from sweeper.backends import get_backend
    from sweeper.cluster import connect, runtime_env
    from sweeper.sampling import config_for
    from sweeper.sensitivity import run_sensitivity
    from sweeper.spec import TaskRef
    from sweeper.task import find_task_file

    try:
        params: dict[str, Any] = {}
        for item in param or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SweeperInputError(f"--param {item!r}: write KEY=VALUE, e.g. --param calibration_method=entropy")
            params[key] = yaml.safe_load(value)
        if get_backend(backend).exclusion_field is None:
            raise SweeperInputError(f"backend '{backend}' cannot leave layers in float, so it has no layer sensitivity")
        config_for(backend, params)
        task_path = find_task_file(task, [Path.cwd() / "tasks"])
        out.mkdir(parents=True, exist_ok=True)
        connect(address, num_cpus=None, env=runtime_env(task_path.parent) if address else None, debug=debug)
        task_ref = TaskRef(name=task_path.stem, path=task_path.name if address else str(task_path))
        with Progress(console=console) as progress:
            bar = progress.add_task(f"sensitivity {backend}", total=None)
            table = run_sensitivity(
                task_ref, backend, params, ray_options={"num_cpus": num_cpus}, num_threads=num_cpus,
                chunk_size=chunk_size, on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            )
    except (SweeperInputError, OSError) as exc:
        raise _fail(exc, debug) from None
    path = out / f"{task_path.stem}-{backend}-sensitivity.parquet"
    table.to_parquet(path, index=False)
    view = Table(title=f"{task_path.stem} / {backend}: most sensitive first (quantizing only that layer)")
    for col in ("rank", "layer", "module", "op type", "metric drop", "output error", "SQNR dB"):
        view.add_column(col, overflow="fold")
    failed = table[table["error"].notna()] if "error" in table.columns else table.iloc[:0]
    for r in table.head(max(20, len(failed))).itertuples():
        module = r.module if isinstance(getattr(r, "module", None), str) else "-"
        if isinstance(getattr(r, "error", None), str):
            view.add_row(str(r.rank), r.layer, module, r.op_type, "[red]failed[/]", "-", "-")
        else:
            view.add_row(str(r.rank), r.layer, module, r.op_type, f"{r.metric_drop:.2f}", f"{r.output_error:.2e}",
                         f"{r.sqnr_db:.1f}")
    console.print(view)
    for r in failed.itertuples():
        console.print(f"[red]{r.layer}[/] could not be scored (ranked as most sensitive): {r.error}",
                      highlight=False, soft_wrap=True)
    if table.empty:
        console.print(f"No layer of {task_path.stem} can be left in float by {backend}. Table: {path}")
        return
    first = table.iloc[0]
    full = (f"drop {first.full_metric_drop:.2f}, output error {first.full_output_error:.2e}"
            if first.full_output_error == first.full_output_error else "failed to build")
    console.print(f"{len(table)} layers; everything quantized: {full}. Table: {path}")


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="a study folder (OUT/STUDY), or a results folder: one report per study")],
    out: Annotated[Path | None, typer.Option(help="where to write (default: STUDY/report)")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Write a self-contained HTML report (tables and plots) and a Markdown summary of a study."""
    from sweeper import results
    from sweeper.report import write_report

    try:
        studies = results.study_dirs(study_dir)
        if not studies:
            raise SweeperInputError(f"'{study_dir}' holds no study (no trials/ folder in it or below it)")
        if out is not None and len(studies) > 1:
            raise SweeperInputError(f"'{study_dir}' holds {len(studies)} studies; --out works with one study folder")
        for one in studies:
            written = write_report(one, out)
            console.print(f"Report: {written.html}  (Markdown: {written.markdown.name}, {len(written.images)} plots)")
    except (SweeperInputError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc, debug) from None


@app.command()
def export(
    study_dir: Annotated[Path, typer.Argument(help="a study folder (OUT/STUDY)")],
    to: Annotated[Path, typer.Option(help="folder to write the model, config.json, space.yaml and load_model.py into")],
    trial: Annotated[int | None, typer.Option(help="trial number to export")] = None,
    best: Annotated[bool, typer.Option(help="export the best feasible trial")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Export a trial's model with a config that reproduces it and a loader snippet."""
    from sweeper.export import export_trial

    try:
        written = export_trial(study_dir, to, trial=trial, best=best)
    except (SweeperInputError, FileNotFoundError) as exc:
        raise _fail(exc, debug) from None
    console.print(
        f"Exported trial {written.trial_number} to {written.directory}: {written.artifact.name}, "
        f"config.json, space.yaml, load_model.py (run: python {written.loader})"
    )

def main() -> None:
    """Entry point of the ``sweeper`` console script."""
    app()


if __name__ == "__main__":
    sys.exit(main())
