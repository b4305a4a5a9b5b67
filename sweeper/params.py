"""The parameters of a search space: fixed values, choices and ranges, checked against a config.

A backend's block in a space file maps each config field to a scalar (fixed), a list (choices),
``{value: [...]}`` (a list-valued field fixed), ``{choices: [...]}`` or ``{low, high, log, step}``
(an int or float range). Each value is validated against the field's own type and constraints.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from sweeper.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Fixed:
    value: Any


@dataclass(frozen=True)
class Choices:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = None
    integer: bool = False


Param = Fixed | Choices | Range


def parse_backend_params(path: Path, name: str, config_cls: type[BaseModel], raw: dict[str, Any]) -> dict[str, Param]:
    """Validate backend ``name``'s block ``raw`` of space file ``path`` against its ``config_cls``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: key 'backends.{name}' must be a mapping of parameter names to values")
    fields = config_cls.model_fields
    params: dict[str, Param] = {}
    for key, value in raw.items():
        where = _Where(f"{path}: key 'backends.{name}.{key}")
        if key not in fields:
            raise ConfigError(
                f"{where}: '{name}' has no parameter '{key}'.{did_you_mean(key, fields)} "
                f"Its parameters: {', '.join(fields)}"
            )
        params[key] = _parse_param(where, value, fields[key])
    return params


class _Where(str):
    """Where a value sits, as ``FILE: key 'a.b.c'``; ``where.sub("low")`` names a sub-key."""

    prefix: str

    def __new__(cls, prefix: str) -> _Where:
        self = super().__new__(cls, prefix + "'")
        self.prefix = prefix
        return self

    def sub(self, key: str) -> _Where:
        return _Where(f"{self.prefix}.{key}")


def _field_adapter(field: Any) -> TypeAdapter:
    annotation = field.annotation
    if field.metadata:
        annotation = typing.Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation)


def _check_value(where: _Where, adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value, strict=True)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"{where}: {value!r} is not allowed: {msg}") from None


def _is_sequence_field(field: Any) -> bool:
    origin = typing.get_origin(field.annotation)
    return origin in (tuple, list)


def _is_integer_field(field: Any) -> bool | None:
    """True for int fields, False for float fields, None for anything else."""
    if field.annotation is int:
        return True
    if field.annotation is float:
        return False
    return None


def _parse_param(where: _Where, value: Any, field: Any) -> Param:
    adapter = _field_adapter(field)
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"value"}:
            return Fixed(_check_value(where, adapter, _tuple(value["value"], field)))
        if keys == {"choices"}:
            return _choices(where, adapter, value["choices"], field)
        if keys and keys <= {"low", "high", "log", "step"} and {"low", "high"} <= keys:
            return _range(where, adapter, value, field)
        raise ConfigError(
            f"{where}: a parameter is a scalar (fixed), a list (choices), {{value: ...}}, "
            f"{{choices: [...]}} or {{low: ..., high: ..., log: bool, step: ...}}; got keys {sorted(keys)}"
        )
    if isinstance(value, list) and not _is_sequence_field(field):
        return _choices(where, adapter, value, field)
    return Fixed(_check_value(where, adapter, _tuple(value, field)))


def _tuple(value: Any, field: Any) -> Any:
    return tuple(value) if isinstance(value, list) and _is_sequence_field(field) else value


def _choices(where: _Where, adapter: TypeAdapter, values: Any, field: Any) -> Choices:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: choices must be a non-empty list, got {values!r}")
    checked = tuple(_check_value(where, adapter, _tuple(v, field)) for v in values)
    if len(set(map(encode_choice, checked))) != len(checked):
        raise ConfigError(f"{where}: choices contain duplicates: {values!r}")
    return Choices(checked)


def _range(where: _Where, adapter: TypeAdapter, spec: dict[str, Any], field: Any) -> Range:
    integer = _is_integer_field(field)
    if integer is None:
        raise ConfigError(f"{where}: a range needs an int or float parameter; give a list of choices instead")
    low, high = spec["low"], spec["high"]
    log, step = spec.get("log", False), spec.get("step")
    for label, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{where.sub(label)}: must be {kind}, got {bound!r}")
        _check_value(where.sub(label), adapter, float(bound) if not integer else bound)
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be smaller than high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where.sub('log')}: must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float) or step <= 0):
        raise ConfigError(f"{where.sub('step')}: must be a positive number, got {step!r}")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be combined")
    return Range(low=low, high=high, log=log, step=step, integer=integer)


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: encode lists and tuples as JSON text."""
    return json.dumps(list(value)) if isinstance(value, tuple | list) else value


def decode_choice(value: Any) -> Any:
    return tuple(json.loads(value)) if isinstance(value, str) and value.startswith("[") else value
