"""No configuration built twice: measured configurations by canonical key, and repeats answered.

A configuration's key is its backend and its validated config's values (JSON, keys sorted, the
excluded layers as a sorted set), so two proposals that build the same candidate share a key
whatever their Optuna parameters. The driver builds a key once; a repeat proposal is told the
stored outcome (or, while the first is still running, waits for it) and writes no row, so the
trial budget counts distinct configurations. When the sampler keeps proposing measured
configurations, the next proposals are drawn at random; when even those only repeat, the space
is taken as exhausted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from sweeper.backends import get_backend
from sweeper.errors import ConfigError
from sweeper.spec import REJECTED

# After this many repeats in a row the next proposals come from a random sampler.
RANDOM_AFTER_REPEATS = 3
# After this many repeats in a row (random draws included) the space is taken as exhausted.
EXHAUSTED_AFTER_REPEATS = 60


def config_key(backend: str, config: BaseModel) -> str:
    """The canonical key of a configuration: the backend and its config's values."""
    values = config.model_dump(mode="json")
    field_name = get_backend(backend).exclusion_field
    if field_name is not None and field_name in values:
        values[field_name] = sorted(values[field_name] or ())
    return json.dumps({"backend": backend, "config": values}, sort_keys=True)


def rejected_key(backend: str, params: dict[str, Any]) -> str:
    """The key of a proposal its backend rejects (no config to normalise): backend and parameters."""
    return json.dumps({"backend": backend, "params": params}, sort_keys=True, default=str)


def row_key(row: dict[str, Any]) -> str | None:
    """The key of a row's configuration, or ``None`` when the row has none (an interrupted trial)."""
    if not row.get("params_json") or not row.get("backend"):
        return None
    try:
        backend = row["backend"]
        return config_key(backend, get_backend(backend).config(json.loads(row["params_json"])))
    except (ConfigError, ValueError):
        return None


@dataclass
class Measured:
    """The configurations of a study: measured (their rows) and in flight (trials waiting on them)."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiting: dict[str, list[Any]] = field(default_factory=dict)
    # Rows of configurations their backend rejected, by backend and parameters.
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    streak: int = 0
    repeats: int = 0

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], counts: Any) -> Measured:
        """What a (resumed) study measured already: its rows that ``counts`` toward the budget."""
        measured = cls()
        for row in rows:
            key = row_key(row)
            if key is not None and counts(row):
                measured.rows[key] = row
            elif row["state"] == "failed" and row.get("params_json") and (row.get("error") or "").startswith(REJECTED):
                measured.rejected[rejected_key(row["backend"], json.loads(row["params_json"]))] = row
        return measured

    @property
    def random_next(self) -> bool:
        return self.streak >= RANDOM_AFTER_REPEATS

    @property
    def exhausted(self) -> bool:
        return self.streak >= EXHAUSTED_AFTER_REPEATS

    def known(self, key: str) -> bool:
        return key in self.rows or key in self.waiting

    def repeat(self, key: str, trial: Any) -> dict[str, Any] | None:
        """Note a repeat proposal: the stored row to tell it, or ``None`` when it must wait."""
        self.streak += 1
        self.repeats += 1
        if key in self.rows:
            return self.rows[key]
        self.waiting[key].append(trial)
        return None

    def started(self, key: str) -> None:
        self.streak = 0
        self.waiting[key] = []

    def finished(self, key: str, row: dict[str, Any]) -> list[Any]:
        """Store a finished configuration's row; return the trials that waited for it."""
        self.rows[key] = row
        return self.waiting.pop(key, [])
