"""The one exception type users see: a one-line cause and fix, exit code 2 on the CLI."""

from __future__ import annotations


class KdcacheError(Exception):
    """Bad input or a refused operation. The message names the problem and the fix.

    The CLI prints it as a single ``error:`` line and exits with code 2; nothing
    that raises it may leave a half-written store behind.
    """

    exit_code = 2


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when the message is empty), cut to ``limit``."""
    lines = str(exc).splitlines()
    return (lines[0] if lines and lines[0].strip() else exc.__class__.__name__)[:limit]
