"""The study folder on the driver's side: prepared once, the Optuna storage beside it, artifacts home.

A study folder is local or on object storage (:mod:`sweeper.location`). The Optuna study needs a
file it can append to and lock, which object storage is not: for a remote study the journal lives
in the local cache (``~/.cache/sweeper/journals/``) and is copied next to the rows after every
trial, so a fresh driver machine can ``--resume`` from the study folder alone. ``--storage`` (an
Optuna RDB URL such as ``postgresql://...`` or ``sqlite:///...``) replaces the journal.

Artifacts come home through Ray's object store: a worker returns its artifact's files with the
result, and the driver writes them under ``STUDY/artifacts/trial-N/``, so a cluster needs no
shared folder (see :func:`write_artifact`).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from sweeper import results
from sweeper.errors import SweeperInputError
from sweeper.location import RemotePath, StudyPath, cache_dir, location

JOURNAL = "study.journal"


def prepare(out: str | Path, study: str, resume: bool) -> StudyPath:
    """Check ``out/study`` for a new study (empty, writable) or for ``--resume`` (a study of ours).

    Raises:
        SweeperInputError: naming what is wrong with the folder and what to do instead.
    """
    try:
        root = location(out)
    except (ValueError, OSError) as exc:
        raise SweeperInputError(f"--out '{out}' cannot be opened: {exc}") from None
    if isinstance(root, Path):
        root = root.expanduser().absolute()  # rows name artifacts by paths that mean the same anywhere
    study_dir = root / study
    if root.exists() and not root.is_dir():
        raise SweeperInputError(f"--out '{out}' is a file; give a folder for the results")
    if resume:
        _check_resumable(study_dir, study)
        return study_dir
    if study_dir.exists() and any(study_dir.iterdir()):
        raise SweeperInputError(
            f"'{study_dir}' already holds a study named '{study}'. Pass --resume to continue it, "
            "or choose another --study name or --out folder."
        )
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        probe = study_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SweeperInputError(
            f"cannot write results to '{study_dir}' ({exc.strerror or exc}); give a writable --out folder"
        ) from None
    return study_dir


def _check_resumable(study_dir: StudyPath, study: str) -> None:
    if not (study_dir / "study.json").is_file():
        raise SweeperInputError(
            f"cannot resume study '{study}': there is no study in '{study_dir}'. "
            "Run without --resume to start it, or give the --out and --study of an existing study."
        )
    info = results.read_study_info(study_dir) or {}
    if info.get("schema_version") not in results.RESUMABLE_SCHEMA_VERSIONS:
        raise SweeperInputError(
            f"'{study_dir}' holds a study of results schema {info.get('schema_version')!r}; this "
            f"sweeper writes schema {results.SCHEMA_VERSION} and cannot resume it. Start a new study."
        )


def remove(study_dir: StudyPath) -> None:
    """Remove a study folder that bad input or an early stop left without a study in it."""
    if isinstance(study_dir, RemotePath):
        study_dir.remove_tree()
    else:
        shutil.rmtree(study_dir, ignore_errors=True)


def journal_path(study_dir: StudyPath) -> Path:
    """The local journal file of a study: in the folder, or in the cache for a remote folder.

    A remote study's journal is fetched from the folder when this machine has none yet.
    """
    if isinstance(study_dir, Path):
        return study_dir / JOURNAL
    key = hashlib.sha256(str(study_dir).encode()).hexdigest()[:16]
    local = cache_dir("journals", key) / JOURNAL
    remote = study_dir / JOURNAL
    if not local.exists() and remote.is_file():
        local.write_bytes(remote.read_bytes())
    return local


def open_storage(study_dir: StudyPath, storage_url: str | None) -> Any:
    """The Optuna storage of a study: the RDB at ``storage_url``, else the journal file."""
    import optuna

    if storage_url:
        try:
            return optuna.storages.RDBStorage(storage_url)
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or an unreachable server
            raise SweeperInputError(
                f"--storage '{storage_url}' cannot be opened: {type(exc).__name__}: {exc}"
            ) from None
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(study_dir))))


def mirror_journal(study_dir: StudyPath, storage_url: str | None) -> None:
    """Copy a remote study's local journal next to its rows (a no-op for local folders and RDBs)."""
    if isinstance(study_dir, RemotePath) and not storage_url:
        (study_dir / JOURNAL).write_bytes(journal_path(study_dir).read_bytes())


def artifact_dir(study_dir: StudyPath, trial_number: int) -> StudyPath:
    return study_dir / "artifacts" / f"trial-{trial_number:06d}"


def write_artifact(study_dir: StudyPath, trial_number: int, name: str, files: dict[str, bytes]) -> str:
    """Write an artifact a worker returned (relative path -> bytes); return the artifact's path.

    ``name`` is the artifact's own name in the folder: a file, or a folder holding ``files``.
    """
    target = artifact_dir(study_dir, trial_number)
    for relative, data in files.items():
        path = target
        for part in relative.split("/"):
            path = path / part
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(target / name)
