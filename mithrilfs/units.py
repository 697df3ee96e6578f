"""Byte sizes and durations as people type and read them.

One syntax for each, used by every option and every message:

- sizes: a number with an optional binary unit, ``4096``, ``500M``, ``1.5G``,
  ``1T`` (``K`` = 1024; a trailing ``B`` or ``iB`` is accepted); shown as
  ``512 B``, ``1.5 GiB``;
- durations: a number with an optional unit, ``200ms``, ``90s``, ``30m``,
  ``12h``, ``7d``, ``2w`` (a bare number is seconds); shown as ``45s``,
  ``1.5h``, ``2.0d``.
"""

from __future__ import annotations

import math
import re

from mithrilfs.errors import UserError

NS = 1_000_000_000

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", re.ASCII)
_SHOWN_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw]?)\s*", re.ASCII)
_SHOWN_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60))
# Durations end up as nanoseconds in signed 64-bit columns.
_DURATION_MAX_S = (1 << 62) / NS


def parse_size(text: str) -> int:
    """'500M', '50G', '1T', '1.5G', '4096' -> bytes; UserError (exit 2) otherwise."""
    match = _SIZE.fullmatch(text.upper())
    if not match:
        raise UserError(
            f"invalid size '{text}': expected a number with an optional unit "
            "such as 500M, 50G or 1T",
            2,
        )
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if value < 1 or math.isinf(value):
        raise UserError(f"invalid size '{text}': must be at least 1 byte", 2)
    return int(value)


def format_size(size: int, unit: str | None = None) -> str:
    """512 -> '512 B', 1536 -> '1.5 KiB', up to TiB; negative sizes keep their sign.

    *unit* ('KiB' ... 'TiB') fixes the unit, for a message that compares a size
    with a threshold given in it ('0.5 GiB free, below 1 GiB')."""
    value = float(size)
    for shown in _SHOWN_SIZE_UNITS:
        last = shown == _SHOWN_SIZE_UNITS[-1] or shown == unit
        if (unit is None and abs(value) < 1024) or last:
            return f"{size} B" if shown == "B" else f"{value:.1f} {shown}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str, what: str = "duration") -> float:
    """'200ms', '90s', '30m', '12h', '7d', '2w', '0.5' -> seconds; UserError (exit 2)
    otherwise.  *what* names the value in the message (an option, say)."""
    match = _DURATION.fullmatch(text.lower())
    if not match:
        raise UserError(f"invalid {what} '{text}': expected e.g. 200ms, 90s, 30m, 12h, 7d or 2w", 2)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if math.isinf(seconds) or seconds >= _DURATION_MAX_S:
        raise UserError(f"invalid {what} '{text}': too long", 2)
    return seconds


def format_duration(seconds: float) -> str:
    """45 -> '45s', 5400 -> '1.5h', 172800 -> '2.0d' (the largest unit that fits)."""
    seconds = max(0.0, seconds)
    for unit, length in _SHOWN_DURATION_UNITS:
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
