"""The rules a numeric setting's value must follow, each with its words, so every message has one form.

``--batch-size must be at least 1, got 0``: the same message whether the value came from the command line, a
config file or a Python caller, and a wrong type (``"8"`` where an integer is needed) is refused in the same form
rather than failing later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple


class Rule(NamedTuple):
    """What a numeric value must be: its kind (``int`` or ``float``), a test of the value and the rule in words."""

    kind: type
    ok: Callable[[Any], bool]
    words: str


POSITIVE = Rule(float, lambda v: v > 0, "must be positive")
AT_LEAST_0 = Rule(float, lambda v: v >= 0, "must be 0 or more")
INT_AT_LEAST_0 = Rule(int, lambda v: v >= 0, "must be 0 or more")
INT_AT_LEAST_1 = Rule(int, lambda v: v >= 1, "must be at least 1")
SEED = Rule(int, lambda v: 0 <= v < 2**64, "must be in 0 .. 2**64 - 1")
MOMENTUM = Rule(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
DECAY_RATE = Rule(float, lambda v: 0 < v <= 1, "must be in (0, 1]")
ANY_NUMBER = Rule(float, lambda v: True, "must be a number")
SIZE = Rule(int, lambda v: v >= 0, "must be 0 or more bytes")


def shown(value: object) -> str:
    """A value as a message shows it: numbers as they print, anything else quoted (``'8'``, not ``8``)."""
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def broken(rule: Rule, value: object) -> str | None:
    """The words of the rule ``value`` breaks (its type first: bools are not numbers here), or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "must be an integer" if rule.kind is int else "must be a number"
    if rule.kind is int and not isinstance(value, numbers.Integral):
        return "must be an integer"
    if rule.kind is float and not math.isfinite(value):
        return "must be a finite number"
    return None if rule.ok(value) else rule.words  # ints compared exactly (seeds near 2**64)
