"""The one exception type a user can cause. The CLI prints its message as one sentence, no traceback."""


class UserError(Exception):
    """Bad input from the user (path, file, row, flag): the message names what and how to fix it."""
