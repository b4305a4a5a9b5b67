from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sweeper.cli import app
from sweeper.events import SweepStarted, TrialFinished

runner = CliRunner()

GOOD = """
task: {task}
constraint: {{max_drop: 1.0}}
backends: {{onnxruntime_fp32: {{}}}}
"""


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _assert_input_error(result, *words: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    for word in words:
        assert word in output, f"{word!r} not in {output!r}"


def test_missing_space_file(tmp_path: Path) -> None:
    _assert_input_error(runner.invoke(app, ["run", str(tmp_path / "nope.yaml")]), "does not exist")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    _assert_input_error(runner.invoke(app, ["run", str(_space(tmp_path, "task: [x\n"))]), "not valid YAML")


def test_unknown_backend_names_the_near_miss(tmp_path: Path) -> None:
    path = _space(tmp_path, "task: digits_cnn\nconstraint: {max_drop: 1}\nbackends: {torch_dynamic_int9: {}}\n")
    _assert_input_error(runner.invoke(app, ["run", str(path)]), "torch_dynamic_int9", "torch_dynamic_int8")


def test_unknown_task_starts_nothing(tmp_path: Path) -> None:
    path = _space(tmp_path, GOOD.format(task="digits_cnm"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    _assert_input_error(result, "unknown task 'digits_cnm'", "digits_cnn")
    assert not out.exists(), "nothing is left behind"


def test_unwritable_output_folder(tmp_path: Path) -> None:
    path = _space(tmp_path, GOOD.format(task="digits_cnn"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    _assert_input_error(runner.invoke(app, ["run", str(path), "--out", str(blocker)]), "is a file")
    _assert_input_error(runner.invoke(app, ["run", str(path), "--out", "/proc/sweeper-out"]), "cannot write results", "writable --out")


def test_option_out_of_range() -> None:
    result = runner.invoke(app, ["run", "x.yaml", "--trials", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml"), "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.output


def test_backends_lists_every_backend() -> None:
    from sweeper.backends import BACKENDS

    result = runner.invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    for name in BACKENDS:
        assert name in result.output
    assert f"{len(BACKENDS)} backends registered" in result.output


def test_show_a_missing_folder(tmp_path: Path) -> None:
    _assert_input_error(runner.invoke(app, ["show", str(tmp_path / "none")]), "does not exist")


# --- output that survives 80 columns and pipes -------------------------------------------------

import re  # noqa: E402

import pytest  # noqa: E402
from rich.console import Console  # noqa: E402
from synthetic_study import make_study  # noqa: E402

from sweeper import cli, results  # noqa: E402

CUT = "\u2026"  # what rich ends a cut cell with


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints as it would piped into an 80-column terminal."""
    monkeypatch.setattr(cli, "console", Console(width=80, highlight=False))


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=200, highlight=False))


def _other_study(out: Path, *, feasible: bool) -> Path:
    """A second study, 'other', of another task: two rows, feasible or not."""
    study = out / "other"
    results.write_study_info(study, {"study": "other", "task": "segment_mlp", "space": "objective: latency_ms_p50\n",
                                     "baseline": {"metric": 90.0}})
    for n, (latency, drop) in enumerate([(0.1, 3.0), (0.3, 2.0)]):
        results.write_row(study, {
            "study": "other", "trial_number": n, "state": "complete", "task": "segment_mlp",
            "backend": "onnxruntime_dynamic_int8", "params_json": '{"per_channel": true}', "accuracy": 90.0 - drop,
            "accuracy_fp32": 90.0, "accuracy_drop": drop, "feasible": feasible, "max_drop": 1.0,
            "latency_ms_p50": latency, "speedup": 0.5 / latency, "size_bytes": 1000, "agreement": 95.0,
        })  # fmt: skip
    return study


def test_version_and_short_help_option() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sweeper {version('sweeper')}"
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0 and "--version" in top.output and "-h, --help" in top.output
    for command in ("run", "backends", "show", "sensitivity", "report", "export"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_help_texts_are_whole_at_80_columns() -> None:
    for command in ("run", "show", "sensitivity", "report", "export"):
        result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert CUT not in result.output and "..." not in result.output, result.output
        assert max(map(len, result.output.splitlines())) <= 80
    sens = " ".join(CliRunner(env={"COLUMNS": "80"}).invoke(app, ["sensitivity", "--help"]).output.split())
    sens = sens.replace("- ", "-")  # click may wrap after a hyphen
    assert "the table becomes its sensitivity.parquet" in sens and "BACKEND-sensitivity.parquet" in sens
    top = " ".join(CliRunner(env={"COLUMNS": "80"}).invoke(app, ["--help"]).output.split())
    assert "Ray tasks build and measure them." in top, "command summaries are whole sentences"
    assert "and a loader snippet." in top


def test_backends_at_80_columns_keep_every_name_whole(narrow: None) -> None:
    from sweeper.backends import availability, get_backend

    result = runner.invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    assert CUT not in result.output
    words = set(re.findall(r"[A-Za-z0-9_]+", result.output))
    for name, reason in availability().items():
        assert name in words, name
        assert set(get_backend(name).Config.model_fields) <= words, name
    if availability()["tensorrt"] is not None and "sweeper[tensorrt]" in str(availability()["tensorrt"]):
        assert "sweeper[tensorrt]" in result.output, "rich markup does not eat the install hint"


def test_show_at_80_columns_keeps_backends_and_params_whole(narrow: None, tmp_path: Path) -> None:
    study = make_study(tmp_path)
    result = runner.invoke(app, ["show", str(study)])
    assert result.exit_code == 0, result.output
    assert CUT not in result.output
    assert result.output.startswith("1 study, 12 rows: syn")
    assert "trial 0  onnxruntime_static_int8" in result.output and "torch_dynamic_int8" in result.output
    for param in ("calibration_method=minmax", "calibration_samples=32", "nodes_to_exclude=['conv1']", "per_channel=True"):
        assert param in result.output, param


def test_show_several_studies_names_them_and_ranks_each(wide: None, tmp_path: Path) -> None:
    study = make_study(tmp_path / "results")
    _other_study(tmp_path / "results", feasible=True)
    result = runner.invoke(app, ["show", str(study.parent)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 studies, 14 rows: other, syn")
    assert "study other (task segment_mlp)" in result.output and "study syn (task digits_cnn)" in result.output
    assert re.search(r"┃ study\s+┃ trial", result.output), "a study column"
    best = re.findall(r"Best feasible: trial (\d+) (\S+):", result.output)
    assert best == [("0", "onnxruntime_dynamic_int8"), ("0", "onnxruntime_static_int8")], "one best per study"


def test_show_exits_3_when_a_study_has_nothing_feasible(narrow: None, tmp_path: Path) -> None:
    other = _other_study(tmp_path / "results", feasible=False)
    result = runner.invoke(app, ["show", str(other)])
    assert result.exit_code == 3, result.output
    assert "No configuration met max drop 1; closest: trial 1" in " ".join(result.output.split())
    make_study(tmp_path / "results")
    assert runner.invoke(app, ["show", str(tmp_path / "results")]).exit_code == 3, "one study without: 3"


def test_show_maximises_a_higher_is_better_objective(narrow: None, tmp_path: Path) -> None:
    study = make_study(tmp_path)
    result = runner.invoke(app, ["show", str(study), "--objective", "speedup"])
    assert result.exit_code == 0, result.output
    assert "Best feasible: trial 0 " in result.output, "the fastest, not the slowest (trial 4)"
    assert "by speedup, highest first" in result.output
    by_size = runner.invoke(app, ["show", str(study), "--objective", "size_bytes"]).output
    assert "Best feasible: trial 2 " in by_size and "lowest first" in by_size


def test_export_takes_a_results_folder_holding_one_study(tmp_path: Path) -> None:
    make_study(tmp_path / "results")
    result = runner.invoke(app, ["export", str(tmp_path / "results"), "--best", "--to", str(tmp_path / "shipped")])
    assert result.exit_code == 0, result.output
    assert "Exported trial 0" in result.output and (tmp_path / "shipped" / "config.json").is_file()


def test_error_messages_are_not_parsed_as_markup(tmp_path: Path) -> None:
    missing = tmp_path / "runs[bold]x"
    result = runner.invoke(app, ["show", str(missing)])
    assert result.exit_code == 2 and "runs[bold]x' does not exist" in result.output


def test_live_progress_at_80_columns_wraps_instead_of_cutting() -> None:
    import io

    from sweeper.progress import SweepProgress

    console = Console(width=80, file=io.StringIO(), color_system=None)
    progress = SweepProgress(console, "latency_ms_p50")
    progress.on_event(SweepStarted(study="runs[v2]", study_dir="results/runs[v2]", accuracy_fp32=98.0,
                                   done=0, trials=20, max_concurrent=2))
    progress.on_event(TrialFinished(row={"state": "complete", "feasible": True, "latency_ms_p50": 0.2,
                                         "backend": "onnxruntime_static_int8", "trial_number": 3}))
    console.print(progress.progress.get_renderable())
    text = console.file.getvalue()
    assert CUT not in text and "results/runs[v2]" in text and "runs[v2]" in text.splitlines()[2]
    assert "(onnxruntime_static_int8, trial 3)" in text
