"""The study's progress bar (rich): cells done of all, ETA, and the current cell's live tokens/s and watts."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmwatts.console import console

MAX_CELL_CHARS = 60


class StudyProgress:
    """``with StudyProgress(total, done) as p: p.start_cell(key); p.live(tok_s, watts); p.cell_done()``."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("cells"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[live]}"), console=console(), disable=not enabled)
        self.task = self.progress.add_task("study", total=total, completed=done, live="")

    def __enter__(self) -> "StudyProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start_cell(self, key: str) -> None:
        text = key if len(key) <= MAX_CELL_CHARS else key[:MAX_CELL_CHARS - 1] + "…"
        self.progress.update(self.task, description=text, live="")

    def live(self, tokens_per_s: float | None, watts: float | None) -> None:
        parts = []
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.1f} tok/s")
        if watts is not None:
            parts.append(f"{watts:,.0f} W")
        self.progress.update(self.task, live="  ".join(parts))

    def cell_done(self) -> None:
        self.progress.advance(self.task)
