"""Size strings ("512MB", "2GiB", "1073741824") parsed into bytes; KB, MB, GB and TB are binary."""

from __future__ import annotations

import re
from decimal import Context, Decimal

from edgevm.shared.limits import MAX_SIZE_BYTES, excerpt

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
# Digits, spaces and letters are disjoint, so this never backtracks (the value is stripped first). ASCII only:
# Python's \d and int() take any script's digits ("\u0661\u0662\u0668MB" would be 128 MiB).
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*([a-zA-Z]*)")

SIZE_RULE = (
    "must be a number of bytes or a string '<n><unit>' with unit B, KB, MB, GB, TB (binary) or KiB, MiB, GiB, TiB"
)


def parse_size(value: int | str) -> int:
    """Return the number of bytes `value` stands for, or raise ValueError naming the rule."""
    if isinstance(value, bool):
        raise ValueError(SIZE_RULE)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return _bounded(value)
    match = _SIZE.fullmatch(value.strip())
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{SIZE_RULE}, got {excerpt(value)}")
    number, unit = match.groups()
    if len(number.split(".")[0].lstrip("0")) > 20:  # far over the maximum, whatever the unit
        return _bounded(MAX_SIZE_BYTES + 1)
    # Decimal, not float: "9" * 60 + "GB" must be refused as too large, not overflow or lose digits.
    size = Context(prec=len(number) + 20).multiply(Decimal(number), _UNITS[unit.lower()])  # exact
    if size > MAX_SIZE_BYTES:
        return _bounded(MAX_SIZE_BYTES + 1)
    if size != int(size):
        raise ValueError(f"{excerpt(value)} is not a whole number of bytes")
    return int(size)


def _bounded(size: int) -> int:
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"must be at most {format_size(MAX_SIZE_BYTES)} ({MAX_SIZE_BYTES} bytes)")
    return size


def format_size(size: int) -> str:
    """Return `size` bytes as the shortest exact binary unit string, e.g. 536870912 -> '512MiB'."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
