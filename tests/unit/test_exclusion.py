from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest

from sweeper.errors import ConfigError
from sweeper.exclusion import suggest_excluded, warm_start_ladder
from sweeper.params import Choices, Fixed, Range
from sweeper.sampling import suggest
from sweeper.triage import output_error, sqnr_db
from sweeper.space import load_space

BASE = "task: digits_cnn\nconstraint: {max_drop: 1.0}\nbackends:\n"


def _space(tmp_path: Path, backends: str, extra: str = "") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(backends), "  ") + extra)
    return path


def test_exclude_block_is_parsed(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, """
        onnxruntime_static_int8:
          calibration_method: [minmax, entropy]
          exclude: {top_k: {low: 0, high: 5}, per_layer: 3}
    """, extra="early_stop: {fraction: 0.3, margin: 1.5}\n"))
    spec = space.exclusions["onnxruntime_static_int8"]
    assert spec.top_k == Range(low=0, high=5, integer=True) and spec.per_layer == 3 and spec.candidates == 5
    assert "exclude" not in space.backends["onnxruntime_static_int8"]
    assert space.early_stop.fraction == 0.3 and space.early_stop.margin == 1.5


@pytest.mark.parametrize(
    "block,expected",
    [
        ("torch_dynamic_int8: {exclude: {top_k: 2}}", "cannot leave layers in float; backends that can: onnxruntime_static_int8"),
        ("onnxruntime_static_int8: {exclude: {top_k: {low: 4, high: 2}}}", "low (4) must be smaller than high (2)"),
        ("onnxruntime_static_int8: {exclude: {top_k: [1, -2]}}", "integers >= 0"),
        ("onnxruntime_static_int8: {exclude: {top_k: 0}}", "excludes nothing"),
        ("onnxruntime_static_int8: {exclude: {per_layer: 40}}", "per_layer"),
        ("onnxruntime_static_int8: {exclude: {top: 2}}", "Allowed keys: top_k"),
        ("onnxruntime_static_int8: {exclude: 3}", "must be a mapping"),
        ("onnxruntime_static_int8: {exclude: {top_k: 2}, nodes_to_exclude: {value: [a]}}", "not both"),
    ],
)
def test_bad_exclude_blocks(tmp_path: Path, block: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, block + "\n"))
    assert expected in str(info.value)
    assert "exclude" in str(info.value) or "nodes_to_exclude" in str(info.value)


def test_bad_early_stop(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="early_stop.fraction"):
        load_space(_space(tmp_path, "onnxruntime_fp32: {}\n", extra="early_stop: {fraction: 1.5}\n"))


RANKING = ["conv1", "fc2", "conv2", "fc1", "conv3"]


def test_suggested_exclusion_follows_the_ranking(tmp_path: Path) -> None:
    from sweeper.exclusion import ExclusionSearch

    spec = ExclusionSearch(top_k=Range(low=0, high=3, integer=True), per_layer=4)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        layers = suggest_excluded(trial, "b", spec, RANKING)
        k = trial.params["b.exclude_top_k"]
        picks = {layer for layer in RANKING[:4] if trial.params[f"b.exclude.{layer}"]}
        assert set(layers) == set(RANKING[:k]) | picks
        assert list(layers) == [layer for layer in RANKING if layer in layers], "ranking order"
        seen.add(layers)
        study.tell(trial, 0.0)
    assert len(seen) > 5


def test_fixed_and_choice_top_k() -> None:
    from sweeper.exclusion import ExclusionSearch

    study = optuna.create_study()
    trial = study.ask()
    assert suggest_excluded(trial, "b", ExclusionSearch(top_k=Fixed(2), per_layer=0), RANKING) == ("conv1", "fc2")
    assert "b.exclude_top_k" not in trial.params
    trial = study.ask()
    layers = suggest_excluded(trial, "b", ExclusionSearch(top_k=Choices((0, 4)), per_layer=0), RANKING)
    assert layers in {(), tuple(RANKING[:4])}


def test_warm_start_ladder() -> None:
    from sweeper.exclusion import ExclusionSearch

    ladder = warm_start_ladder("b", ExclusionSearch(top_k=Range(low=0, high=6, integer=True), per_layer=0))
    assert [p["b.exclude_top_k"] for p in ladder] == [0, 1, 2, 4]
    assert all(p["backend"] == "b" for p in ladder)
    assert warm_start_ladder("b", ExclusionSearch(top_k=Fixed(2), per_layer=2)) == []


def test_revert_step_bisects_to_the_smallest_feasible_k() -> None:
    from sweeper.exclusion import ExclusionSearch, revert_step

    search = ExclusionSearch(top_k=Range(low=0, high=40, integer=True), per_layer=0)
    # The ladder 0..32 met the budget only at 32: try 24, then (feasible at k >= 20, say) 20, 18, 19.
    smallest_feasible = 19
    tried = {k: k >= smallest_feasible for k in (0, 1, 2, 4, 8, 16, 32)}
    steps = []
    while (k := revert_step(search, tried, set())) is not None:
        steps.append(k)
        tried[k] = k >= smallest_feasible
    assert steps == [24, 20, 18, 19]
    assert min(k for k, ok in tried.items() if ok) == smallest_feasible
    # Nothing feasible on the ladder: every layer the search may revert; then nothing more.
    assert revert_step(search, {0: False, 32: False}, set()) == 40
    assert revert_step(search, {0: False, 32: False, 40: False}, set()) is None
    # A step equal to a running trial's k waits for it; k=0 feasible needs nothing.
    assert revert_step(search, {16: False, 32: True}, {24}) is None
    assert revert_step(search, {0: True}, set()) is None
    assert revert_step(ExclusionSearch(top_k=Choices((0, 4)), per_layer=0), {0: False}, set()) is None


def test_revert_trials_refine_the_feasible_trial_once_the_queue_is_empty() -> None:
    from types import SimpleNamespace

    from sweeper.exclusion import ExclusionSearch, revert_trials

    def trial(number: int, k: int, state: str = "COMPLETE", method: str = "minmax") -> SimpleNamespace:
        params = {"backend": "b", "b.exclude_top_k": k, "b.calibration_method": method}
        return SimpleNamespace(number=number, state=SimpleNamespace(name=state), params=params)

    search = {"b": ExclusionSearch(top_k=Range(low=0, high=8, integer=True), per_layer=0)}
    trials = [trial(0, 0), trial(1, 4, method="entropy"), trial(2, 8, method="percentile")]
    rows = [{"trial_number": 0, "state": "complete", "feasible": False, "accuracy_drop": 9.0},
            {"trial_number": 1, "state": "pruned", "feasible": False, "accuracy_drop": None},
            {"trial_number": 2, "state": "complete", "feasible": True, "accuracy_drop": 0.5}]
    (step,) = revert_trials(trials, rows, search)
    assert step == {"backend": "b", "b.exclude_top_k": 6, "b.calibration_method": "percentile"}
    # Nothing feasible: k = high with the parameters of the trial closest to the budget.
    rows[2] |= {"feasible": False, "accuracy_drop": 3.0}
    trials.append(trial(3, 2, method="entropy"))
    rows.append({"trial_number": 3, "state": "complete", "feasible": False, "accuracy_drop": 1.5})
    assert revert_trials(trials[:3], rows, search) == []  # k = 8 = high was tried
    search = {"b": ExclusionSearch(top_k=Range(low=0, high=10, integer=True), per_layer=0)}
    (step,) = revert_trials(trials, rows, search)
    assert step == {"backend": "b", "b.exclude_top_k": 10, "b.calibration_method": "entropy"}
    # Nothing is asked while a trial waits in the queue, nor twice while one runs.
    assert revert_trials([*trials, trial(4, 1, state="WAITING")], rows, search) == []
    assert revert_trials([*trials, trial(4, 10, state="RUNNING")], rows, search) == []


def test_suggest_fills_the_exclusion_field(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, "onnxruntime_static_int8: {exclude: {top_k: {low: 1, high: 2}}}\n"))
    study = optuna.create_study()
    backend, params = suggest(study.ask(), space, {"onnxruntime_static_int8": RANKING})
    assert backend == "onnxruntime_static_int8"
    assert params["nodes_to_exclude"] in {("conv1",), ("conv1", "fc2")}
    with pytest.raises(ValueError, match="no sensitivity ranking"):
        suggest(study.ask(), space, None)


def test_output_error_and_sqnr() -> None:
    ref = np.array([[3.0, 4.0]])
    assert output_error(ref, ref) == 0.0 and sqnr_db(0.0) == float("inf")
    assert output_error(ref, np.array([[3.0, 3.0]])) == pytest.approx(1 / 25)
    assert sqnr_db(1 / 100) == pytest.approx(20.0)


def test_always_and_never_patterns_are_parsed(tmp_path: Path) -> None:
    space = load_space(_space(tmp_path, """
        onnxruntime_static_int8:
          exclude: {top_k: {low: 0, high: 2}, always: ["conv*"], never: ["fc1"]}
    """))
    spec = space.exclusions["onnxruntime_static_int8"]
    assert spec.always == ("conv*",) and spec.never == ("fc1",)
    # Pinning alone is a valid exclusion block.
    only = load_space(_space(tmp_path, "onnxruntime_static_int8: {exclude: {always: ['/stem/*']}}\n"))
    assert only.exclusions["onnxruntime_static_int8"].always == ("/stem/*",)


@pytest.mark.parametrize(
    "block,expected",
    [
        ("onnxruntime_static_int8: {exclude: {top_k: 1, always: conv1}}", "always"),
        ("onnxruntime_static_int8: {exclude: {top_k: 1, never: ['']}}", "exclude.never': patterns must be non-empty"),
        ("onnxruntime_static_int8: {exclude: {top_k: 0, never: [conv1]}}", "excludes nothing"),
    ],
)
def test_bad_pin_patterns(tmp_path: Path, block: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, block + "\n"))
    assert expected in str(info.value) and "backends.onnxruntime_static_int8.exclude" in str(info.value)


def test_pinned_layers_are_always_or_never_excluded_and_not_counted_in_top_k() -> None:
    from sweeper.exclusion import ExclusionSearch

    spec = ExclusionSearch(top_k=Range(low=0, high=2, integer=True), per_layer=2, always=("conv3",), never=("fc*",))
    assert spec.free(RANKING) == ["conv1", "conv2"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        layers = suggest_excluded(trial, "b", spec, RANKING)
        k = trial.params["b.exclude_top_k"]
        assert "conv3" in layers and not {"fc1", "fc2"} & set(layers)
        assert set(["conv1", "conv2"][:k]) <= set(layers)
        assert list(layers) == [layer for layer in RANKING if layer in layers], "ranking order"
        assert not any(name.startswith("b.exclude.fc") for name in trial.params)
        study.tell(trial, 0.0)


def _study_with_ranking(tmp_path: Path, block: str) -> tuple[object, Path]:
    import pandas as pd

    space = load_space(_space(tmp_path, block + "\n"))
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    pd.DataFrame({"backend": "onnxruntime_static_int8", "layer": RANKING, "rank": range(1, 6)}).to_parquet(
        study_dir / "sensitivity.parquet"
    )
    return space, study_dir


def test_study_rankings_checks_patterns_against_the_layers(tmp_path: Path) -> None:
    from sweeper.sensitivity import study_rankings

    def rankings(block: str) -> dict:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        space, study_dir = _study_with_ranking(folder, block)
        return study_rankings(space, None, study_dir, {}, lambda *a: None)

    ok = rankings("onnxruntime_static_int8: {exclude: {top_k: 2, always: ['conv*']}}")
    assert ok == {"onnxruntime_static_int8": RANKING}
    with pytest.raises(ConfigError) as info:
        rankings("onnxruntime_static_int8: {exclude: {top_k: 1, always: ['/_conv_stem/*']}}")
    message = str(info.value)
    assert "space.yaml" in message and "backends.onnxruntime_static_int8.exclude.always" in message
    assert "'/_conv_stem/*' matches no layer" in message and "conv1, fc2" in message
    with pytest.raises(ConfigError, match="match both 'always' and 'never'"):
        rankings("onnxruntime_static_int8: {exclude: {top_k: 1, always: ['conv*'], never: ['conv1']}}")
    with pytest.raises(ConfigError, match="has 2 quantizable layers .* besides the 3"):
        rankings("onnxruntime_static_int8: {exclude: {top_k: 3, always: ['conv3'], never: ['fc*']}}")


def test_top_k_stops_one_short_of_every_layer() -> None:
    # Leaving all 5 layers in float would be the FP32 model: k = 5 (or more) excludes 4.
    from sweeper.exclusion import ExclusionSearch

    trial = optuna.create_study().ask()
    layers = suggest_excluded(trial, "b", ExclusionSearch(top_k=Fixed(5), per_layer=0), RANKING)
    assert layers == tuple(RANKING[:4])


def test_a_configuration_excluding_every_layer_is_refused_as_the_float_form() -> None:
    from types import SimpleNamespace

    from sweeper.study import _refuse_float_form

    run = SimpleNamespace(rankings={"onnxruntime_static_int8": ["a", "b"]})
    _refuse_float_form(run, "onnxruntime_static_int8", {"nodes_to_exclude": ["a"]})  # INT8 with one in float
    with pytest.raises(ConfigError, match="excludes all 2 quantizable layers.*float form"):
        _refuse_float_form(run, "onnxruntime_static_int8", {"nodes_to_exclude": ["b", "a"]})
    _refuse_float_form(run, "onnxruntime_fp32", {})  # no exclusion field: nothing to refuse
