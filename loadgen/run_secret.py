"""A begun run's secret on disk, for the caller that must end the run if the load dies (``LoadConfig.run_secret_file``).

Only a run's owner may end it (``EndRun`` needs the ``run_secret`` BeginRun answered), and a server bounds
the runs a client holds open. A load killed mid-run (a study interrupted by Ctrl-C or SIGKILL) would leave
its run open for good; with ``run_secret_file`` set, the load writes ``{"run_id", "target", "run_secret"}``
there (mode 0600, whole or not at all) as soon as BeginRun answers and removes it once its EndRun
succeeded. A file left behind names a run still open, and holds what ends it (``llmwatts study`` ends
them when it resumes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 4096


@dataclass(frozen=True)
class OpenRun:
    run_id: str
    target: str
    run_secret: str


def write_run_secret(path: str | os.PathLike, run: OpenRun) -> None:
    """Write ``run`` to ``path`` (created 0600; temp file + rename, so a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"run_id": run.run_id, "target": run.target, "run_secret": run.run_secret}, f)
    tmp.replace(path)


def read_run_secret(path: str | os.PathLike) -> OpenRun | None:
    """The run in ``path``, or None when it is missing, too big or not one (e.g. cut by a crash)."""
    try:
        text = Path(path).read_bytes()[:MAX_FILE_BYTES + 1]
        if len(text) > MAX_FILE_BYTES:
            return None
        raw = json.loads(text)
        return OpenRun(str(raw["run_id"]), str(raw["target"]), str(raw["run_secret"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_run_secret(path: str | os.PathLike | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)
