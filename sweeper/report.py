"""The study report: one self-contained HTML file (tables, PNGs embedded) and a Markdown summary.

``write_report(study_dir)`` writes into ``<study>/report/``::

    report.html        opens in any browser, no other file needed (images are data: URIs)
    report.md          the same tables in Markdown, images linked as files beside it
    pareto.png  speedup.png  history.png  [importance.png]  [sensitivity.png]
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import analysis, plots, results
from sweeper.confirmed import describe_split
from sweeper.importance import param_importance

if TYPE_CHECKING:
    import pandas as pd

REPORT_DIR = "report"
PLOTS = ("pareto.png", "speedup.png", "history.png", "importance.png", "sensitivity.png")


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    html: Path
    markdown: Path
    images: dict[str, Path]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Doc:
    """The report as sections, rendered to HTML and to Markdown alike."""

    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"\n## {text}\n")

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def table(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            self.para("(none)")
            return
        table = frame.to_html(index=False, escape=True, border=0, classes="t")
        # Long snake_case headers may break after an underscore, never inside a word.
        table = re.sub(r"<th>(.*?)</th>", lambda m: "<th>" + m.group(1).replace("_", "_<wbr>") + "</th>", table)
        self.html.append(f'<div class="w">{table}</div>')
        cells = [[str(c) for c in frame.columns], *[[str(v) for v in row] for row in frame.itertuples(index=False)]]
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in cells]
        self.md.append("| " + " | ".join(cells[0]) + " |")
        self.md.append("|" + "---|" * len(cells[0]))
        self.md.extend("| " + " | ".join(row) + " |" for row in cells[1:])
        self.md.append("")

    def image(self, path: Path | None, caption: str) -> None:
        if path is None:
            return
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.html.append(
            f'<figure><img src="data:image/png;base64,{data}" data-file="{html.escape(path.name)}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
        self.md.append(f"![{caption}]({path.name})\n")


def _fmt(value: Any, spec: str) -> str:
    try:
        import pandas as pd

        if value is None or pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return format(value, spec)


def _text(value: Any) -> str:
    """``value`` as text, missing values (None, NaN, NA) as the empty string."""
    import pandas as pd

    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _short_params(text: Any) -> str:
    params = json.loads(text) if isinstance(text, str) and text else {}
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("opset", "exporter")) or "(defaults)"


def _trials_view(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    columns: dict[str, Callable[[Any], str]] = {
        "trial_number": str, "backend": str, "latency_ms_p50": lambda v: _fmt(v, ".4f"),
        "latency_ms_p90": lambda v: _fmt(v, ".4f"), "speedup": lambda v: _fmt(v, ".2f"),
        "accuracy": lambda v: _fmt(v, ".2f"), "accuracy_drop": lambda v: _fmt(v, ".2f"),
        "agreement": lambda v: _fmt(v, ".1f"), "size_bytes": lambda v: _fmt(v / 1e3, ".1f"),
        "params_json": _short_params,
    }  # fmt: skip
    names = {"trial_number": "trial", "size_bytes": "size_kB", "params_json": "params"}
    view = pd.DataFrame({names.get(c, c): [f(v) for v in df[c]] for c, f in columns.items()})
    view.insert(list(view.columns).index("accuracy_drop") + 1, "drop_95%_interval", _intervals(df))
    return view


def _intervals(df: pd.DataFrame, prefix: str = "") -> list[str]:
    """Each row's drop interval as ``low..high`` (empty where the task's metric gives none)."""
    low, high = df[f"{prefix}accuracy_drop_low"], df[f"{prefix}accuracy_drop_high"]
    return [
        f"{_fmt(a, '.2f')}..{_fmt(b, '.2f')}" if _fmt(a, "g") and _fmt(b, "g") else ""
        for a, b in zip(low, high, strict=True)
    ]


def _finalists_view(df: pd.DataFrame) -> pd.DataFrame:
    """The confirmed finalists in rank order: confirmed figures beside their trials' own."""
    import pandas as pd

    rows = df[df["confirmed_set"].notna()].sort_values("confirmed_rank")
    held = [analysis.confirmed_within_budget(r) for _, r in rows.iterrows()]
    return pd.DataFrame({
        "rank": [str(int(v)) for v in rows["confirmed_rank"]],
        "tie_group": [_fmt(v, ".0f") or "-" for v in rows["confirmed_tie_group"]],
        "trial": rows["trial_number"].astype(str), "backend": rows["backend"].astype(str),
        "confirmed_p50_ms": [_fmt(v, ".4f") for v in rows["confirmed_latency_ms_p50"]],
        "trial_p50_ms": [_fmt(v, ".4f") for v in rows["latency_ms_p50"]],
        "confirmed_speedup": [_fmt(v, ".2f") for v in rows["confirmed_speedup"]],
        "confirmed_drop": [_fmt(v, ".2f") for v in rows["confirmed_accuracy_drop"]],
        "confirmed_drop_95%_interval": _intervals(rows, "confirmed_"),
        "trial_drop": [_fmt(v, ".2f") for v in rows["accuracy_drop"]],
        "within_budget": ["yes" if h else ("failed" if _text(e) else "no")
                          for h, e in zip(held, rows["confirmed_error"], strict=True)],
        "runs": [_fmt(v, ".0f") for v in rows["confirmed_latency_runs"]],
    })  # fmt: skip


def _budgets_view(df: pd.DataFrame, max_drop: Any) -> pd.DataFrame:
    """Best feasible latency at several accuracy budgets (the study's own among them)."""
    budgets = sorted({*analysis.BUDGETS, *([float(max_drop)] if _fmt(max_drop, "g") else [])})
    table = analysis.best_by_budget(df, tuple(budgets))
    return table.assign(
        max_drop=[_fmt(v, "g") for v in table["max_drop"]],
        trial_number=[_fmt(v, ".0f") for v in table["trial_number"]],
        latency_ms_p50=[_fmt(v, ".4f") for v in table["latency_ms_p50"]],
        accuracy_drop=[_fmt(v, ".2f") for v in table["accuracy_drop"]],
        speedup=[_fmt(v, ".2f") for v in table["speedup"]],
    ).fillna("").astype(str).rename(columns={"trial_number": "trial"})


def _formatted(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype.kind == "f":
            out[column] = [_fmt(v, f".{digits}g") for v in out[column]]
    return out.astype(str)


def write_report(study_dir: str | Path, out_dir: str | Path | None = None, *, importance_min_trials: int = 8) -> Report:
    """Write the HTML report, the Markdown summary and the PNGs of one study.

    Raises:
        FileNotFoundError: when ``study_dir`` is not a study folder.
        ValueError: when the study has no rows.
    """
    study_dir = Path(study_dir)
    if not results.trials_dir(study_dir).is_dir():
        raise FileNotFoundError(f"'{study_dir}' is not a study folder (it has no trials/ folder)")
    out = Path(out_dir) if out_dir is not None else study_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:  # a plot this run does not draw must not survive from an earlier run
        (out / stale).unlink(missing_ok=True)
    df = results.load(study_dir)
    if df.empty:
        raise ValueError(f"'{study_dir}' holds no trial rows")
    settings = analysis.study_settings(study_dir)
    objective = settings.objective
    notes: list[str] = []
    images: dict[str, Path | None] = {
        "pareto": plots.pareto_scatter(df, out / "pareto.png", objective),
        "speedup": plots.speedup_by_backend(df, out / "speedup.png"),
        "history": plots.optimization_history(df, out / "history.png", objective),
    }
    try:
        importance = param_importance(study_dir, min_trials=importance_min_trials)
        notes.extend(importance.notes)
        images["importance"] = plots.param_importance(importance.table, out / "importance.png")
    except (FileNotFoundError, ValueError) as exc:  # no journal, or a study Optuna cannot rank
        importance = None
        notes.append(f"parameter importance: {exc}")
    sensitivity = analysis.load_sensitivity(study_dir)
    images["sensitivity"] = plots.sensitivity_bars(sensitivity, out / "sensitivity.png")

    doc = _Doc()
    _summary(doc, df, settings)
    _trade_offs(doc, df, objective, images)
    _importance(doc, importance, objective, images, notes)
    _sensitivity(doc, df, sensitivity, settings, study_dir, images)
    _failures(doc, df)
    _footer(doc, study_dir)

    written = {name: path for name, path in images.items() if path is not None}
    html_path = out / "report.html"
    html_path.write_text(_page(settings.study, doc.html))
    md_path = out / "report.md"
    md_path.write_text(f"# sweeper report: {settings.study}\n\n" + "\n".join(doc.md) + "\n")
    return Report(html=html_path, markdown=md_path, images=written, notes=notes)


def _trade_offs(doc: _Doc, df: pd.DataFrame, objective: str, images: dict[str, Path | None]) -> None:
    doc.heading("Trade-off: latency vs accuracy drop")
    doc.image(images["pareto"], "Latency vs accuracy drop; shaded: feasible; star: best feasible")
    doc.para("Pareto front of feasible trials over latency p50, accuracy drop and size (all minimised):")
    doc.table(_trials_view(analysis.pareto_front(df, feasible_only=True)))
    front_all = analysis.pareto_front(df)
    if not front_all.empty:
        doc.para(f"Over all complete trials (feasible or not) the front has {len(front_all)} trial(s): "
                 + ", ".join(str(n) for n in front_all["trial_number"]) + ".")
    doc.heading("Backends")
    doc.table(_formatted(analysis.backend_summary(df, objective)))
    doc.image(images["speedup"], "Speedup over FP32 PyTorch by backend (dashed: 1x)")
    doc.heading("Optimization history")
    doc.image(images["history"], f"{objective} by trial; line: best feasible so far")


def _importance(
    doc: _Doc, importance: Any, objective: str, images: dict[str, Path | None], notes: list[str]
) -> None:
    doc.heading("Parameter importance")
    if importance is not None and not importance.table.empty:
        doc.para("Optuna's PED-ANOVA evaluator on the stored study: how much each parameter matters for "
                 f"reaching the best trials by {objective} (infeasible trials count as worst). 'all' covers "
                 "every trial with the conditional parameters; each backend scope only its own trials. "
                 "With few trials, or latency differences near timing noise, the ranking is indicative only.")
        doc.table(_formatted(importance.table.drop(columns=["target_quantile"])))
        doc.image(images["importance"], "Parameter importance per scope")
    for note in notes:
        doc.para(f"Note: {note}")


def _sensitivity(
    doc: _Doc, df: pd.DataFrame, sensitivity: pd.DataFrame | None, settings: analysis.StudySettings, study_dir: Path,
    images: dict[str, Path | None],
) -> None:
    doc.heading("Layer sensitivity")
    if sensitivity is None:
        task = settings.task or "TASK"
        doc.para(
            f"No layer-sensitivity table: looked for {study_dir / analysis.SENSITIVITY_FILE}. "
            f"`sweeper sensitivity --task {task} --backend BACKEND --out {study_dir}` writes it there "
            "(a sweep whose space searches layer exclusion writes it too)."
        )
        return
    joined = analysis.sensitivity_with_exclusions(sensitivity, df, settings.objective)
    # the table's own extra columns (the config it was measured with) stay in the Parquet file
    extra = set(sensitivity.columns) - {"backend", *analysis.SENSITIVITY_COLUMNS}
    doc.table(_formatted(joined.drop(columns=sorted(extra))))
    doc.image(images["sensitivity"], "Per-layer sensitivity, most sensitive first")


def _failures(doc: _Doc, df: pd.DataFrame) -> None:
    failed = df[df["state"] != "complete"]
    doc.heading(f"Failed and pruned trials ({len(failed)})")
    if failed.empty:
        doc.para("(none)")
        return
    import pandas as pd

    doc.table(pd.DataFrame({
        "trial": failed["trial_number"].astype(str), "backend": failed["backend"].astype(str),
        "state": failed["state"].astype(str),
        "error": [(_text(e).strip().splitlines() or [""])[0][:200] for e in failed["error"]],
    }))  # fmt: skip


def _summary(doc: _Doc, df: pd.DataFrame, settings: analysis.StudySettings) -> None:
    objective = settings.objective
    counts = analysis.state_counts(df)
    first = df.iloc[0]
    mode = "points" if first["drop_mode"] != "relative" else "% of FP32"
    direction = "maximise" if analysis.maximised(objective) else "minimise"
    doc.heading("Summary")
    doc.para(
        f"Study {settings.study}, task {_text(first['task']) or settings.task or '?'} "
        f"({_text(first['metric_name']) or 'metric'}, FP32 "
        f"{_fmt(first['accuracy_fp32'], '.2f')}). Objective: {direction} {objective} subject to accuracy drop "
        f"<= {_fmt(first['max_drop'], 'g')} {mode}. Trials: {len(df)} (complete {counts['complete']}, "
        f"failed {counts['failed']}, pruned {counts['pruned']}). Hardware: {_text(first['cpu_model']) or '?'} "
        f"({_text(first['device']) or '?'}, {_text(first['num_threads']) or '?'} thread(s))."
    )
    best = analysis.best_feasible(df, objective, k=10)
    if best.empty:
        doc.para("No configuration met the accuracy budget. Closest complete trials:")
        doc.table(_trials_view(analysis.closest_infeasible(df)))
        return
    top = best.iloc[0]
    _winner(doc, df, top)
    doc.para("Best feasible trials:")
    doc.table(_trials_view(best))
    doc.heading("What each point of accuracy buys")
    doc.para("Best feasible latency at several budgets (max drop, in the study's drop units): the fastest "
             "complete trial within each, by confirmed figures for the confirmed finalists, else by its own.")
    doc.table(_budgets_view(df, first["max_drop"]))


def _winner(doc: _Doc, df: pd.DataFrame, top: pd.Series) -> None:
    """The winner: from the finalists' confirmed figures, with its ties, or why it is not confirmed."""
    config = _short_params(top["params_json"])
    if not analysis.confirmed_within_budget(top):
        why = ("the study has no confirmation set" if not analysis.confirmed_study(df)
               else "no finalist stayed within the budget on the confirmation split")
        doc.para(
            f"Best feasible: trial {top['trial_number']}, {top['backend']} (not confirmed: {why}; the trial's "
            f"own figures): {_fmt(top['latency_ms_p50'], '.4f')} ms p50, speedup {_fmt(top['speedup'], '.2f')}x "
            f"vs FP32 PyTorch, accuracy drop {_fmt(top['accuracy_drop'], '.2f')}, "
            f"size {_fmt(top['size_bytes'] / 1e3, '.1f')} kB. Config: {config}."
        )
        return
    tied = analysis.ties_of(df, top)
    ties = (f" Tied within the timing noise with trial(s) {', '.join(map(str, tied['trial_number']))}; "
            "the simplest is shown first (fewer excluded layers, FP32 before INT8, smaller artifact)."
            if not tied.empty else " No other finalist is within the timing noise of it.")
    doc.para(
        f"Best feasible: trial {top['trial_number']}, {top['backend']}, chosen from the confirmed figures: "
        f"{_fmt(top['confirmed_latency_ms_p50'], '.4f')} ms p50 (trial: {_fmt(top['latency_ms_p50'], '.4f')}), "
        f"speedup {_fmt(top['confirmed_speedup'], '.2f')}x vs FP32 PyTorch, accuracy drop "
        f"{_fmt(top['confirmed_accuracy_drop'], '.2f')} on "
        f"{describe_split(top['confirmed_split'], top['confirmed_samples'])} "
        f"(trial: {_fmt(top['accuracy_drop'], '.2f')}), size {_fmt(top['size_bytes'] / 1e3, '.1f')} kB. "
        f"Config: {config}.{ties}"
    )
    doc.para("Finalists, re-timed together round-robin with FP32 and re-scored on the confirmation split "
             "(same tie group: latencies within the timing noise):")
    doc.table(_finalists_view(df))


def _footer(doc: _Doc, study_dir: Path) -> None:
    doc.heading("Use the results")
    trials = f"{study_dir}/trials/*.parquet"
    for line in (
        f"pandas: sweeper.results.load('{study_dir}')",
        f"DuckDB: SELECT * FROM read_parquet('{trials}')",
        f"Polars: pl.scan_parquet('{trials}')",
        f"Live dashboard: optuna-dashboard {study_dir}/study.journal",
        f"Ship a model: sweeper export {study_dir} --best --to exported/",
    ):
        doc.para(line)
    doc.para(f"Generated {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC.")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table.t { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
table.t th, table.t td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
table.t th { background: #f3f3f3; }
div.w { overflow-x: auto; } table.t tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
"""


def _page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>sweeper report: {html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>sweeper report: {html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
