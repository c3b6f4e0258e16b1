"""Rich progress bars with throughput columns, quiet on non-main ranks."""
from __future__ import annotations

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


def make_progress(console: Console, *columns: ProgressColumn, enabled: bool = True) -> Progress:
    return Progress(
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
    )
