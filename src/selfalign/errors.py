"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, an invalid option."""
