"""The one way mealkd makes a rich Console, so every command prints alike."""
from __future__ import annotations

from typing import Any

from rich.console import Console


def make_console(*, stderr: bool = True, soft_wrap: bool = True, **kwargs: Any) -> Console:
    """A console whose lines are never hard-wrapped (a cluster log keeps each line whole for grep) and that
    prints emoji codes as written: rich turned the dry run's ``topk:100:`` into ``topk💯``, and would do so to
    any ``:name:`` in a path or model spec."""
    return Console(stderr=stderr, soft_wrap=soft_wrap, emoji=False, **kwargs)
