"""The one exception type for user-facing errors.

Every layer raises :class:`UserError` for problems the user can fix (bad path, bad flag, mismatched
store). ``cli.main`` prints its message as one line and exits with code 2, without a traceback.
"""


def first_line(err: BaseException, limit: int = 240) -> str:
    """The first non-blank line of ``err``'s message (its type's name if none), at most ``limit`` characters:
    how a library's multi-line error is quoted inside a one-line UserError."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and the fix. ``echoed``: another
    rank of the job (rank 0) found the same and prints it, so this rank only exits (one line per job,
    not one per GPU)."""

    def __init__(self, message: str, *, echoed: bool = False):
        super().__init__(message)
        self.echoed = echoed


class MissingFile(UserError):
    """A file the user named (a weights file, a TorchScript or ExportedProgram model) does not exist: a caller
    that passed on a recorded path rather than the user's may say where the path came from."""


class StopRequested(Exception):
    """A run stopped on a signal (SIGTERM, SIGUSR1, Ctrl-C) after saving where it was. ``cli.main``
    prints its message (empty on the ranks that are not rank 0) and exits with 128 + the signal's
    number, the shell's convention for "ended by that signal": the work is not finished."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
