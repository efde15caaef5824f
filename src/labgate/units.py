"""Sizes written the way people write them: ``512M``, ``2 GiB``, ``1.5G``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
#: The largest size anything in labgate holds (1 EiB): beyond it databases overflow.
MAX_SIZE = 1024**6


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"512M"`` or ``"2 GiB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 2G")
    if isinstance(value, int):
        amount: float = value  # compared as an int: a huge one does not fit a float
    elif isinstance(value, float):
        amount = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"expected a size such as 512M or 2G, got {value!r}")
    if amount > MAX_SIZE:  # also inf, from a number too long for a float
        raise ValueError("size must be at most 1 EiB")
    if not amount >= 1:  # also NaN
        raise ValueError("size must be positive")
    return int(amount)


def format_size(size: int) -> str:
    """``size`` bytes as people write it: ``2 GiB``, ``512 MiB``, ``1.5 GiB``, ``100 bytes``."""
    for unit, name in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if size >= unit:
            return f"{size / unit:.4g} {name}"
    return f"{size} bytes"


Size = Annotated[int, BeforeValidator(parse_size)]
