"""The clock that recency, expiry and eviction requests measure ages against.

The daemon and the offline commands build one clock at startup and hand it
to whoever needs the time, so that nothing on the request path asks the
environment what time it is.  `SystemClock` is the real one.  `OffsetClock`
exists for tests that age entries by days without waiting days: it is
chosen only by the hidden ``--clock-offset-file`` option (docs/eviction.md),
and adds the seconds written in that file, which the test may change while
the daemon runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

NS = 1_000_000_000


class Clock(Protocol):
    def now_ns(self) -> int:
        """Unix time in nanoseconds (recency, expiry, the ages `evict` reports)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back (intervals)."""
        ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


class OffsetClock(SystemClock):
    """The system clock plus the seconds in *offset_file* (tests only).

    A missing, empty or unreadable file adds nothing.
    """

    def __init__(self, offset_file: Path) -> None:
        self.offset_file = offset_file

    def offset_ns(self) -> int:
        try:
            text = self.offset_file.read_text().strip()
        except OSError:
            return 0
        try:
            return int(float(text) * NS) if text else 0
        except ValueError:
            return 0

    def now_ns(self) -> int:
        return super().now_ns() + self.offset_ns()


SYSTEM_CLOCK = SystemClock()


def clock_from(offset_file: Path | None) -> Clock:
    """The clock a daemon or command uses: the real one unless a test asked for an offset."""
    return SYSTEM_CLOCK if offset_file is None else OffsetClock(offset_file)
