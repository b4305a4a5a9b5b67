"""Turning an Optuna trial into a backend and its validated config (define-by-run)."""

from __future__ import annotations

from typing import Any

from sweeper.backends import get_backend
from sweeper.exclusion import suggest_excluded
from sweeper.params import Choices, Fixed, decode_choice, encode_choice
from sweeper.space import Space


def suggest(
    trial: Any, space: Space, rankings: dict[str, list[str]] | None = None
) -> tuple[str, dict[str, Any]]:
    """Ask ``trial`` (an ``optuna.trial.Trial``) for a backend and its parameters, define-by-run.

    Parameters are named ``<backend>.<field>`` so each backend's distributions stay separate.
    Fixed values are not suggested; they are filled in here. For a backend with an ``exclude``
    block, ``rankings[backend]`` (layers, most sensitive first) turns the suggested exclusion into
    the backend's exclusion field.
    """
    names = list(space.backends)
    backend = trial.suggest_categorical("backend", names)
    params: dict[str, Any] = {}
    for key, param in space.backends[backend].items():
        label = f"{backend}.{key}"
        if isinstance(param, Fixed):
            params[key] = param.value
        elif isinstance(param, Choices):
            params[key] = decode_choice(trial.suggest_categorical(label, [encode_choice(v) for v in param.values]))
        elif param.integer:
            params[key] = trial.suggest_int(
                label, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
            )
        else:
            params[key] = trial.suggest_float(
                label, float(param.low), float(param.high), step=param.step, log=param.log
            )
    exclusion = space.exclusions.get(backend)
    if exclusion is not None:
        if rankings is None or backend not in rankings:
            raise ValueError(f"backend '{backend}' searches layer exclusion but no sensitivity ranking was given")
        field = get_backend(backend).exclusion_field
        assert field is not None  # the space accepts an exclude block only for such a backend
        params[field] = suggest_excluded(trial, backend, exclusion, rankings[backend])
    return backend, params
