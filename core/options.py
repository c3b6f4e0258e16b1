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

#: ``--device``: where a command decodes and runs its models (``core.dali_io.resolve_backend`` reads it)
DEVICE = click.Choice(["auto", "cpu", "cuda"])

#: the help text of every ``--num-threads``
THREADS_HELP = ("DALI CPU threads per process, or auto: on a GPU the cores this process may use (an unbound process shares "
                "the node, and a container's CPU limit, with its other torchrun processes) less 2 for its Python threads, at "
                "most 16; on the CPU 2 (the cores are the model's).")


class ModelSpecs(click.ParamType):
    """``--teachers`` (a comma list) or ``--student`` (one spec), checked while the flags are parsed so
    that a typo's message names its flag: the spec grammar, and that the files the models need exist
    (every teacher's; a student's TorchScript/.pt2 file, which is its architecture; a student's
    ``@FILE`` is not checked: ``--init`` or a resumed checkpoint may supersede it). The value stays the
    text the user gave (configs and stores record it)."""

    def __init__(self, many: bool):
        self.many = many
        self.name = "SPECS" if many else "SPEC"

    def convert(self, value, param, ctx):
        import os

        from mealkd.core.models.spec import FILE_SOURCES, parse_spec, parse_spec_list
        from mealkd.errors import UserError

        if value is None:
            return None
        text = str(value)
        flag = param.opts[0] if param is not None and param.opts else ("--teachers" if self.many else "--student")
        try:  # UserError, not self.fail: one line like every other bad-input message
            specs = parse_spec_list(text) if self.many else [parse_spec(text)]
        except UserError as e:
            raise UserError(f"{flag}: {e}") from None
        for spec in specs:
            needed = spec.weights_file and (self.many or spec.source in FILE_SOURCES)
            path = os.path.expanduser(spec.weights_file or "")
            if needed and not os.path.isfile(path):
                problem = "is a directory, not a weights file" if os.path.isdir(path) else "does not exist: check the path"
                raise UserError(f"{flag}: {spec.weights_file} (in {spec.text}) {problem}")
        return text


TEACHER_SPECS = ModelSpecs(many=True)
STUDENT_SPEC = ModelSpecs(many=False)
