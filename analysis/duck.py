"""DuckDB, when installed, as the engine for the one pass over every telemetry sample (samples.py) and the one
pass over every request (request_pass.py, in a child process).

Why (docs/analysis.md, "Ingest"): aggregating 10M SQLite rows into per-second buckets costs SQLite ~1.5 µs a
row on this box (one aggregate function call per column per row) and DuckDB, reading the same file through
its ``sqlite`` extension, ~0.3 µs. The study DB stays SQLite (DuckDB writes the buckets into it); without
DuckDB the same pass runs in SQLite, same numbers, slower. The extension comes from PyPI
(``duckdb-extension-sqlite``, the ``[analysis]`` extra), never downloaded at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from llmwatts import paths

_EXTENSION: list[Path] = []


def _extension() -> Path:
    """The wheel's extension under the name DuckDB derives its entry point from (``sqlite_scanner``): copied
    once into llmwatts' cache dir (one folder per wheel file: its folder name, size and mtime) and reused by
    every process. A per-process temporary copy (34 MB) was never removed, so every report and every
    request-pass or telemetry child left one behind in the temp dir until the disk filled."""
    if not _EXTENSION:
        import duckdb_extension_sqlite

        found = next(Path(duckdb_extension_sqlite.__file__).parent.glob("extensions/*/sqlite.duckdb_extension"))
        stat = found.stat()
        folder = paths.cache_dir() / "duckdb" / f"{found.parent.name}-{stat.st_size}-{stat.st_mtime_ns}"
        target = folder / "sqlite_scanner.duckdb_extension"
        if not (target.is_file() and target.stat().st_size == stat.st_size):
            folder.mkdir(parents=True, exist_ok=True)
            fd, part = tempfile.mkstemp(dir=folder, prefix=".sqlite_scanner-")  # then renamed: processes race
            os.close(fd)
            try:
                shutil.copyfile(found, part)
                os.replace(part, target)
            finally:
                Path(part).unlink(missing_ok=True)
        _EXTENSION.append(target)
    return _EXTENSION[0]


def _threads_from_env() -> int | None:
    """``LLMWATTS_DUCKDB_THREADS`` (a positive whole number): DuckDB's threads on a shared box; unset: every core."""
    text = os.environ.get("LLMWATTS_DUCKDB_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def available() -> bool:
    """Whether DuckDB and its sqlite extension are installed (request_pass.py then runs its child)."""
    try:
        import duckdb  # noqa: F401

        _extension()
    except (ImportError, StopIteration, OSError):  # OSError: no cache dir to copy the extension into
        return False
    return True


def connect(threads: int | None = None):
    """A DuckDB connection that reads and writes SQLite files, or None when DuckDB or its sqlite extension
    is not installed (callers then do the work in SQLite)."""
    try:
        import duckdb

        extension = _extension()
    except (ImportError, StopIteration, OSError):
        return None
    config = {"allow_unsigned_extensions": "true"}
    threads = threads or _threads_from_env()
    if threads:
        config["threads"] = threads
    conn = duckdb.connect(config=config)
    conn.execute(f"LOAD '{extension}'")
    return conn


class Child:
    """``python -m MODULE ARGS`` in a child process (a DuckDB pass: DuckDB links its own SQLite, and two SQLite
    libraries must not have one file open in one process, request_pass.py), its standard output into a temp
    file: megabytes through a pipe cost the parent ~0.4 s of CPU in small reads at a million requests."""

    def __init__(self, module: str, *args: str):
        self.out = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=self.out,
                                         stderr=subprocess.DEVNULL)
        except OSError:
            self.out.close()
            raise

    def output(self, parse: Callable, timeout_s: float, errors: tuple[type[BaseException], ...]):
        """``parse(file)`` of what the child wrote, once it exited 0; None when it failed, ran past
        ``timeout_s`` or ``parse`` raised one of ``errors``. The child is gone afterwards either way."""
        try:
            if self.proc.wait(timeout_s) != 0:
                return None
            self.out.seek(0)
            return parse(self.out)
        except (subprocess.TimeoutExpired, *errors):
            return None
        finally:
            self.discard()

    def discard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.out.close()


def literal(text: str) -> str:
    """``text`` as an SQL string literal (DuckDB's and SQLite's): quoted, its quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB; 0 where /proc is not there. Here, not in
    request_pass.py: the telemetry child (bucket_prefetch) reports it too and need not import numpy."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
