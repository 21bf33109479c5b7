"""One exception type for user-facing problems: the CLI prints its message on one line, no traceback."""


class DifflensError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""
