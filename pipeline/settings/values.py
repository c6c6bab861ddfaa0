"""How a setting's value is read: one reader per kind of value, shared by the command line, config files and Python.

A reader takes what the user gave (a YAML value, a Python argument) and returns the value the library works with,
or raises ``ValueError`` whose message says what the setting takes ("an integer"). A float may be written as text
that spells it, since PyYAML reads ``5e-4`` (no dot) as text; an integer may not (``"8"`` is refused).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from pathlib import Path

Reader = Callable[[object], object]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def as_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("an integer")


def as_float(value: object) -> float:
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if math.isfinite(number):
        return number
    raise ValueError("a finite number")


def as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


def as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise ValueError("text (quote it)")


def as_text_or_int(value: object) -> str | int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError("text or an integer")


def as_ints(value: object) -> tuple[int, ...]:
    """Integers as a list or comma-separated text: ``[150, 180, 210]`` or ``150,180,210``."""
    try:
        if isinstance(value, str):
            return tuple(int(x) for x in value.split(",") if x.strip())
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(as_int(x) for x in items)
    except ValueError:
        raise ValueError("comma-separated integers such as 1,2,4,8") from None


def as_epochs(value: object) -> tuple[int, ...]:
    """Epoch numbers (LR milestones), as :func:`as_ints` reads them."""
    try:
        return as_ints(value)
    except ValueError:
        raise ValueError("epochs such as [150, 180, 210] or '150,180,210'") from None


def as_paths(value: object) -> list[str]:
    """One store location or a list of them."""
    if isinstance(value, str | Path):
        return [str(value)]
    if isinstance(value, list | tuple) and value and all(isinstance(x, str | Path) for x in value):
        return [str(x) for x in value]
    raise ValueError("a store path or a list of them")


def as_weights(value: object) -> list[float]:
    """Mixing weights as a list or comma-separated text: ``[0.5, 0.5]`` or ``0.5,0.5``."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(items, list | tuple) and items:
            return [as_float(x) for x in items]
    except ValueError:
        pass
    raise ValueError("one number per --cache such as [0.5, 0.5] or '0.5,0.5' (torchvision weights go to --weights)")


def as_size(value: object) -> int:
    """A byte count from ``4GiB``, ``512MiB``, ``2GB`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if match is None or match[2].lower() not in _UNITS:
        raise ValueError("a size such as 512MiB, 4GiB or 2GB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def as_mapping(value: object) -> dict[str, object]:
    """A mapping of option names to plain values, as ``config.yaml`` writes ``loss-opt``."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("a mapping such as {margin: 0.5}")
    return dict(value)


def as_plot(value: object) -> str | None:
    """Where a plot goes: a path, ``""`` for its default place; ``true``/``false`` as older config files wrote it."""
    if isinstance(value, bool):
        return "" if value else None
    return as_text(value)


def as_scalar(value: object) -> object:
    if isinstance(value, str | int | float | bool):
        return value
    raise ValueError("a single value")


#: The readers by the name the settings table uses.
READERS: dict[str, Reader] = {
    "int": as_int,
    "float": as_float,
    "bool": as_bool,
    "text": as_text,
    "path": as_text,
    "views": as_text_or_int,
    "ints": as_ints,
    "epochs": as_epochs,
    "paths": as_paths,
    "weights": as_weights,
    "size": as_size,
    "mapping": as_mapping,
    "plot": as_plot,
    "scalar": as_scalar,
}


def shown_size(n: int) -> str:
    """A byte count the way people write it: ``4GiB`` for 4 << 30."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        step = _UNITS[unit.lower()]
        if n >= step and n % step == 0:
            return f"{n // step}{unit}"
    return str(n)
