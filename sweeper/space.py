"""Search-space files: parse them and validate them against the backends' configs.

A space file is YAML::

    task: digits_cnn
    trials: 20
    objective: latency_ms_p50          # minimised
    constraint: {max_drop: 1.0, mode: absolute}
    hardware: {kind: cpu, num_cpus: 1}      # or several named targets under 'targets'
    trial_timeout_s: 600                   # a trial still running then is cancelled
    backends:
      onnxruntime_fp32: {}                          # every field at its default
      onnxruntime_static_int8:
        calibration_method: [minmax, entropy]      # a list: choose one of these
        calibration_samples: {low: 32, high: 256, log: true}   # a range (int or float by field)
        per_channel: true                           # a scalar: fixed
        nodes_to_exclude: {value: []}               # a list-valued field fixed to a list

Everything is checked before any trial starts; an error names the file, the key and what is
allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from sweeper.backends import get_backend
from sweeper.errors import ConfigError, did_you_mean
from sweeper.exclusion import ExclusionSearch, parse_exclusion
from sweeper.params import Param, parse_backend_params
from sweeper.spec import ConfirmSettings, MeasureSettings
from sweeper.task import Task

Objective = Literal["latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean", "size_bytes"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constraint(_Strict):
    """The accuracy budget: ``max_drop`` in the metric's units (``absolute``) or in percent of the
    FP32 metric (``relative``, so at most 100). An absolute budget on a percentage metric is at
    most 100 points too; :func:`check_constraint` checks that against the task.
    """

    max_drop: float = Field(ge=0, allow_inf_nan=False, description="largest accuracy drop allowed")
    mode: Literal["absolute", "relative"] = "absolute"

    @model_validator(mode="after")
    def _relative_at_most_100(self) -> Constraint:
        if self.mode == "relative" and self.max_drop > 100:
            raise ValueError(
                f"max_drop {self.max_drop:g} with mode 'relative' is in percent of the FP32 metric, "
                "so it is at most 100; allowed: 0..100"
            )
        return self


class HardwareTarget(_Strict):
    """A kind of node trials run on, and what each trial reserves there.

    ``num_cpus`` is also the number of threads a trial uses, so latency is measured with the
    cores its Ray task holds. ``resources`` are Ray custom resources a node must offer;
    ``labels`` are Ray node labels it must carry (a label selector).
    """

    kind: Literal["cpu", "gpu"] = Field(default="cpu", validation_alias=AliasChoices("kind", "target"))
    num_cpus: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpus_for_gpu_kind(self) -> HardwareTarget:
        if self.kind == "gpu" and self.num_gpus <= 0:
            raise ValueError("a target of kind 'gpu' needs num_gpus > 0")
        if self.kind == "cpu" and self.num_gpus > 0:
            raise ValueError("a target of kind 'cpu' reserves no GPU: set num_gpus to 0 or kind to 'gpu'")
        for name, amount in self.resources.items():
            if amount <= 0:
                raise ValueError(f"resource '{name}' must be a positive amount, got {amount}")
        return self

    def ray_options(self) -> dict[str, Any]:
        """The Ray task options that place a trial on this target."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options


class EarlyStop(_Strict):
    """Cheap-first evaluation: score a share of the evaluation split first, prune hopeless trials.

    A trial first scores a seeded random share (``fraction``) of the evaluation split, stratified
    by label. For a top-1 task it is pruned (recorded with that subset's figures, never timed) only
    when an exact one-sided bound on its discordant predictions says the whole split's drop exceeds
    the constraint's ``max_drop`` with ``confidence``: a candidate at the limit is pruned at most
    ``1 - confidence`` of the time. For any other metric the subset's drop is compared with
    ``max_drop`` plus ``margin`` (same units).
    """

    fraction: float = Field(default=0.25, gt=0, lt=1)
    margin: float = Field(default=2.0, ge=0)
    confidence: float = Field(default=0.95, ge=0.5, lt=1)


class SpaceFile(_Strict):
    """A search-space file as written, validated key by key (:class:`Space` wraps it)."""

    task: str
    study: str | None = None
    trials: int = Field(default=20, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    seed: int | None = None
    objective: Objective = "latency_ms_p50"
    constraint: Constraint
    hardware: HardwareTarget | None = None
    targets: dict[str, HardwareTarget] | None = None
    trial_timeout_s: float | None = Field(default=None, gt=0)
    measure: MeasureSettings = MeasureSettings()
    early_stop: EarlyStop | None = None
    confirm: ConfirmSettings = ConfirmSettings()
    backends: dict[str, dict[str, Any] | None] = Field(min_length=1)




@dataclass(frozen=True)
class Space:
    """A validated search space: the file's model (:class:`SpaceFile`), and what is worked out from
    it against the backends: the targets, each backend's parameters, target and exclusion search."""

    path: Path
    file: SpaceFile
    targets: dict[str, HardwareTarget]
    backends: dict[str, dict[str, Param]]
    backend_targets: dict[str, str]
    exclusions: dict[str, ExclusionSearch]
    # The space as YAML text (the file's, or a dict's dump), kept in study.json.
    text: str = ""

    @property
    def task(self) -> str:
        return self.file.task

    @property
    def study(self) -> str:
        return self.file.study or self.path.stem

    @property
    def trials(self) -> int:
        return self.file.trials

    @property
    def max_concurrent(self) -> int | None:
        return self.file.max_concurrent

    @property
    def seed(self) -> int | None:
        return self.file.seed

    @property
    def objective(self) -> Objective:
        return self.file.objective

    @property
    def constraint(self) -> Constraint:
        return self.file.constraint

    @property
    def trial_timeout_s(self) -> float | None:
        return self.file.trial_timeout_s

    @property
    def measure(self) -> MeasureSettings:
        return self.file.measure

    @property
    def early_stop(self) -> EarlyStop | None:
        return self.file.early_stop

    @property
    def confirm(self) -> ConfirmSettings:
        return self.file.confirm

    def target_of(self, backend: str) -> HardwareTarget:
        """The target the backend's trials run on."""
        return self.targets[self.backend_targets[backend]]


# What a space given as a dict is called in messages (and its default study name).
DICT_SPACE = Path("space")


def load_space(source: str | Path | Mapping[str, Any]) -> Space:
    """Read and validate a search-space file, or a space given as a dict (the same keys).

    A dict space is named ``space`` in messages; its task names are looked up from the current
    folder, as for a file there.

    Raises:
        ConfigError: naming the file, the key, and what is allowed.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
        return parse_space(raw, DICT_SPACE, yaml.safe_dump(raw, sort_keys=False))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"search space file '{path}' does not exist")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{path}: key '{exc.key}' is given twice, at line {exc.first} and line {exc.second}; "
            "YAML would keep only the last value, so remove one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_space(raw, path, text)


def parse_space(raw: Any, path: Path, text: str) -> Space:
    """Validate a space's parsed YAML (``raw``); ``path`` names it in messages.

    Raises:
        ConfigError: naming the file, the key, and what is allowed.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys such as task, constraint, backends")
    try:
        file = SpaceFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc, SpaceFile)) from None
    for key, problem in file.confirm.problems(file.measure):
        raise ConfigError(f"{path}: key '{key}': {problem}")
    if file.hardware is not None and file.targets is not None:
        raise ConfigError(f"{path}: give either 'hardware' (one target) or 'targets' (several), not both")
    targets = file.targets if file.targets is not None else {"default": file.hardware or HardwareTarget()}
    if not targets:
        raise ConfigError(f"{path}: key 'targets' must name at least one target")
    backends: dict[str, dict[str, Param]] = {}
    backend_targets: dict[str, str] = {}
    exclusions: dict[str, ExclusionSearch] = {}
    for name, raw_params in file.backends.items():
        params = dict(raw_params or {})
        wanted = params.pop("target", None)
        if "exclude" in params:
            exclusions[name] = _exclusion(path, name, params)
        backends[name] = parse_backend_params(path, name, _config_class(path, name), params)
        backend_targets[name] = _pick_target(path, name, wanted, targets)
    return Space(
        path=path,
        file=file,
        targets=dict(targets),
        backends=backends,
        backend_targets=backend_targets,
        exclusions=exclusions,
        text=text,
    )


def check_constraint(space: Space, task: Task) -> None:
    """Check the accuracy budget against the task's metric: an absolute ``max_drop`` on a
    percentage metric (a ``metric_name`` ending in ``_pct``) is at most 100 points.

    Raises:
        ConfigError: naming the file, the key, the task's metric and the allowed range.
    """
    constraint = space.constraint
    if constraint.mode == "absolute" and task.metric_name.endswith("_pct") and constraint.max_drop > 100:
        raise ConfigError(
            f"{space.path}: key 'constraint.max_drop': {constraint.max_drop:g} points, but task '{task.name}' "
            f"reports {task.metric_name}, a percentage, which cannot drop by more than 100 points; "
            "allowed: 0..100 (or mode: relative, in percent of FP32)"
        )


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a mapping giving the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a '<<' merge may override keys on purpose
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _config_class(path: Path, backend: str) -> type[BaseModel]:
    try:
        return get_backend(backend).Config
    except ConfigError as exc:
        raise ConfigError(f"{path}: key 'backends.{backend}': {exc}") from None


def _exclusion(path: Path, backend: str, params: dict[str, Any]) -> ExclusionSearch:
    search = parse_exclusion(path, backend, params.pop("exclude"))
    field = get_backend(backend).exclusion_field
    if field in params:
        raise ConfigError(
            f"{path}: key 'backends.{backend}.{field}': give either '{field}' (a fixed list) or 'exclude' "
            "(searched from the sensitivity ranking), not both"
        )
    return search


def _pick_target(path: Path, backend: str, wanted: Any, targets: dict[str, HardwareTarget]) -> str:
    """The target a backend runs on: the one its block names, else the first of a kind it supports."""
    hardware = get_backend(backend).hardware
    if wanted is not None:
        if wanted not in targets:
            raise ConfigError(
                f"{path}: key 'backends.{backend}.target': unknown target {wanted!r}."
                f"{did_you_mean(str(wanted), targets)} "
                f"Targets: {', '.join(targets)}"
            )
        if targets[wanted].kind not in hardware:
            raise ConfigError(
                f"{path}: key 'backends.{backend}.target': '{backend}' runs on {', '.join(sorted(hardware))}, "
                f"but target '{wanted}' is of kind '{targets[wanted].kind}'"
            )
        return str(wanted)
    for name, target in targets.items():
        if target.kind in hardware:
            return name
    kinds = ", ".join(sorted({t.kind for t in targets.values()}))
    raise ConfigError(
        f"{path}: key 'backends.{backend}': '{backend}' runs on {', '.join(sorted(hardware))}, but the space "
        f"declares only targets of kind {kinds}; add a target of kind {' or '.join(sorted(hardware))} "
        "or remove the backend"
    )


def _explain(path: Path, exc: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = prefix + ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None:
            allowed = _allowed_keys(model, err["loc"])
            msg = f"unknown key.{did_you_mean(str(err['loc'][-1]), allowed)} Allowed keys: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(
            f"{path}: key '{key}': {msg} (got {err.get('input')!r})"
            if err["type"] not in ("missing", "extra_forbidden")
            else f"{path}: key '{key}': {msg}"
        )
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return list(model.model_fields)
