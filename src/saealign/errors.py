"""The one exception type users see: a single line saying what is wrong and how to fix it."""

from __future__ import annotations


class SaealignError(Exception):
    """A user-facing problem (bad input, missing file, mismatched cache).

    The CLI prints ``str(error)`` as one line and exits non-zero; library callers can catch it.
    Keep messages to one line that names the problem and the fix.
    """
