from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sweeper.cli import app

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
