"""Where a study lives: a local folder, or a folder on object storage named by a URI.

``--out`` takes a local path or any URI that ``pyarrow.fs`` understands (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``, ``file://``). :func:`location` turns it into a :class:`pathlib.Path`
for a local folder (and ``file://``), or a :class:`RemotePath`: the small part of ``Path``'s
interface the results code uses (``/``, ``exists``, ``read_bytes``, ``write_bytes``, ``glob``,
...) over a ``pyarrow.fs.FileSystem``. Code that writes rows and reads them back works on either.

Object stores have no rename and no "create if absent" through pyarrow: a row is written with one
PUT (readers never see half an object) after a check that no object is at its key. That check
and the write are not one atomic step, so the guarantee "never overwrite a row" rests on the
study having one writer: its driver.

The per-machine cache (:func:`cache_dir`): trained task weights, exported models, calibration
results.

``SWEEPER_CACHE_DIR`` overrides the location (default ``~/.cache/sweeper``). Files are written to
a temporary name and renamed, so a reader never sees half a file and two processes that fill the
same entry at once both end with a whole one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow.fs as pafs

StudyPath = Union[Path, "RemotePath"]


def is_uri(where: str | Path) -> bool:
    """Whether ``where`` is a URI (``scheme://...``) rather than a local path."""
    return isinstance(where, str) and "://" in where


def location(where: str | StudyPath) -> StudyPath:
    """A local :class:`~pathlib.Path`, or a :class:`RemotePath` for an object-store URI.

    Raises:
        ValueError: when pyarrow cannot open the URI's filesystem (unknown scheme, bad URI).
    """
    if isinstance(where, Path | RemotePath):
        return where
    if not is_uri(where):
        return Path(where)
    if where.startswith("file://"):
        return Path(urlsplit(where).path)
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(where)
    parts = urlsplit(where)
    return RemotePath(fs, path.rstrip("/"), f"{parts.scheme}://", parts.query)


class RemotePath:
    """A path on a ``pyarrow.fs.FileSystem``, with the part of ``Path``'s interface results use.

    ``str()`` gives the URI back, with its query (``?endpoint_override=...``), so that a worker
    given the string opens the same filesystem.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, prefix: str, query: str = "") -> None:
        self.fs = fs
        self.path = path
        self.prefix = prefix
        self.query = query

    def _at(self, path: str) -> RemotePath:
        return RemotePath(self.fs, path, self.prefix, self.query)

    def __truediv__(self, part: str) -> RemotePath:
        return self._at(f"{self.path}/{part}")

    def __str__(self) -> str:
        return f"{self.prefix}{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> RemotePath:
        return self._at(str(PurePosixPath(self.path).parent))

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def iterdir(self) -> list[RemotePath]:
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self._at(info.path) for info in infos]

    def glob(self, pattern: str) -> list[RemotePath]:
        """Children (or grandchildren, for ``a/b``) whose names match ``pattern``."""
        head, _, rest = pattern.partition("/")
        matches = [p for p in self.iterdir() if fnmatch.fnmatch(p.name, head)]
        if not rest:
            return sorted(matches, key=str)
        return sorted((q for p in matches for q in p.glob(rest)), key=str)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_file(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.path)

    def remove_tree(self) -> None:
        if self.is_dir():
            self.fs.delete_dir(self.path)


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


# Artifacts up to this size travel home with the result, through Ray's object store.
ARTIFACT_RETURN_LIMIT_BYTES = 2 * 1024**3


def ship_artifact(artifact: Path, destination: str) -> dict[str, Any]:
    """Send a saved artifact (file or folder) where the study keeps it; return the result's fields.

    A remote study folder (a URI) gets it uploaded from here. Otherwise its files go back with
    the result and the driver writes them into its study folder, so the nodes need no folder
    shared with the driver; one larger than :data:`ARTIFACT_RETURN_LIMIT_BYTES` is written here,
    at ``destination``, which must then be shared storage.
    """
    files = [artifact] if artifact.is_file() else sorted(p for p in artifact.rglob("*") if p.is_file())
    relative = {p.relative_to(artifact.parent).as_posix(): p for p in files}
    if is_uri(destination):
        target = location(destination)
        for name, path in relative.items():
            (target / name).write_bytes(path.read_bytes())
        return {"artifact_path": str(target / artifact.name)}
    if sum(p.stat().st_size for p in files) <= ARTIFACT_RETURN_LIMIT_BYTES:
        return {"artifact_name": artifact.name, "artifact_files": {n: p.read_bytes() for n, p in relative.items()}}
    target = Path(destination)
    for name, path in relative.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / name)
    return {"artifact_path": str(target / artifact.name)}
