"""Byte sizes as people write them (512MiB, 4GiB)."""

from __future__ import annotations

import re

from kdcache.errors import KdcacheError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """A byte count from ``4GiB``, ``512MiB``, ``2GB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match[2].lower()
    if match is None or unit not in _UNITS:
        raise KdcacheError(f"--cache-memory takes a size such as 512MiB, 4GiB or 2GB, not {text!r}")
    return int(float(match[1]) * _UNITS[unit])
