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
