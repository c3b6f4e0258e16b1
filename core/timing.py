"""Where a loop's thread spends its time: seconds per named stage, reported after long work.

A labelling or training loop that waits for its input is input-bound (more decoder threads help);
one that waits for the GPU is compute-bound (as it should be). Both stages report these seconds.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """A human duration for progress and estimates: '45 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


@dataclass
class StageTimes:
    """Seconds the calling thread spent in each named stage (summed over the loop)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def waiting(self, items: Iterable[T], name: str) -> Iterator[T]:
        """``items``, charging the time each ``next()`` takes (the wait for the next item) to ``name``."""
        source, end = iter(items), object()
        while True:
            with self.stage(name):
                item = next(source, end)
            if item is end:
                return
            yield item

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)
