"""Where llmwatts finds prompt data and keeps its caches."""

import os
from pathlib import Path

import platformdirs

DATA_DIR_ENV = "LLMWATTS_DATA_DIR"
CACHE_DIR_ENV = "LLMWATTS_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache dir (``LLMWATTS_CACHE_DIR`` overrides), created on demand."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("llmwatts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for prompt files, in order: ``--data-dir``, ``LLMWATTS_DATA_DIR``, the cache."""
    dirs = []
    if explicit:
        dirs.append(Path(explicit))
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]))
    dirs.append(cache_dir() / "data")
    return dirs
