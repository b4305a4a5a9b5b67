"""What the command line prints: tables that survive an 80-column terminal and a pipe.

A table whose columns cannot all fit the console at their narrowest readable width (every
word whole) becomes one block per record, so backend names, parameter names and study names are
never cut short with an ellipsis. Text that comes from the user or a library goes into
:class:`rich.text.Text` (never parsed as markup) or through :func:`rich.markup.escape`, so an
install hint such as ``pip install 'sweeper[tensorrt]'`` survives.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from sweeper.analysis import (
    best_feasible,
    closest_infeasible,
    confirmed_study,
    confirmed_within_budget,
    maximised,
    state_counts,
    ties_of,
)
from sweeper.confirmed import describe_split

if TYPE_CHECKING:
    import pandas as pd

# Config fields every ONNX backend has and nobody searches: left out of the short params.
QUIET_PARAMS: tuple[str, ...] = ("opset", "exporter")
# What rich ends a cut cell with; our cells never contain it.
ELLIPSIS = "\u2026"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 study"``, ``"2 studies"``: ``n`` and the word in the right number."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {many or (word[:-1] + 'ies' if word.endswith('y') else word + 's')}"


def fits(console: Console, table: Table) -> bool:
    """Whether ``table`` prints at the console's width without rich cutting a cell short ('…')."""
    buffer = io.StringIO()
    probe = Console(width=console.width, file=buffer, color_system=None, force_terminal=False)
    probe.print(table)
    return ELLIPSIS not in buffer.getvalue()


def params_text(params_json: str | None) -> list[str]:
    """A trial's config as ``key=value`` strings, the quiet fields left out."""
    params = json.loads(params_json) if params_json else {}
    return [f"{k}={v}" for k, v in params.items() if k not in QUIET_PARAMS]


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{format(value, spec)}{suffix}"


# (table header, block label, block unit) of each figure a trial shows.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("p50 ms", "p50", " ms"), ("speedup", "speedup", ""), ("drop", "drop", ""),
    ("agreement %", "agreement", " %"), ("size kB", "size", " kB"),
)


def _figures(r: Any) -> list[str]:
    size = r.size_bytes / 1e3 if r.size_bytes is not None and r.size_bytes == r.size_bytes else None
    return [
        _fmt(r.latency_ms_p50, ".3f"), _fmt(r.speedup, ".2f", "x"), _fmt(r.accuracy_drop, ".2f"),
        _fmt(r.agreement, ".1f"), _fmt(size, ".1f"),
    ]


def indent(text: str | Text, by: int = 2) -> Padding:
    """``text`` indented by ``by`` columns, its wrapped lines too (no trailing spaces)."""
    return Padding(text if isinstance(text, Text) else Text(text), (0, 0, 0, by), expand=False)


def trials(df: pd.DataFrame, console: Console, *, title: str | None = None, show_study: bool = False) -> RenderableType:
    """The given trials as a table, or as one block per trial when the table would not fit.

    ``show_study`` adds a ``study`` column (or names the study in each block).
    """
    table = Table(title=title, title_justify="left")
    if show_study:
        table.add_column("study", no_wrap=True)
    table.add_column("trial", no_wrap=True, justify="right")
    table.add_column("backend", no_wrap=True)
    for header, _, _ in FIGURES:
        table.add_column(header, no_wrap=True, justify="right")
    table.add_column("params", min_width=20)
    rows = list(df.itertuples())
    for r in rows:
        cells = [Text(str(r.study))] if show_study else []
        cells += [Text(str(r.trial_number)), Text(str(r.backend))]
        cells += [Text(v) for v in _figures(r)]
        cells.append(Text(", ".join(params_text(r.params_json)) or "(defaults)"))
        table.add_row(*cells)
    if fits(console, table):
        return table
    return _blocks(title, [_trial_block(r, show_study) for r in rows])


def _trial_block(r: Any, show_study: bool) -> RenderableType:
    head = Text()
    if show_study:
        head.append(f"study {r.study}  ", style="bold")
    head.append(f"trial {r.trial_number}  ", style="bold")
    head.append(str(r.backend), style="bold cyan")
    figures = "  ".join(f"{label} {value}{unit if value != '-' else ''}"
                        for (_, label, unit), value in zip(FIGURES, _figures(r), strict=True))
    params = params_text(r.params_json) or ["(defaults)"]
    return Group(head, indent(figures), *(indent(p, 4) for p in params))


def _blocks(title: str | None, blocks: Sequence[RenderableType]) -> RenderableType:
    parts: list[RenderableType] = [Text(title, style="italic")] if title else []
    parts.extend(blocks)
    return Group(*parts)


def backends(rows: Iterable[tuple[str, str, str | None, list[str]]], console: Console) -> RenderableType:
    """Every backend: name, hardware, availability (``None``: available; else why not), parameters."""
    rows = list(rows)
    table = Table(title="Backends", title_justify="left")
    table.add_column("backend", no_wrap=True)
    table.add_column("hardware", no_wrap=True)
    table.add_column("available")
    table.add_column("parameters")
    for name, hardware, reason, params in rows:
        available = "yes" if reason is None else f"no: {reason}"
        table.add_row(Text(name), Text(hardware), Text(available), Text(", ".join(params)))
    if fits(console, table):
        return table
    blocks = []
    for name, hardware, reason, params in rows:
        head = Text()
        head.append(name, style="bold cyan")
        head.append(f"  {hardware}  ")
        head.append("available" if reason is None else "not available", style="green" if reason is None else "yellow")
        lines: list[RenderableType] = [head]
        if reason is not None:
            lines.append(indent(f"why: {reason}"))
        lines.append(indent(f"parameters: {', '.join(params) or '(none)'}"))
        blocks.append(Group(*lines))
    return _blocks("Backends", blocks)


def sensitivity(table: pd.DataFrame, console: Console, title: str) -> RenderableType:
    """The layer-sensitivity table, most sensitive first; a layer that could not be scored says so."""
    view = Table(title=title, title_justify="left")
    view.add_column("rank", no_wrap=True, justify="right")
    view.add_column("layer", no_wrap=True)
    view.add_column("module", no_wrap=True)
    view.add_column("op type", no_wrap=True)
    for col in ("metric drop", "output error", "SQNR dB"):
        view.add_column(col, no_wrap=True, justify="right")
    rows = [(r, _text(getattr(r, "module", None)), _text(getattr(r, "error", None))) for r in table.itertuples()]
    for r, module, error in rows:
        scores = (
            ("failed", "-", "-") if error else (f"{r.metric_drop:.2f}", f"{r.output_error:.2e}", f"{r.sqnr_db:.1f}")
        )
        view.add_row(str(r.rank), Text(str(r.layer)), Text(module or "-"), Text(str(r.op_type)), *scores)
    if fits(console, view):
        return view
    blocks = [
        Group(
            Text.assemble(
                (f"{r.rank}. ", "bold"),
                (str(r.layer), "bold cyan"),
                f"  ({r.op_type})",
                f"  module {module}" if module else "",
            ),
            indent(
                f"could not be scored: {error}"
                if error
                else f"metric drop {r.metric_drop:.2f}  output error {r.output_error:.2e}  SQNR {r.sqnr_db:.1f} dB"
            ),
        )
        for r, module, error in rows
    ]
    return _blocks(title, blocks)


def _text(value: object) -> str | None:
    """A table cell's text, or ``None`` for a missing value (NaN, None)."""
    return value if isinstance(value, str) and value else None


def print_summary(
    console: Console, df: Any, objective: str, *, maximise: bool | None = None, show_study: bool = False
) -> bool:
    """Print one study's verdict and its best trials; return whether any trial is feasible."""
    if maximise is None:
        maximise = maximised(objective)
    counts = state_counts(df)
    console.print(
        f"Trials: {len(df)}  complete {counts['complete']}  failed {counts['failed']}  pruned {counts['pruned']}"
    )
    best = best_feasible(df, objective, maximise=maximise)
    if best.empty:
        max_drop = df["max_drop"].dropna().iloc[0] if df["max_drop"].notna().any() else float("nan")
        close = closest_infeasible(df)
        verdict = f"No configuration met max drop {max_drop:g}"
        if close.empty:
            console.print(Text(f"{verdict}; no trial completed.", style="bold yellow"))
        else:
            c = close.iloc[0]
            console.print(Text(
                f"{verdict}; closest: trial {c.trial_number} {c.backend} with drop "
                f"{c.accuracy_drop:.2f} at {c.latency_ms_p50:.3f} ms p50.", style="bold yellow",
            ))
            console.print(trials(close, console, title="Closest trials (smallest drop first)", show_study=show_study))
        return False
    top = best.iloc[0]
    line = Text("Best feasible: ", style="bold green")
    line.append(_winner_text(top), style="default")
    if objective not in ("latency_ms_p50", "speedup", "accuracy_drop", "accuracy", "size_bytes"):
        line.append(f", {objective} {top[objective]:g}")
    console.print(line)
    console.print(indent(f"config: {top.params_json}"))
    for note in confirmation_notes(df, top, objective):
        console.print(indent(note))
    if confirmed_study(df):
        console.print(finalists(df, console, show_study=show_study))
    order = "highest" if maximise else "lowest"
    console.print(trials(best, console, title=f"Best feasible trials by {objective}, {order} first",
                               show_study=show_study))
    return True


def _winner_text(top: Any) -> str:
    """The winner's figures: confirmed ones (with its trial's beside them) when it was confirmed."""
    size = f"size {top.size_bytes / 1e3:.1f} kB"
    if not confirmed_within_budget(top):
        return (
            f"trial {top.trial_number} {top.backend}: {top.latency_ms_p50:.3f} ms p50, speedup {top.speedup:.2f}x "
            f"vs FP32 {runtime_name(top)}, accuracy drop {top.accuracy_drop:.2f} "
            f"({top.accuracy:.2f} vs {top.accuracy_fp32:.2f}){drop_interval_text(top)}, {size}"
        )
    interval = drop_interval_text(top, "confirmed_")
    return (
        f"trial {top.trial_number} {top.backend}: {top.confirmed_latency_ms_p50:.4f} ms p50 confirmed "
        f"({top.latency_ms_p50:.4f} ms in its trial), speedup {top.confirmed_speedup:.2f}x vs FP32 "
        f"{runtime_name(top)}, accuracy drop {top.confirmed_accuracy_drop:.2f} on "
        f"{describe_split(top.confirmed_split, top.confirmed_samples)}{interval} "
        f"({top.accuracy_drop:.2f} in its trial), {size}"
    )


def confirmation_notes(df: Any, top: Any, objective: str = "latency_ms_p50") -> list[str]:
    """How the winner was chosen: from confirmed figures (and what it is tied with), or why not."""
    if not confirmed_study(df):
        return ["not confirmed: the study has no confirmation set (it began before confirmation, was stopped, or "
                "has it turned off), so these are the trial's own figures"]
    finalist_rows = df[df["confirmed_set"].notna()]
    if not confirmed_within_budget(top):
        return [f"not confirmed: none of the {len(finalist_rows)} finalists stayed within the budget on the "
                "confirmation split, so this is the best trial that was not a finalist (its own figures)"]
    runs = int(top.confirmed_latency_runs)
    notes = [f"chosen from the confirmed figures of {plural(len(finalist_rows), 'finalist')}, timed together "
             f"round-robin with FP32 ({runs} runs each in {int(top.confirmed_rounds)} rounds)"]
    first = best_feasible(df.drop(columns=["confirmed_set"]), objective, k=1).iloc[0]
    if first.trial_number != top.trial_number:
        confirmed_p50 = _fmt(first.get("confirmed_latency_ms_p50"), ".4f")
        notes.append(
            f"by the trials' own figures trial {first.trial_number} {first.backend} was the best "
            f"({first.latency_ms_p50:.4f} ms p50); confirmed: {confirmed_p50} ms p50, rank "
            f"{_fmt(first.get('confirmed_rank'), '.0f')}"
        )
    tied = ties_of(df, top)
    if tied.empty:
        notes.append("no other finalist is within the timing noise of it")
    else:
        others = ", ".join(f"trial {r.trial_number} {r.backend} ({r.confirmed_latency_ms_p50:.4f} ms)"
                           for r in tied.itertuples())
        notes.append(f"tied within the timing noise with {others}; shown simplest first (fewer excluded layers, "
                     "FP32 before INT8, smaller artifact)")
    return notes


def finalists(df: Any, console: Console, *, show_study: bool = False) -> RenderableType:
    """The finalists of the newest confirmation set in rank order: confirmed figures beside the trials'."""
    rows = list(df[df["confirmed_set"].notna()].sort_values(["study", "confirmed_rank"]).itertuples())
    title = "Finalists, confirmed together (tie: same number = within the timing noise)"
    table = Table(title=title, title_justify="left")
    headers = ["rank", "tie", "trial", "backend", "p50 ms", "trial p50 ms", "speedup", "drop", "trial drop", "held"]
    for header in (["study"] if show_study else []) + headers:
        table.add_column(header, no_wrap=True, justify="right" if header not in ("backend", "study") else "left")
    cells = [_finalist_cells(r) for r in rows]
    for r, row_cells in zip(rows, cells, strict=True):
        table.add_row(*([Text(str(r.study))] if show_study else []), *(Text(c) for c in row_cells))
    if fits(console, table):
        return table
    return _blocks(title, [Text("  ".join(f"{h} {c}" for h, c in zip(headers, row_cells, strict=True)))
                           for row_cells in cells])


def _finalist_cells(r: Any) -> list[str]:
    group = r.confirmed_tie_group
    held = "yes" if confirmed_within_budget(r) else ("failed" if isinstance(r.confirmed_error, str) else "no")
    return [
        str(int(r.confirmed_rank)), "-" if group != group or group is None else str(int(group)), str(r.trial_number),
        str(r.backend), _fmt(r.confirmed_latency_ms_p50, ".4f"), _fmt(r.latency_ms_p50, ".4f"),
        _fmt(r.confirmed_speedup, ".2f", "x"), _fmt(r.confirmed_accuracy_drop, ".2f"), _fmt(r.accuracy_drop, ".2f"),
        held,
    ]


def runtime_name(row: Any) -> str:
    """What the FP32 baseline ran on, as the row records it (older rows: PyTorch)."""
    runtime = getattr(row, "baseline_runtime", None)
    return "Keras" if runtime == "keras" else "PyTorch"


def drop_interval_text(row: Any, prefix: str = "") -> str:
    low, high = getattr(row, f"{prefix}accuracy_drop_low", None), getattr(row, f"{prefix}accuracy_drop_high", None)
    if low is None or high is None or low != low or high != high:  # missing or NaN
        return ""
    return f", 95 % interval {low:.2f}..{high:.2f}"
