"""The one exception type for a user's mistake.

The CLI turns a :class:`MobileNetError` into a one-line message and exit code 2; any other exception is a bug
in this library and keeps its traceback.
"""

from __future__ import annotations


class MobileNetError(ValueError):
    """A user's input was wrong: the message names what was wrong and what is expected."""
