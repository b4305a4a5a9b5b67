"""The ``sweeper`` command line: run a sweep, list backends, show a study."""

from __future__ import annotations

import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from sweeper import __version__, results, views
from sweeper.analysis import maximised, study_settings
from sweeper.backends import BACKENDS, availability, get_backend
from sweeper.cluster import connect, job_runtime_env, worker_launch
from sweeper.confirmed import describe_split
from sweeper.errors import SweeperInputError, did_you_mean
from sweeper.export import export_trial
from sweeper.location import is_uri, location
from sweeper.progress import SweepProgress
from sweeper.report import write_report
from sweeper.sensitivity import run_sensitivity
from sweeper.sensitivity_table import output_path, write_table
from sweeper.signals import SweepInterrupted
from sweeper.space import check_constraint, load_space
from sweeper.spec import TaskRef
from sweeper.study import SweepOptions, run_sweep
from sweeper.task import check_task_file, find_task_file, load_task, task_search_dirs
from sweeper.triage import SubsetFirst

app = typer.Typer(
    help="Find the fastest deployable form of a trained model within an accuracy budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help wraps at word boundaries and never cuts an option's help short
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# Exit codes (run and show): 0 a feasible configuration was found; 2 bad input (nothing
# started); 3 no configuration met the constraint (every row is kept).
INPUT_ERROR = 2
NOTHING_FEASIBLE = 3


def _fail(exc: BaseException, debug: bool) -> typer.Exit:
    if debug:
        err_console.print(escape(traceback.format_exc()))
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(INPUT_ERROR)


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("sweeper")
    except PackageNotFoundError:  # run from a source tree that was never installed
        number = __version__
    console.print(f"sweeper {number}")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """Find the fastest deployable form of a trained model within an accuracy budget."""


def _command(fn: Any) -> Any:
    """Register ``fn`` as a command whose one-line summary is its docstring's first line, whole."""
    return app.command(short_help=(fn.__doc__ or "").strip().splitlines()[0])(fn)


@_command
def run(
    space_file: Annotated[Path, typer.Argument(help="search space YAML file", metavar="SPACE")],
    task: Annotated[str | None, typer.Option(help="task name or .py file (overrides the space's); a name is looked up in ./tasks, then tasks/ beside the space file, then tasks/ in the folder above it")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="distinct configurations to measure in total (overrides the space's); a repeated proposal is answered from its stored result and not counted")] = None,
    out: Annotated[str, typer.Option(help="results folder or URI (s3://, gs://, abfs://, file://); the study goes in OUT/STUDY")] = "results",
    study: Annotated[str | None, typer.Option(help="study name (default: the space's, else its file name)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna RDB URL for the study (postgresql://USER@HOST/DB, sqlite:///FILE); default: a journal file beside the rows")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="trials in flight at once")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: embedded local Ray")] = None,
    resume: Annotated[bool, typer.Option(help="continue an existing study")] = False,
    force: Annotated[bool, typer.Option(help="with --resume: accept a space that changed since the study began")] = False,
    seed: Annotated[int | None, typer.Option(help="sampler seed")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks and Ray worker logs")] = False,
) -> None:
    """Run a sweep: Optuna proposes configurations, Ray tasks build and measure them."""
    try:
        space = load_space(space_file)
        _check_task(task or space.task, space)
        options = SweepOptions(
            out=out, study=study, storage=storage, task=task, trials=trials, max_concurrent=max_concurrent,
            seed=seed, address=address, resume=resume, force=force, debug=debug,
        )
        _warn_if_ephemeral(out)
        with SweepProgress(console, space.objective) as progress:
            summary = run_sweep(space, options, progress.on_event)
    except SweeperInputError as exc:
        raise _fail(exc, debug) from None
    except SweepInterrupted as exc:
        err_console.print(f"[bold yellow]{exc}.[/]", highlight=False, soft_wrap=True)
        if exc.study_dir is not None and exc.study_dir.is_dir():
            again = ["sweeper", *(a for a in sys.argv[1:] if a != "--resume"), "--resume"]
            err_console.print(Text(f"Continue with: {shlex.join(again)}"), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    df = results.load(summary.study_dir)
    console.print(Text(f"Study folder: {summary.study_dir}  (wall time {summary.wall_time_s:.1f} s)"))
    console.print(Text(
        f"{views.plural(summary.distinct, 'distinct configuration')} measured; "
        f"{views.plural(summary.repeats, 'repeat proposal')} answered from stored results"
        + ("; the sampler found no new configuration to try: the space looks exhausted" if summary.exhausted else "")
    ))
    if not views.print_summary(console, df, space.objective):
        raise typer.Exit(NOTHING_FEASIBLE)


def _warn_if_ephemeral(out: str) -> None:
    """Inside a Ray job a relative --out lands in the job's unpacked working directory, which Ray
    removes eventually: say where the study goes and how to keep it."""
    env = job_runtime_env()
    if env is None or "working_dir" not in env or is_uri(out) or Path(out).is_absolute():
        return
    err_console.print(Text(
        f"note: running inside a Ray job, so --out '{out}' is inside the job's working directory on the "
        f"head node ({Path(out).absolute()}), which Ray deletes eventually; give an absolute --out on "
        "storage that lasts, or an object-store URI (s3://BUCKET/sweeps), to keep the study.", style="yellow",
    ), soft_wrap=True)


def _check_task(ref: str, space: Any = None) -> Path:
    """Find the task (the one lookup every command shares) and load it here, before Ray starts
    or any folder is made; check the space's accuracy budget against its metric."""
    path = check_task_file(find_task_file(ref, task_search_dirs(space.path if space is not None else None)))
    if space is not None:
        check_constraint(space, load_task(str(path)))
    return path


@_command
def backends() -> None:
    """List every backend and whether it can run here."""
    rows = []
    for name, reason in availability().items():
        try:
            backend = get_backend(name)
            hardware, params = ", ".join(sorted(backend.hardware)), list(backend.Config.model_fields)
        except ImportError:
            hardware, params = "?", ["?"]
        rows.append((name, hardware, reason, params))
    console.print(views.backends(rows, console))
    console.print(f"{views.plural(len(BACKENDS), 'backend')} registered")


@_command
def show(
    study_dir: Annotated[str, typer.Argument(
        help="a study folder (OUT/STUDY) or a results folder holding studies; a path or a URI", metavar="STUDY_DIR")],
    objective: Annotated[str | None, typer.Option(
        help="column to rank feasible trials by (default: each study's objective); speedup, accuracy and "
        "agreement rank highest first, every other column lowest first")] = None,
) -> None:
    """Summarise finished studies from their rows; exit 3 when a study has nothing feasible."""
    try:
        studies = [(one, results.load(one)) for one in _studies(study_dir)]
        if not any(len(df) for _, df in studies):
            raise SweeperInputError(f"'{study_dir}' holds no trial rows")
        columns = next(df.columns for _, df in studies if len(df))
        if objective is not None and objective not in columns:
            raise SweeperInputError(
                f"--objective: unknown column '{objective}'.{did_you_mean(objective, columns)} "
                "Rank by a numeric column of the rows, such as latency_ms_p50, size_bytes or speedup."
            )
    except SweeperInputError as exc:
        raise _fail(exc, False) from None
    several = len(studies) > 1
    rows = sum(len(df) for _, df in studies)
    names = ", ".join(sorted({str(s) for _, df in studies for s in df["study"].unique()}))
    console.print(Text(f"{views.plural(len(studies), 'study')}, {views.plural(rows, 'row')}: {names}"))
    all_feasible = True
    for folder, df in studies:
        settings = study_settings(folder)
        if several:
            console.rule(Text(f"study {settings.study} (task {settings.task or '?'})"), align="left")
        if df.empty:
            console.print(Text(f"{folder}: no trial rows yet"))
            all_feasible = False
            continue
        ranked_by = objective or settings.objective
        if ranked_by not in df.columns:
            ranked_by = "latency_ms_p50"
        maximise = maximised(ranked_by, metric_higher_is_better=settings.baseline.higher_is_better if settings.baseline else True)
        all_feasible &= views.print_summary(console, df, ranked_by, maximise=maximise, show_study=several)
    if not all_feasible:
        raise typer.Exit(NOTHING_FEASIBLE)


def _studies(where: str | Path) -> list[Any]:
    """The study folders at ``where``: itself when it is a study folder, else the studies in it.

    ``where`` is a local path or an object-store URI (see :mod:`sweeper.location`).

    Raises:
        SweeperInputError: for a file, a missing path, or a folder holding no study.
    """
    path = location(where)

    if path.is_file():
        raise SweeperInputError(f"'{path}' is a file; give a study folder (OUT/STUDY) or a results folder")
    if not path.exists():
        raise SweeperInputError(f"'{path}' does not exist; give a study folder (OUT/STUDY) or a results folder")
    studies = results.study_dirs(path)
    if not studies:
        raise SweeperInputError(f"'{path}' holds no study (no trials/ folder in it or one level below)")
    return studies


@_command
def sensitivity(
    task: Annotated[str, typer.Option(help="task name (NAME.py in ./tasks) or a .py file")],
    backend: Annotated[str, typer.Option(help="a backend that can leave layers in float")],
    param: Annotated[list[str] | None, typer.Option(help="a config value, KEY=VALUE (YAML); repeatable")] = None,
    out: Annotated[Path, typer.Option(
        help="a study folder (OUT/STUDY): the table becomes its sensitivity.parquet, which its report and "
        "a resumed sweep read; any other folder: OUT/TASK-BACKEND-sensitivity.parquet")] = Path("results"),
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs (and threads) per Ray task")] = 1,
    chunk_size: Annotated[int, typer.Option(min=1, help="layers scored per Ray task")] = 2,
    subset_fraction: Annotated[float, typer.Option(min=0.01, max=1.0, help="share of the evaluation split every "
        "layer is scored on first; 1: every layer on the whole split")] = 0.25,
    confirm_top: Annotated[int, typer.Option(min=1, help="the most sensitive layers that get whole-split figures "
        "(with those the subset cannot place, see sweeper.triage)")] = 16,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join; default: embedded local Ray")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks and Ray worker logs")] = False,
) -> None:
    """Rank a backend's quantizable layers by how much quantizing each one alone costs."""
    import yaml

    try:
        task_path = _check_task(task)
        params: dict[str, Any] = {}
        for item in param or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SweeperInputError(f"--param {item!r}: write KEY=VALUE, e.g. --param calibration_method=entropy")
            params[key] = yaml.safe_load(value)
        if get_backend(backend).exclusion_field is None:
            raise SweeperInputError(f"backend '{backend}' cannot leave layers in float, so it has no layer sensitivity")
        get_backend(backend).config(params)
        path = output_path(out, task_path.stem, backend)
        subset = SubsetFirst(fraction=subset_fraction, top=confirm_top) if subset_fraction < 1 else None
        table = _score_layers(task_path, backend, params, num_cpus, chunk_size, subset, address, debug)
        write_table(table, path)
    except (SweeperInputError, OSError) as exc:
        raise _fail(exc, debug) from None
    if table.empty:
        console.print(Text(f"No layer of {task_path.stem} can be left in float by {backend}. Table: {path}"))
        return
    failed = table["error"].notna().sum() if "error" in table.columns else 0
    console.print(views.sensitivity(
        table.head(max(20, failed)), console,
        f"{task_path.stem} / {backend}: most sensitive first (quantizing only that layer)",
    ))
    for r in table[table["error"].notna()].itertuples() if failed else ():
        console.print(Text(f"{r.layer} could not be scored (ranked as most sensitive): {r.error}", style="yellow"),
                      soft_wrap=True)
    first = table.iloc[0]
    full = (f"drop {first.full_metric_drop:.2f}, output error {first.full_output_error:.2e}"
            if first.full_output_error == first.full_output_error else "failed to build")
    console.print(Text(f"{views.plural(len(table), 'layer')}; everything quantized: {full}. Table: {path}"))
    if table["subset_samples"].notna().any():
        console.print(Text(f"Scored on {int(table['subset_samples'].max())} samples first; "
                           f"{int(table['rescored'].sum())} layers again on all {int(table['eval_samples'].max())}."))


def _score_layers(task_path: Path, backend: str, params: dict[str, Any], num_cpus: int, chunk_size: int,
                  subset: SubsetFirst | None, address: str | None, debug: bool) -> Any:
    """Run the sensitivity Ray tasks with a progress bar; a failure inside a task is one message."""
    from rich.progress import Progress

    launch = worker_launch(address, task_path)
    connect(address, num_cpus=None, env=launch.runtime_env, debug=debug)
    import ray  # after connect(), which chooses token authentication before Ray is first imported
    task_ref = TaskRef(name=task_path.stem, path=launch.task_path)
    try:
        with Progress(console=console) as progress:
            bar = progress.add_task(escape(f"sensitivity {backend}"), total=None)
            return run_sensitivity(
                task_ref, backend, params, ray_options={"num_cpus": num_cpus}, num_threads=num_cpus,
                chunk_size=chunk_size, subset=subset,
                on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            )
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, SweeperInputError):
            raise type(cause)(str(cause)) from None
        if debug:
            err_console.print(escape(str(exc)))
        err_console.print(
            f"[bold red]error:[/] {escape(f'scoring the layers of {task_path.stem} with {backend} failed: {type(cause).__name__}: {cause}')}",
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


@_command
def report(
    study_dir: Annotated[Path, typer.Argument(help="a study folder (OUT/STUDY), or a results folder: one report per study", metavar="STUDY_DIR")],
    out: Annotated[Path | None, typer.Option(help="folder to write into (default: STUDY/report)")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Write a self-contained HTML report (tables and plots) and a Markdown summary of a study."""
    try:
        studies = _studies(study_dir)
        if out is not None and len(studies) > 1:
            raise SweeperInputError(f"'{study_dir}' holds {len(studies)} studies; --out works with one study folder")
        if out is not None and out.exists() and not out.is_dir():
            raise SweeperInputError(f"--out '{out}' is a file; give a folder for the report")
        for one in studies:
            written = write_report(one, out)
            console.print(Text(f"Report: {written.html}  (Markdown: {written.markdown.name}, "
                               f"{views.plural(len(written.images), 'plot')})"))
    except (SweeperInputError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc, debug) from None
    except OSError as exc:
        raise _fail(SweeperInputError(f"cannot write the report: {exc}"), debug) from None


@_command
def export(
    study_dir: Annotated[Path, typer.Argument(help="a study folder (OUT/STUDY), or a results folder holding one study", metavar="STUDY_DIR")],
    to: Annotated[Path, typer.Option(help="folder to write the model, config.json, space.yaml and load_model.py into")],
    trial: Annotated[int | None, typer.Option(help="trial number to export")] = None,
    best: Annotated[bool, typer.Option(help="export the best feasible trial")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Export a trial's model with a config that reproduces it and a loader snippet."""
    try:
        studies = _studies(study_dir)
        if len(studies) > 1:
            raise SweeperInputError(
                f"'{study_dir}' holds {len(studies)} studies; export from one of them: "
                + ", ".join(str(s) for s in studies)
            )
        written = export_trial(studies[0], to, trial=trial, best=best)
    except (SweeperInputError, FileNotFoundError) as exc:
        raise _fail(exc, debug) from None
    console.print(Text(
        f"Exported trial {written.trial_number} to {written.directory}: {written.artifact.name}, "
        f"config.json, space.yaml, load_model.py (run: python {written.loader})"
    ))
    held = written.confirmed
    if best and held is not None and held["confirmed_feasible"]:
        console.print(Text(
            f"Chosen from the confirmed figures: {held['confirmed_latency_ms_p50']:.3f} ms p50, speedup "
            f"{held['confirmed_speedup']:.2f}x, accuracy drop {held['confirmed_accuracy_drop']:.2f} on "
            f"{describe_split(held['confirmed_split'], held['confirmed_samples'])} (rank {held['confirmed_rank']}, "
            f"tie group {held['confirmed_tie_group']}); config.json's \"confirmed\" holds them"
        ))
    elif best:
        console.print(Text("Not confirmed: chosen from the trials' own figures (the study has no confirmed finalist "
                           "within the budget)", style="yellow"))


def main() -> None:
    """Entry point of the ``sweeper`` console script."""
    app()


if __name__ == "__main__":
    main()
