"""The per-machine cache: trained task weights, exported models, calibration results.

``SWEEPER_CACHE_DIR`` overrides the location (default ``~/.cache/sweeper``). Files are written to
a temporary name and renamed, so a reader never sees half a file and two processes that fill the
same entry at once both end with a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the cache root."""
    root = Path(os.environ.get("SWEEPER_CACHE_DIR") or Path.home() / ".cache" / "sweeper")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(**fields: Any) -> str:
    """Return a short stable hash of JSON-serialisable ``fields``."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_file(path: Path, make: Callable[[Path], None]) -> Path:
    """Return ``path``, first calling ``make(tmp)`` to write it atomically if it does not exist."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        make(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; the cache may be shared between users
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path
