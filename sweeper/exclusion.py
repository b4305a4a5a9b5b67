"""Layer exclusion as a searched dimension.

A backend that can leave layers in float names the config field that lists them
(``Backend.exclusion_field``). In a space file its block may carry an ``exclude`` key::

    onnxruntime_static_int8:
      calibration_method: [minmax, entropy]
      exclude:
        top_k: {low: 0, high: 6}   # leave the k most sensitive layers in float, k searched
        per_layer: 4               # and/or switch each of the 4 most sensitive on or off
        always: ["/_conv_stem/*"]  # layers always left in float (glob patterns on layer names)
        never: ["/_fc/*"]          # layers never left in float

Sensitivity (:mod:`sweeper.sensitivity`, ``study_rankings``) ranks the layers once per study; a trial's excluded
layers are the ``always`` layers, the top ``k`` of the ranking without the pinned (``always`` and
``never``) layers, and the per-layer picks, in ranking order. The same layer names appear in the
sensitivity table, the config and the rows (``excluded_layers``). A layer is a backend's
exclusion unit: for the ONNX backends the weight node's name stands for the layer, its
activation and its Q/DQ nodes (:mod:`sweeper.backends.onnx.layers`). Patterns are
:func:`fnmatch.fnmatchcase` patterns (``*`` also matches ``/``), checked against the ranking
when the sweep starts: one that matches no layer is a :class:`~sweeper.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sweeper.backends import BACKENDS, get_backend
from sweeper.errors import ConfigError
from sweeper.params import Choices, Fixed, Range


class _ExcludeBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    top_k: int | list[int] | dict[str, int | bool] = 0
    per_layer: int = Field(default=0, ge=0, le=12)
    always: list[str] = Field(default_factory=list)
    never: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class ExclusionSearch:
    """How a backend's excluded layers are searched."""

    top_k: Fixed | Choices | Range
    per_layer: int
    always: tuple[str, ...] = ()
    never: tuple[str, ...] = ()

    @property
    def max_top_k(self) -> int:
        if isinstance(self.top_k, Fixed):
            return int(self.top_k.value)
        if isinstance(self.top_k, Choices):
            return int(max(self.top_k.values))
        return int(self.top_k.high)

    @property
    def candidates(self) -> int:
        """How many of the most sensitive unpinned layers a trial may exclude."""
        return max(self.max_top_k, self.per_layer)

    def pinned(self, ranking: list[str]) -> tuple[set[str], set[str]]:
        """The layers of ``ranking`` that ``always`` and ``never`` match."""
        return _matching(self.always, ranking), _matching(self.never, ranking)

    def free(self, ranking: list[str]) -> list[str]:
        """``ranking`` without the pinned layers: what ``top_k`` and ``per_layer`` pick from."""
        always, never = self.pinned(ranking)
        return [layer for layer in ranking if layer not in always and layer not in never]


def parse_exclusion(path: Path, backend: str, raw: Any) -> ExclusionSearch:
    """Validate a backend block's ``exclude`` key."""
    where = f"{path}: key 'backends.{backend}.exclude'"
    if get_backend(backend).exclusion_field is None:
        able = [n for n in BACKENDS if _can_exclude(n)]
        raise ConfigError(
            f"{where}: backend '{backend}' cannot leave layers in float; backends that can: {', '.join(able)}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with top_k, per_layer, always or never, got {raw!r}")
    try:
        block = _ExcludeBlock.model_validate(raw)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"{where}: {detail}. Allowed keys: top_k (an int, a list, or {{low, high}}), per_layer (0..12), "
            "always and never (lists of layer name patterns)"
        ) from None
    top_k = _top_k(where, block.top_k)
    for key in ("always", "never"):
        if any(not pattern for pattern in getattr(block, key)):
            raise ConfigError(
                f"{path}: key 'backends.{backend}.exclude.{key}': patterns must be non-empty strings, "
                f"got {getattr(block, key)!r}"
            )
    search = ExclusionSearch(
        top_k=top_k, per_layer=block.per_layer, always=tuple(block.always), never=tuple(block.never)
    )
    if search.candidates == 0 and not search.always:
        raise ConfigError(f"{where}: excludes nothing; give top_k above 0, per_layer above 0 or always")
    return search


def _matching(patterns: tuple[str, ...], layers: list[str]) -> set[str]:
    return {layer for layer in layers if any(fnmatchcase(layer, p) for p in patterns)}


def check_patterns(path: Path, backend: str, search: ExclusionSearch, ranking: list[str]) -> None:
    """Check ``always``/``never`` of ``backend``'s block in space file ``path`` against ``ranking``.

    Raises:
        ConfigError: for a pattern that matches no layer, or a layer both patterns match.
    """
    shown = ", ".join(ranking[:8]) + (f" ... ({len(ranking)} layers)" if len(ranking) > 8 else "")
    for key in ("always", "never"):
        for pattern in getattr(search, key):
            if not _matching((pattern,), ranking):
                raise ConfigError(
                    f"{path}: key 'backends.{backend}.exclude.{key}': pattern {pattern!r} matches no layer. "
                    f"Layers (glob patterns, '*' matches '/' too): {shown or 'none'}"
                )
    always, never = search.pinned(ranking)
    both = sorted(always & never)
    if both:
        raise ConfigError(
            f"{path}: key 'backends.{backend}.exclude': layers {both} match both 'always' and 'never'; "
            "make the patterns disjoint"
        )


def _can_exclude(name: str) -> bool:
    try:
        return get_backend(name).exclusion_field is not None
    except ImportError:
        return False


def _top_k(where: str, value: Any) -> Fixed | Choices | Range:
    if isinstance(value, int):
        values = [value]
        result: Fixed | Choices | Range = Fixed(value)
    elif isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}.top_k: choices must be a non-empty list")
        values = value
        result = Choices(tuple(value))
    else:
        if set(value) != {"low", "high"}:
            raise ConfigError(f"{where}.top_k: a range is {{low: K1, high: K2}}, got keys {sorted(value)}")
        low, high = value["low"], value["high"]
        if low >= high:
            raise ConfigError(f"{where}.top_k: low ({low}) must be smaller than high ({high})")
        values = [low, high]
        result = Range(low=low, high=high, integer=True)
    if any(isinstance(v, bool) or v < 0 for v in values):
        raise ConfigError(f"{where}.top_k: layer counts must be integers >= 0, got {value!r}")
    return result


def suggest_excluded(trial: Any, backend: str, search: ExclusionSearch, ranking: list[str]) -> tuple[str, ...]:
    """Ask ``trial`` which layers to leave in float, from the sensitivity ``ranking`` (most first)."""
    always, _ = search.pinned(ranking)
    free = search.free(ranking)
    label = f"{backend}.exclude_top_k"
    top_k = search.top_k
    if isinstance(top_k, Fixed):
        k = int(top_k.value)
    elif isinstance(top_k, Choices):
        k = int(trial.suggest_categorical(label, list(top_k.values)))
    else:
        k = trial.suggest_int(label, int(top_k.low), int(top_k.high))
    # Leaving every layer in float is the FP32 model, not an INT8 one: k stops one short of that.
    chosen = always | set(free[: min(k, max(0, len(ranking) - len(always) - 1))])
    for layer in free[: search.per_layer]:
        if trial.suggest_categorical(f"{backend}.exclude.{layer}", [False, True]):
            chosen.add(layer)
    return tuple(layer for layer in ranking if layer in chosen)


def warm_start_ladder(backend: str, search: ExclusionSearch) -> list[dict[str, Any]]:
    """Trials to enqueue first: no exclusion, then the top 1, 2, 4, ... most sensitive layers."""
    if not isinstance(search.top_k, Range):
        return []
    ladder, k = [int(search.top_k.low)], 1
    while k <= search.top_k.high:
        if k > search.top_k.low:
            ladder.append(k)
        k *= 2
    return [{"backend": backend, f"{backend}.exclude_top_k": k} for k in dict.fromkeys(ladder)]


def revert_step(search: ExclusionSearch, tried: dict[int, bool], pending: set[int]) -> int | None:
    """The next ``top_k`` of the "revert until feasible" search, or ``None`` when it is done.

    NNCF's accuracy control reverts the most sensitive layer to float, re-evaluates, and repeats
    until the model is within budget: one evaluation per reverted layer. On a ranking this is the
    smallest feasible ``k``, which a bisection finds in ``log2(high)`` trials: between the largest
    ``k`` known to miss the budget and the smallest known to meet it, try the middle. With no
    feasible ``k`` yet, it tries ``high`` (every layer the search may revert).

    Args:
        search: the backend's exclusion search (a ``top_k`` range; anything else: ``None``).
        tried: ``k`` -> whether any trial with that ``k`` was feasible.
        pending: the ``k`` of trials still running; a step that would repeat one waits for it.
    """
    if not isinstance(search.top_k, Range):
        return None
    high = int(search.top_k.high)
    feasible = [k for k, ok in tried.items() if ok]
    if not feasible:
        step = high
    else:
        smallest = min(feasible)
        missed = [k for k, ok in tried.items() if not ok and k < smallest]
        largest_missed = max(missed) if missed else int(search.top_k.low) - 1
        if smallest - largest_missed <= 1:
            return None
        step = (smallest + largest_missed) // 2
    return None if step in tried or step in pending else step


def revert_trials(trials: Iterable[Any], rows: Iterable[dict[str, Any]],
                  exclusions: dict[str, ExclusionSearch]) -> list[dict[str, Any]]:
    """Trials to enqueue for the next "revert until feasible" step of each backend (see
    :func:`revert_step`), once the queue is empty (the ladder of :func:`warm_start_ladder` ran).

    Args:
        trials: the Optuna study's trials (``number``, ``state``, ``params``).
        rows: the study's rows (``trial_number``, ``state``, ``feasible``, ``accuracy_drop``).
        exclusions: the space's exclusion searches by backend.

    Each step copies the parameters of the trial it refines and changes only ``k``: the feasible
    trial with the smallest ``k``; with none feasible yet, the complete trial that came closest to
    the budget (else the one with the largest ``k``).
    """
    trials = list(trials)
    if any(t.state.name == "WAITING" for t in trials):
        return []
    rows = [r for r in rows if r.get("state") in ("complete", "pruned")]
    feasible = {r["trial_number"]: bool(r["feasible"]) for r in rows}
    drops = {r["trial_number"]: r["accuracy_drop"] for r in rows if r["state"] == "complete"}
    steps = []
    for backend, search in exclusions.items():
        label = f"{backend}.exclude_top_k"
        tried: dict[int, bool] = {}
        pending: set[int] = set()
        finished = []
        for t in trials:
            k = t.params.get(label)
            if k is None:
                continue
            if t.state.name == "RUNNING":
                pending.add(k)
            elif t.number in feasible:
                tried[k] = tried.get(k, False) or feasible[t.number]
                finished.append(t)
        step = revert_step(search, tried, pending)
        if step is None or not finished:
            continue
        if any(tried.values()):
            smallest = min(k for k, ok in tried.items() if ok)
            base = next(t for t in finished if feasible[t.number] and t.params[label] == smallest)
        elif any(t.number in drops for t in finished):
            base = min((t for t in finished if t.number in drops), key=lambda t: drops[t.number])
        else:
            base = max(finished, key=lambda t: t.params[label])
        steps.append({**base.params, label: step})
    return steps


def check_against_ranking(path: Path, backend: str, search: ExclusionSearch, ranked: list[str]) -> None:
    """Check ``backend``'s exclusion block in space file ``path`` against the model's ``ranked`` layers.

    Raises:
        ConfigError: when ``top_k`` or ``per_layer`` asks for more layers than the model has (besides
            the pinned ones), or an ``always``/``never`` pattern matches no layer.
    """
    where = f"{path}: key 'backends.{backend}.exclude'"
    check_patterns(path, backend, search, ranked)
    free = len(search.free(ranked))
    if search.candidates > free:
        pinned = len(ranked) - free
        besides = f" besides the {pinned} that always/never pin" if pinned else ""
        raise ConfigError(
            f"{where}: asks for up to {search.candidates} layers, but the model has {free} quantizable layers "
            f"for '{backend}'{besides}; allowed: 0..{free}"
        )
