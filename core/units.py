"""Byte quantities: parse ``"24GiB"`` and print ``25.8 GB`` the same way everywhere."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object, *, field: str = "budget") -> int:
    """Return ``value`` as a positive whole number of bytes.

    Accepts an ``int`` (bytes) or a string such as ``"24GiB"``, ``"512 MiB"``, ``"80GB"``
    (binary units ``KiB..TiB`` are powers of 1024, decimal ``KB..TB`` powers of 1000; a bare
    number is bytes).

    >>> parse_bytes("1.5KiB")
    1536
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(
            f"{field}={value!r} is not a byte quantity: give an int number of bytes or a string "
            f"like '24GiB' or '80GB'."
        )
    if isinstance(value, int):
        number, unit = float(value), "b"
    else:
        match = _QUANTITY.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit or "b") not in _UNITS:
            raise ConfigError(
                f"{field}={value!r} is not a byte quantity: expected a number followed by one of "
                f"{', '.join(['B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'])}, e.g. '24GiB'."
            )
        number = float(match.group(1))
    total = number * _UNITS[unit or "b"]
    if not math.isfinite(total) or total < 1:
        raise ConfigError(f"{field}={value!r} is too small: a byte quantity must be at least 1 byte.")
    return int(total)


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
