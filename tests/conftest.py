"""Test-wide settings.

Ray token authentication stays on in tests, as everywhere: the session gets its own random token
through RAY_AUTH_TOKEN (so no test reads or writes ~/.ray/auth_token), and RAY_AUTH_MODE=token is
set explicitly before any Ray process starts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits_task_path() -> Path:
    return ROOT / "tasks" / "digits_cnn.py"
