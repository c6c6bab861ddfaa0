"""One table of rules for the numeric options, shared by every command and library function that takes them.

A flag is checked the same way wherever it appears (``--seed`` of dump-logits,
train-student and study views alike), and the message has one form:
``--batch-size must be at least 1, got 0``. Values come from click, from
Python callers or from a YAML config, so a wrong type (``"8"`` where an
integer is needed) is refused in the same form rather than failing later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import NamedTuple

from kdcache.errors import KdcacheError

POSITIVE, AT_LEAST_0, AT_LEAST_1 = "must be positive", "must be 0 or more", "must be at least 1"
SEED_RANGE = "must be in 0 .. 2**64 - 1"


class Rule(NamedTuple):
    """What an option's value must be: its kind (``int`` or ``float``), a test of the value and the rule in words."""

    kind: type
    ok: Callable[[float], bool]
    words: str


def _positive(v: float) -> bool:
    return v > 0


def _at_least_0(v: float) -> bool:
    return v >= 0


def _at_least_1(v: float) -> bool:
    return v >= 1


def _seed(v: float) -> bool:
    return 0 <= v < 2**64


def _any(v: float) -> bool:
    return True


#: Rules by Python option name (``batch_size`` is the flag ``--batch-size``).
RULES: dict[str, Rule] = {
    "epochs": Rule(int, _at_least_1, AT_LEAST_1),
    "batch_size": Rule(int, _at_least_1, AT_LEAST_1),
    "forward_block": Rule(int, _at_least_1, AT_LEAST_1),
    "cache_views": Rule(int, _at_least_1, AT_LEAST_1),
    "ctkd_decay_epochs": Rule(int, _at_least_1, AT_LEAST_1),
    "local_cluster": Rule(int, _at_least_1, AT_LEAST_1),
    "workers": Rule(int, _at_least_0, AT_LEAST_0),
    "sample": Rule(int, _at_least_0, AT_LEAST_0),
    "warmup": Rule(int, _at_least_0, AT_LEAST_0),
    "cache_memory": Rule(int, _at_least_0, AT_LEAST_0),
    "seed": Rule(int, _seed, SEED_RANGE),
    "view_seed": Rule(int, _seed, SEED_RANGE),
    "lr": Rule(float, _positive, POSITIVE),
    "temperature": Rule(float, _positive, POSITIVE),
    "t_norm": Rule(float, _positive, POSITIVE),
    "mix_alpha": Rule(float, _positive, POSITIVE),
    "ctkd_t_start": Rule(float, _positive, POSITIVE),
    "ctkd_t_end": Rule(float, _positive, POSITIVE),
    "ce_weight": Rule(float, _at_least_0, AT_LEAST_0),
    "kd_weight": Rule(float, _at_least_0, AT_LEAST_0),
    "alpha": Rule(float, _at_least_0, AT_LEAST_0),
    "beta": Rule(float, _at_least_0, AT_LEAST_0),
    "gamma": Rule(float, _at_least_0, AT_LEAST_0),
    "weight_decay": Rule(float, _at_least_0, AT_LEAST_0),
    "momentum": Rule(float, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lr_decay_rate": Rule(float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "ctkd_decay_max": Rule(float, _any, "must be a number"),
    "ctkd_decay_min": Rule(float, _any, "must be a number"),
}


def flag(name: str) -> str:
    """The command-line flag of a Python option name: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _shown(value: object) -> str:
    """A value as the message shows it: numbers as they print, anything else quoted (``'8'``, not ``8``)."""
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def _type_error(rule: Rule, value: object) -> str | None:
    """The rule a value of the wrong type breaks (bools are not numbers here), or None when its type fits."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "must be an integer" if rule.kind is int else "must be a number"
    if rule.kind is int and not isinstance(value, numbers.Integral):
        return "must be an integer"
    if rule.kind is float and not math.isfinite(value):
        return "must be a finite number"
    return None


def check_options(values: Mapping[str, object]) -> None:
    """Refuse the first value in ``values`` (Python option names) that breaks its rule in :data:`RULES`.

    Names without a rule, and values of ``None`` (not given), are skipped. The
    message is ``--flag RULE, got VALUE``, the same for every command.
    """
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is None or value is None:
            continue
        broken = _type_error(rule, value)
        if broken is None and not rule.ok(value):
            broken = rule.words
        if broken is not None:
            raise KdcacheError(f"{flag(name)} {broken}, got {_shown(value)}")
