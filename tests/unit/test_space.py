from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from sweeper.backends import get_backend
from sweeper.errors import ConfigError
from sweeper.params import Choices, Fixed, Range
from sweeper.sampling import suggest
from sweeper.space import load_space

BASE = """
task: digits_cnn
constraint: {max_drop: 1.0}
"""


def _write(tmp_path: Path, body: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _space(tmp_path: Path, backends: str, extra: str = "") -> Path:
    return _write(tmp_path, BASE + extra + "backends:\n" + textwrap.indent(textwrap.dedent(backends), "  "))


def test_quickstart_parses(root: Path) -> None:
    space = load_space(root / "search_spaces" / "quickstart.yaml")
    assert space.task == "digits_cnn" and space.study == "quickstart"
    assert set(space.backends) == {
        "onnxruntime_fp32", "onnxruntime_static_int8", "onnxruntime_dynamic_int8", "torch_dynamic_int8",
    }
    static = space.backends["onnxruntime_static_int8"]
    assert static["calibration_method"] == Choices(("minmax", "entropy", "percentile"))
    assert static["calibration_samples"] == Range(low=16, high=256, log=True, integer=True)
    assert space.constraint.max_drop == 1.0 and space.target_of("onnxruntime_fp32").num_cpus == 1


def test_param_forms(tmp_path: Path) -> None:
    path = _space(tmp_path, """
        onnxruntime_static_int8:
          per_channel: true
          calibration_method: {choices: [entropy]}
          calibration_samples: {low: 8, high: 64, step: 8}
          nodes_to_exclude: {value: [a, b]}
    """)
    params = load_space(path).backends["onnxruntime_static_int8"]
    assert params["per_channel"] == Fixed(True)
    assert params["calibration_method"] == Choices(("entropy",))
    assert params["calibration_samples"] == Range(low=8, high=64, step=8, integer=True)
    assert params["nodes_to_exclude"] == Fixed(("a", "b"))


# (what is wrong, the file's text, words the message must contain)
BAD_SPACES = [
    ("yaml syntax", "task: [unclosed\n", ["not valid YAML"]),
    ("not a mapping", "- a\n- b\n", ["top level must be a mapping"]),
    ("missing constraint", "task: t\nbackends: {onnxruntime_fp32: {}}\n", ["'constraint'", "required"]),
    ("unknown top-level key", BASE + "trails: 3\nbackends: {onnxruntime_fp32: {}}\n", ["'trails'", "Did you mean 'trials'", "Allowed keys"]),
    ("negative max drop", "task: t\nconstraint: {max_drop: -1}\nbackends: {onnxruntime_fp32: {}}\n", ["constraint.max_drop", "greater than or equal to 0"]),
    ("bad drop mode", "task: t\nconstraint: {max_drop: 1, mode: percent}\nbackends: {onnxruntime_fp32: {}}\n", ["constraint.mode", "'absolute' or 'relative'"]),
    ("unknown hardware target", BASE + "hardware: {target: tpu}\nbackends: {onnxruntime_fp32: {}}\n", ["hardware.target", "'cpu' or 'gpu'"]),
    ("no backends", BASE + "backends: {}\n", ["'backends'"]),
    ("unknown backend", BASE + "backends: {onnxruntime_static_int9: {}}\n", ["unknown backend 'onnxruntime_static_int9'", "Did you mean 'onnxruntime_static_int8'", "Known backends"]),
    ("unknown parameter", BASE + "backends: {onnxruntime_static_int8: {calibration_metod: [minmax]}}\n", ["calibration_metod", "Did you mean 'calibration_method'", "Its parameters"]),
    ("bad choice", BASE + "backends: {onnxruntime_static_int8: {calibration_method: [minmax, kl]}}\n", ["calibration_method", "'kl'", "minmax"]),
    ("wrong type", BASE + "backends: {onnxruntime_static_int8: {per_channel: 'yes'}}\n", ["per_channel", "'yes'", "bool"]),
    ("empty choices", BASE + "backends: {onnxruntime_static_int8: {calibration_method: {choices: []}}}\n", ["non-empty list"]),
    ("inverted range", BASE + "backends: {onnxruntime_static_int8: {calibration_samples: {low: 64, high: 8}}}\n", ["low (64) must be smaller than high (8)"]),
    ("negative sample count", BASE + "backends: {onnxruntime_static_int8: {calibration_samples: {low: -4, high: 8}}}\n", ["calibration_samples.low", "-4"]),
    ("float for an int range", BASE + "backends: {onnxruntime_static_int8: {calibration_samples: {low: 1.5, high: 8}}}\n", ["must be an integer"]),
    ("range on a choice field", BASE + "backends: {onnxruntime_static_int8: {calibration_method: {low: 1, high: 2}}}\n", ["a range needs an int or float parameter"]),
    ("bad param form", BASE + "backends: {onnxruntime_static_int8: {calibration_samples: {min: 1, max: 2}}}\n", ["{low: ..., high: ..."]),
    ("gpu target without gpus", BASE + "hardware: {target: gpu}\nbackends: {onnxruntime_fp32: {}}\n", ["'hardware'", "needs num_gpus > 0"]),
    ("cpu backend with only gpu targets", BASE + "targets: {g: {kind: gpu, num_gpus: 1}}\nbackends: {onnxruntime_fp32: {}}\n", ["'backends.onnxruntime_fp32'", "runs on cpu", "only targets of kind gpu"]),
    ("unknown target name", BASE + "targets: {cpu_server: {}}\nbackends: {onnxruntime_fp32: {target: cpu_sever}}\n", ["unknown target 'cpu_sever'", "Did you mean 'cpu_server'"]),
    ("hardware and targets", BASE + "hardware: {}\ntargets: {a: {}}\nbackends: {onnxruntime_fp32: {}}\n", ["either 'hardware'", "not both"]),
    ("negative resource", BASE + "hardware: {resources: {fast: -1}}\nbackends: {onnxruntime_fp32: {}}\n", ["resource 'fast' must be a positive amount"]),
    ("zero timeout", BASE + "trial_timeout_s: 0\nbackends: {onnxruntime_fp32: {}}\n", ["'trial_timeout_s'", "greater than 0"]),
    ("zero trials", BASE + "trials: 0\nbackends: {onnxruntime_fp32: {}}\n", ["'trials'", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("label,text,expected", BAD_SPACES, ids=[c[0] for c in BAD_SPACES])
def test_bad_spaces_get_one_clear_message(tmp_path: Path, label: str, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message or "unknown backend" in message, message
    for words in expected:
        assert words in message, f"{label}: {words!r} not in {message!r}"
    assert "\n" not in message.strip()


def test_targets_and_ray_options(tmp_path: Path) -> None:
    path = _space(tmp_path, """
        onnxruntime_fp32: {target: big}
        torch_dynamic_int8: {}
    """, extra="targets:\n  small: {num_cpus: 1, resources: {small_node: 1}}\n  big: {num_cpus: 2, labels: {tier: big}}\n")
    space = load_space(path)
    assert space.backend_targets == {"onnxruntime_fp32": "big", "torch_dynamic_int8": "small"}
    assert space.target_of("onnxruntime_fp32").ray_options() == {"num_cpus": 2, "label_selector": {"tier": "big"}}
    assert space.target_of("torch_dynamic_int8").ray_options() == {"num_cpus": 1, "resources": {"small_node": 1.0}}


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_suggest_is_define_by_run_and_yields_valid_configs(root: Path) -> None:
    space = load_space(root / "search_spaces" / "quickstart.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        backend, params = suggest(trial, space)
        seen.add(backend)
        assert all(name == "backend" or name.startswith(f"{backend}.") for name in trial.params)
        config = get_backend(backend).config(params)
        assert config.model_dump(include=set(params)) == params
        if backend == "onnxruntime_static_int8":
            assert 16 <= params["calibration_samples"] <= 256
        study.tell(trial, 1.0)
    assert seen == set(space.backends)


def test_list_valued_choices_round_trip_through_optuna(tmp_path: Path) -> None:
    path = _space(tmp_path, """
        onnxruntime_static_int8:
          nodes_to_exclude: {choices: [[], [a], [a, b]]}
    """)
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = set()
    for _ in range(20):
        trial = study.ask()
        _, params = suggest(trial, space)
        values.add(params["nodes_to_exclude"])
        study.tell(trial, 0.0)
    assert values == {(), ("a",), ("a", "b")}


def test_a_key_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "task: digits_cnn\nconstraint: {max_drop: 1.0}\nbackends:\n  onnxruntime_fp32: {}\n"
                            "  torch_dynamic_int8: {}\n  onnxruntime_fp32: {opset: 17}\n")
    with pytest.raises(ConfigError, match=r"key 'onnxruntime_fp32' is given twice, at line 4 and line 6"):
        load_space(path)


def test_a_merge_key_may_override_on_purpose(tmp_path: Path) -> None:
    path = _write(tmp_path, "task: digits_cnn\nconstraint: {max_drop: 1.0}\nbackends:\n"
                            "  onnxruntime_fp32: &base {opset: 17}\n  onnxruntime_fp16: {<<: *base, opset: 18}\n")
    assert load_space(path).backends["onnxruntime_fp16"]["opset"] == Fixed(18)


@pytest.mark.parametrize(
    "constraint,expected",
    [
        ("{max_drop: 150, mode: relative}", "at most 100"),
        ("{max_drop: .inf}", "finite number"),
        ("{max_drop: .nan}", "finite number"),
    ],
)
def test_max_drop_bounds(tmp_path: Path, constraint: str, expected: str) -> None:
    path = _write(tmp_path, f"task: digits_cnn\nconstraint: {constraint}\nbackends: {{onnxruntime_fp32: {{}}}}\n")
    with pytest.raises(ConfigError, match=expected):
        load_space(path)


def test_absolute_max_drop_is_checked_against_a_percentage_metric(tmp_path: Path) -> None:
    from sweeper.space import check_constraint

    class Pct:
        name, metric_name = "t", "top1_accuracy_pct"

    class Loss:
        name, metric_name = "t", "loss"

    huge = load_space(_write(tmp_path, "task: t\nconstraint: {max_drop: 1e9}\nbackends: {onnxruntime_fp32: {}}\n"))
    with pytest.raises(ConfigError, match=r"1e\+09 points.*top1_accuracy_pct.*allowed: 0\.\.100"):
        check_constraint(huge, Pct())
    check_constraint(huge, Loss())  # a metric in other units has no upper bound
    relative = load_space(_write(tmp_path, "task: t\nconstraint: {max_drop: 100, mode: relative}\n"
                                           "backends: {onnxruntime_fp32: {}}\n", "rel.yaml"))
    check_constraint(relative, Pct())


def test_min_runs_must_not_exceed_the_max_runs_cap(tmp_path: Path) -> None:
    path = _space(tmp_path, "onnxruntime_fp32: {}", extra="measure: {min_runs: 5, max_runs: 2}\n")
    with pytest.raises(ConfigError, match=r"min_runs \(5\) must be at most max_runs \(2\).*min_time_s"):
        load_space(path)
    ok = _space(tmp_path, "onnxruntime_fp32: {}", extra="measure: {min_runs: 5, max_runs: 5}\n")
    assert load_space(ok).measure.max_runs == 5
