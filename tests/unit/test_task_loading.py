from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.errors import TaskError
from sweeper.task import find_task_file, load_task


def test_find_by_name_and_by_path(root: Path, tmp_path: Path) -> None:
    tasks = root / "tasks"
    assert find_task_file("digits_cnn", [tmp_path, tasks]) == (tasks / "digits_cnn.py").resolve()
    assert find_task_file(str(tasks / "digits_cnn.py"), []) == (tasks / "digits_cnn.py").resolve()


def test_unknown_name_lists_known_tasks(root: Path) -> None:
    with pytest.raises(TaskError, match=r"unknown task 'digits_cn'\. Did you mean 'digits_cnn'\?.*mnist1d_gru"):
        find_task_file("digits_cn", [root / "tasks"])


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        find_task_file(str(tmp_path / "nope.py"), [])


@pytest.mark.parametrize(
    "source,expected",
    [
        ("X = 1\n", "defines no 'TASK'"),
        ("TASK = 3\n", "is of type int, not a sweeper.task.Task"),
        ("raise RuntimeError('no data here')\n", "raised while loading: RuntimeError: no data here"),
        ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    ],
)
def test_bad_task_modules(tmp_path: Path, source: str, expected: str) -> None:
    path = tmp_path / f"bad_{abs(hash(source))}.py"
    path.write_text(source)
    with pytest.raises(TaskError, match=expected):
        load_task(str(path))


def test_check_task_file_reports_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    from sweeper.task import check_task_file

    path = tmp_path / "broken.py"
    path.write_text("import os\n\ndef f(:\n    pass\n")
    with pytest.raises(TaskError, match=r"broken\.py' has a syntax error at line 3"):
        check_task_file(path)


def test_check_task_file_accepts_a_real_task(root: Path) -> None:
    from sweeper.task import check_task_file

    path = (root / "tasks" / "digits_cnn.py").resolve()
    assert check_task_file(path) == path


def test_one_task_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeper.task import task_search_dirs

    monkeypatch.chdir(tmp_path)
    spaces = tmp_path / "project" / "spaces"
    spaces.mkdir(parents=True)
    extra = tmp_path / "mine"
    assert task_search_dirs() == [tmp_path.resolve() / "tasks"]
    assert task_search_dirs(spaces / "s.yaml", [extra]) == [
        extra.resolve(), tmp_path.resolve() / "tasks", spaces.resolve() / "tasks", (tmp_path / "project").resolve() / "tasks",
    ]
