"""Bad input, table-driven, through the CLI: one clear message, exit code 2, nothing left behind.

Each case builds its inputs in a fresh folder and runs a command in-process (``sweeper run`` unless
the case names another; the runtime cases use the test session's local Ray). For every case: exit
code 2, one line naming what is wrong and what is allowed, no traceback, and no study folder is
left in the output folder (or an existing study is left as it was); the other commands leave the
case's folder exactly as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeper.cli import app

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPACE = """\
task: {task}
trials: 2
constraint: {{max_drop: {max_drop}}}
measure: {measure}
backends:
{backends}
"""
FAST = "{warmup_runs: 1, min_runs: 5, min_time_s: 0}"


def space(tmp: Path, *, task: str = "digits_cnn", max_drop: str = "1.0", backends: str = "  onnxruntime_fp32: {}",
          extra: str = "", measure: str = FAST) -> Path:
    path = tmp / "space.yaml"
    path.write_text(SPACE.format(task=task, max_drop=max_drop, backends=backends, measure=measure) + extra)
    return path


def task_file(tmp: Path, source: str) -> str:
    path = tmp / "my_task.py"
    path.write_text(source)
    return str(path)


@dataclass(frozen=True)
class Case:
    name: str
    args: Callable[[Path], list[str]]
    expected: list[str]
    existing_study: bool = False
    extra_args: list[str] = field(default_factory=list)
    command: str = "run"


UNEXPORTABLE = f'''
import torch
from pathlib import Path
from sweeper.task import load_task
_DIGITS = load_task({str(ROOT / "tasks" / "digits_cnn.py")!r})
class M(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        y = self.inner(x)
        return y + 0.0 * torch.cummax(y, dim=1).values
class T(type(_DIGITS)):
    def build_model(self):
        return M(super().build_model()).eval()
TASK = T()
'''

STATIC = "onnxruntime_static_int8"

# A task whose calibration split (50 samples) is smaller than a backend's default count (128).
TINY_TASK = (
    "import numpy as np, torch\nfrom sweeper import ModelTask\nx = np.zeros((60, 4), 'float32')\n"
    "TASK = ModelTask('tiny', torch.nn.Linear(4, 2), calibration=x[:50], evaluation=(x, np.zeros(60, 'int64')))\n"
)

CASES = [
    Case("missing space file", lambda t: [str(t / "nope.yaml")], ["nope.yaml", "does not exist"]),
    Case("yaml syntax error", lambda t: [str(_write(t, "task: [x\n"))], ["not valid YAML at line"]),
    Case("top level not a mapping", lambda t: [str(_write(t, "- 1\n"))], ["top level must be a mapping"]),
    Case("missing constraint", lambda t: [str(_write(t, "task: digits_cnn\nbackends: {onnxruntime_fp32: {}}\n"))], ["'constraint'", "required key is missing"]),
    Case("unknown top-level key", lambda t: [str(space(t, extra="trails: 3\n"))], ["'trails'", "Did you mean 'trials'"]),
    Case("unknown backend near miss", lambda t: [str(space(t, backends="  onnxruntime_fp23: {}"))], ["unknown backend 'onnxruntime_fp23'", "Did you mean 'onnxruntime_fp32'", "Known backends"]),
    Case("unknown parameter", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {per_chanel: true}"))], ["'per_chanel'", "Did you mean 'per_channel'"]),
    Case("parameter of the wrong type", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {per_channel: 'yes'}"))], ["per_channel", "'yes'", "valid boolean"]),
    Case("value not among the allowed", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {quant_format: [qdq, qop]}"))], ["quant_format", "'qop'", "'qdq' or 'qoperator'"]),
    Case("empty choice list", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {per_channel: {choices: []}}"))], ["choices must be a non-empty list"]),
    Case("inverted range", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {calibration_samples: {low: 128, high: 16}}"))], ["low (128) must be smaller than high (16)"]),
    Case("negative sample count", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {calibration_samples: -8}"))], ["calibration_samples", "-8", "greater than or equal to 1"]),
    Case("sample count above the calibration set", lambda t: [str(space(t, backends="  onnxruntime_static_int8: {calibration_samples: {low: 16, high: 5000}}"))], ["up to 5000 samples", "has 360 calibration samples", "allowed: 1..360"]),
    Case("a backend's default sample count above the calibration set", lambda t: [str(space(t, task=task_file(t, TINY_TASK), backends="  torch_static_int8: {}"))], ["'torch_static_int8' calibrates with 128 samples by default", "has 50 calibration samples", "calibration_samples to 1..50"]),
    Case("negative max drop", lambda t: [str(space(t, max_drop="-0.5"))], ["constraint.max_drop", "greater than or equal to 0"]),
    Case("unknown drop mode", lambda t: [str(space(t, max_drop="1, mode: percent"))], ["constraint.mode", "'absolute' or 'relative'"]),
    Case("unknown hardware kind", lambda t: [str(space(t, extra="hardware: {kind: tpu}\n"))], ["hardware.kind", "'cpu' or 'gpu'"]),
    Case("cpu backend with only a gpu target", lambda t: [str(space(t, extra="targets: {g: {kind: gpu, num_gpus: 1}}\n"))], ["runs on cpu", "only targets of kind gpu"]),
    Case("unknown task", lambda t: [str(space(t, task="digits_cnm"))], ["unknown task 'digits_cnm'", "Did you mean 'digits_cnn'"]),
    Case("missing task file", lambda t: [str(space(t, task=str(t / "gone.py")))], ["task file", "gone.py", "does not exist"]),
    Case("task module without a task", lambda t: [str(space(t, task=task_file(t, "X = 1\n")))], ["defines no 'TASK'", "sweeper.task.Task"]),
    Case("task that raises on load", lambda t: [str(space(t, task=task_file(t, "raise RuntimeError('dataset is missing')\n")))], ["raised while loading", "RuntimeError: dataset is missing"]),
    Case("task object of the wrong type", lambda t: [str(space(t, task=task_file(t, "TASK = 'digits'\n")))], ["is of type str, not a sweeper.task.Task"]),
    Case("model that fails ONNX export", lambda t: [str(space(t, task=task_file(t, UNEXPORTABLE)))], ["cannot export task", "cummax", "choose another exporter or opset"]),
    Case("output folder is a file", lambda t: [str(space(t)), "--out", str(_write(t, "", "a_file"))], ["is a file", "give a folder"]),
    Case("unwritable output folder", lambda t: [str(space(t)), "--out", "/proc/sweeper-results"], ["cannot write results", "writable --out"]),
    Case("output folder holding another study", lambda t: [str(space(t)), "--out", str(_study(t, 1))], ["already holds a study named 'space'", "--resume"], existing_study=True),
    Case("resuming another schema's study", lambda t: [str(space(t)), "--out", str(_study(t, 99)), "--resume"], ["results schema 99", "cannot resume"], existing_study=True),
    Case("resuming a study that does not exist", lambda t: [str(space(t)), "--out", str(t / "out"), "--resume"], ["cannot resume study 'space'", "Run without --resume"]),
    Case("address that does not answer", lambda t: [str(space(t)), "--address", "127.0.0.1:9"], ["no Ray cluster answers at --address '127.0.0.1:9'", "embedded local Ray"]),
    Case("address that is not an address", lambda t: [str(space(t)), "--address", "my-cluster"], ["is not an address", "'ray://HOST:PORT'"]),
    Case("zero trials on the command line", lambda t: [str(space(t)), "--trials", "0"], ["--trials", "greater than or equal to 1"]),
    Case("duplicate key in the space", lambda t: [str(space(t, extra="trials: 3\n"))], ["key 'trials' is given twice, at line 2 and line 7", "remove one"]),
    Case("absurd absolute max drop", lambda t: [str(space(t, max_drop="1e9"))], ["constraint.max_drop", "1e+09 points", "top1_accuracy_pct", "allowed: 0..100"]),
    Case("relative max drop above 100", lambda t: [str(space(t, max_drop="150, mode: relative"))], ["max_drop 150 with mode 'relative'", "at most 100"]),
    Case("infinite max drop", lambda t: [str(space(t, max_drop=".inf"))], ["constraint.max_drop", "finite number"]),
    Case("min runs above max runs", lambda t: [str(space(t, measure="{min_runs: 5, max_runs: 2}"))], ["min_runs (5) must be at most max_runs (2)", "stops at max_runs", "min_time_s"]),
    Case("task file with a syntax error", lambda t: [str(space(t, task=task_file(t, "def broken(:\n")))], ["my_task.py' has a syntax error at line 1"]),
    Case("sensitivity: task that raises on load", lambda t: ["--task", task_file(t, "raise RuntimeError('dataset is missing')\n"), "--backend", STATIC, "--out", str(t / "sens")], ["raised while loading", "RuntimeError: dataset is missing"], command="sensitivity"),
    Case("sensitivity: task file with a syntax error", lambda t: ["--task", task_file(t, "def broken(:\n"), "--backend", STATIC, "--out", str(t / "sens")], ["has a syntax error at line 1"], command="sensitivity"),
    Case("sensitivity: task module without a task", lambda t: ["--task", task_file(t, "X = 1\n"), "--backend", STATIC, "--out", str(t / "sens")], ["defines no 'TASK'"], command="sensitivity"),
    Case("sensitivity: unknown task", lambda t: ["--task", "digits_cnm", "--backend", STATIC, "--out", str(t / "sens")], ["unknown task 'digits_cnm'", "Did you mean 'digits_cnn'"], command="sensitivity"),
    Case("sensitivity: out is another task's study", lambda t: ["--task", "digits_cnn", "--backend", STATIC, "--out", str(_study(t, 1, task="segment_mlp") / "space")], ["is a study of task 'segment_mlp', not 'digits_cnn'"], command="sensitivity"),
    Case("sensitivity: out is a file", lambda t: ["--task", "digits_cnn", "--backend", STATIC, "--out", str(_write(t, "", "a_file"))], ["is a file", "give a folder"], command="sensitivity"),
    Case("report on a file", lambda t: [str(_write(t, "", "a_file"))], ["a_file' is a file", "give a study folder"], command="report"),
    Case("report on a missing folder", lambda t: [str(t / "gone")], ["gone' does not exist"], command="report"),
    Case("report out is a file", lambda t: [str(_study(t, 1) / "space"), "--out", str(_write(t, "", "a_file"))], ["--out", "a_file' is a file", "give a folder for the report"], command="report"),
    Case("export from a results folder of several studies", lambda t: [str(_two_studies(t)), "--best", "--to", str(t / "shipped")], ["holds 2 studies", "export from one of them", "out/a", "out/b"], command="export"),
    Case("export from a file", lambda t: [str(_write(t, "", "a_file")), "--best", "--to", str(t / "shipped")], ["is a file"], command="export"),
    Case("show a file", lambda t: [str(_write(t, "", "a_file"))], ["a_file' is a file", "give a study folder"], command="show"),
    Case("show by an unknown column", lambda t: [str(_two_studies(t) / "a"), "--objective", "speedu"], ["unknown column 'speedu'", "Did you mean 'speedup'"], command="show"),
]


def _write(tmp: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _study(tmp: Path, schema: int, task: str = "digits_cnn") -> Path:
    """An output folder that already holds a study named 'space' written with ``schema``."""
    out = tmp / "out"
    (out / "space" / "trials").mkdir(parents=True)
    (out / "space" / "study.json").write_text(json.dumps({"schema_version": schema, "study": "space", "task": task}))
    return out


def _two_studies(tmp: Path) -> Path:
    """A results folder holding studies 'a' and 'b', one complete feasible row each."""
    from sweeper import results

    out = tmp / "out"
    for name in ("a", "b"):
        results.write_row(out / name, {
            "study": name, "trial_number": 0, "state": "complete", "backend": "onnxruntime_fp32", "params_json": "{}",
            "feasible": True, "accuracy_drop": 0.0, "latency_ms_p50": 1.0, "speedup": 1.0, "size_bytes": 1000,
        })  # fmt: skip
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_there_are_at_least_25_distinct_cases() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # task names are looked up in ./tasks
    args = case.args(tmp_path)
    if case.command != "run":
        _check_other_command(case, args, tmp_path)
        return
    out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    before = _snapshot(out) if out.is_dir() else None
    result = CliRunner().invoke(app, ["run", *args])
    _check_message(case, result)
    if case.existing_study:
        assert _snapshot(out) == before, "an existing study is left as it was"
    elif out.is_dir():
        assert not (out / "space").exists(), "no partial results are left behind"


def _check_message(case: Case, result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # click's own usage errors come after its "Usage: ..." and "Try ... -h" lines
    # click's usage lines aside, and the progress lines a sweep prints once it starts ("... ...").
    lines = [
        line for line in result.output.splitlines()
        if line.strip() and not line.startswith(("Usage: ", "Try ")) and not line.endswith(" ...")
    ]
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), f"one line: {result.output!r}"
    for words in case.expected:
        assert words in lines[0], f"{words!r} not in: {lines[0]}"


def _check_other_command(case: Case, args: list[str], tmp_path: Path) -> None:
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, [case.command, *args])
    _check_message(case, result)
    assert _tree(tmp_path) == before, "nothing is written or left behind"
