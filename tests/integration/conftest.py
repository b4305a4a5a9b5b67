from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAST_MEASURE = """
measure:
  warmup_runs: 3
  min_runs: 20
  min_time_s: 0.05
"""


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A real local Ray instance (2 CPUs), started once and shared by the tests that use it.

    Multi-node tests shut it down to connect to their own cluster; the next test starts it again.
    """
    from sweeper.cluster import connect

    connect(num_cpus=2)
    yield


@pytest.fixture
def write_space(tmp_path: Path):
    def write(body: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(body) + FAST_MEASURE)
        return path

    return write
