"""The project's error types.

Every error a user can cause by bad input is a :class:`SweeperInputError`: the CLI prints its
message as one paragraph and exits with code 2, without a traceback unless ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SweeperError(Exception):
    """Base class of the project's errors."""


class SweeperInputError(SweeperError):
    """Bad input from the user: a search space, a task, a CLI option, an output folder."""


class ConfigError(SweeperInputError):
    """A configuration value is wrong; the message names where, what, and what is allowed."""


class TaskError(SweeperInputError):
    """A task cannot be found, loaded or used."""


class SensitivityError(SweeperInputError):
    """A task's layers cannot be listed for a backend's sensitivity ranking (the model does not
    load or export, the Ray task was lost); the message names the task, the backend and why."""


class BackendUnavailableError(SweeperError):
    """A backend cannot run here (a missing optional dependency or hardware)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """Return a ``did you mean 'x'?`` hint for ``name`` among ``known``, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
