"""click parameter types both stages' commands share."""
from __future__ import annotations

import click


class ThreadCount(click.ParamType):
    """``--num-threads``: a positive number, or ``auto`` (None: ``core.dali_io.auto_threads`` decides per device)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r}: use a number of threads >= 1, or auto", param, ctx)
        return number


THREADS = ThreadCount()

#: the help text of every ``--num-threads``
THREADS_HELP = ("DALI CPU threads per process, or auto: on a GPU the cores this process may use (an unbound process shares "
                "the node, and a container's CPU limit, with its other torchrun processes) less 2 for its Python threads, at "
                "most 16; on the CPU 2 (the cores are the model's).")
