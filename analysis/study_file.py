"""A study DB that does not exist yet is built in a temporary file beside it and renamed into place (issue 21).

Why: the study DB is in WAL mode (study_db.py), so a first ingest of a million requests wrote every page
twice, into the WAL and again at the checkpoint, and synced both. A brand-new study has nothing to protect
while it is built: the file ``.NAME.PID.building`` in the study DB's folder is written with an in-memory
rollback journal (statements and savepoints still roll back; nothing is journaled on disk) and no syncs,
then switched to WAL, synced once, and renamed over the study DB's path (``os.replace``: atomic).

Safe at every kill point: before the rename there is no study DB at the path (as before the ingest), after
it the whole ingest is there. A failed ingest removes its temporary file; one left by a killed process is
removed by the next build of the same study DB (its process id no longer runs). Never over a study DB that
another process created at the path meanwhile (a hard link, which fails where the name exists): ``Appeared``
is raised instead, and the caller ingests into that one as into any existing study DB.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from llmwatts.analysis import study_db as schema


class Appeared(Exception):
    """A study DB was created at the path by another process while this one was being built."""


def is_new(study_db) -> bool:
    """Whether ``study_db`` is a path, in a folder that exists, where no study DB (nor a WAL file of one) exists
    yet."""
    if isinstance(study_db, sqlite_utils.Database):
        return False
    path = Path(study_db)
    return path.parent.is_dir() and not any(Path(f"{path}{suffix}").exists() for suffix in ("", "-wal", "-journal"))


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.building")


def _remove(path: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove temporary files of earlier builds of ``path`` whose process no longer runs (killed)."""
    for leftover in path.parent.glob(f".{path.name}.*.building"):
        pid = leftover.name[len(path.name) + 2:-len(".building")]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            _remove(leftover)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(temp: Path, path: Path) -> None:
    """``temp`` becomes ``path`` atomically, never over a file there (``Appeared``)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise Appeared(str(path)) from None
    except OSError:  # a filesystem without hard links: rename, after a last look
        if path.exists():
            raise Appeared(str(path)) from None
        os.replace(temp, path)
        return
    temp.unlink()


@contextmanager
def building(path: str | os.PathLike):
    """Yield an open study DB (study_db.open_study_db) in a temporary file; when the block ends without an
    exception the file becomes the study DB at ``path`` (WAL mode, synced, linked into place atomically). On an
    exception (``Appeared`` among them) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    remove_stale(path)
    temp = _temp_path(path, os.getpid())
    _remove(temp)
    db = schema.open_study_db(temp, build=True)
    try:
        yield db
        db.conn.commit()
        db.execute("PRAGMA journal_mode = WAL")  # in the file's header: the study DB opens in WAL as ever
        db.close()
        _fsync(temp)
        _place(temp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        db.close()
        _remove(temp)
        raise
