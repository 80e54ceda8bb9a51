"""The error the CLI and the control API turn into one readable line / INVALID_ARGUMENT.

Raise ``UserError`` (or a subclass) for bad input: the message names the input and the
fix. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names the input and says how to fix it."""
