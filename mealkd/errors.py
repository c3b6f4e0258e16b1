"""The one exception type for user-facing errors.

Every layer raises :class:`UserError` for problems the user can fix (bad path, bad flag, mismatched
store). ``cli.main`` prints its message as one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and the fix."""
