"""One exception type for everything a user can cause.

The CLI catches :class:`LatentWireError` and prints its message as a single
line (no traceback); anything else is a bug and keeps its traceback.
"""


class LatentWireError(Exception):
    """A problem with the user's input: a flag, a file, a model name, data."""
