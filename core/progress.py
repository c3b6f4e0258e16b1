"""Rich progress bars with throughput columns, quiet on non-main ranks, and plain lines in logs.

Rich draws a progress bar only on a terminal; written to a file (a SLURM or Kubernetes log) it shows
nothing until the work ends, so a day-long stage one would look hung. There the same columns are
printed as one plain line per task every ``MEALKD_PROGRESS_SECONDS`` seconds (default 60).
"""
from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Completed units per second, optionally scaled (e.g. images/s and crops/s from one task)."""

    def __init__(self, unit: str, scale_field: str | None = None):
        super().__init__()
        self.unit = unit
        self.scale_field = scale_field

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        if self.scale_field:
            speed *= task.fields.get(self.scale_field, 1)
        return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class LoggedProgress(Progress):
    """A Progress for a console that is not a terminal: every ``interval`` seconds, on an update, one plain
    line per unfinished task with the text of its columns (description, M/N, rates, elapsed, ETA), and a
    last line per task at the end (instead of rich's final bar, which wraps in an 80-column log)."""

    def __init__(self, *columns: ProgressColumn | str, interval: float, **kwargs):
        super().__init__(*columns, **kwargs)
        self.interval = interval
        self._logged = time.monotonic()

    def start(self) -> None:
        """No live display: it would draw nothing in a log until the end, then a wrapped bar."""

    def stop(self) -> None:
        self._log(every=True)

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._log()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log()

    def _log(self, every: bool = False) -> None:
        """Lines for the unfinished tasks if ``interval`` has passed; ``every``: now, for every task."""
        now = time.monotonic()
        if self.disable or (not every and now - self._logged < self.interval):
            return
        self._logged = now
        for task in self.tasks:
            if task.visible and (every or not task.finished):
                parts = [column(task) for column in self.columns if isinstance(column, ProgressColumn)]
                self.console.print(" ".join(p.plain.strip() for p in parts if isinstance(p, Text) and p.plain.strip()), soft_wrap=True,
                                   highlight=False, markup=False)


def progress_seconds() -> float:
    """Seconds between plain progress lines in logs (``MEALKD_PROGRESS_SECONDS``, default 60)."""
    return float(os.environ.get("MEALKD_PROGRESS_SECONDS", "60"))


def make_progress(console: Console, *columns: ProgressColumn, enabled: bool = True) -> Progress:
    """A progress display: a live bar on a terminal, plain lines every ``progress_seconds()`` elsewhere."""
    kind, extra = (Progress, {}) if console.is_terminal else (LoggedProgress, {"interval": progress_seconds()})
    return kind(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
        **extra,
    )
