"""The injected clock: the real one unless a test names an offset file, read only then."""

from __future__ import annotations

import time
from pathlib import Path

from mithrilfs.clock import NS, SYSTEM_CLOCK, OffsetClock, clock_from


def test_without_an_offset_file_the_system_clock_is_used() -> None:
    assert clock_from(None) is SYSTEM_CLOCK
    before = time.time_ns()
    assert before <= SYSTEM_CLOCK.now_ns() <= time.time_ns()


def test_an_offset_file_moves_the_clock_while_it_is_used(tmp_path: Path) -> None:
    offset = tmp_path / "clock-offset"
    clock = clock_from(offset)
    assert isinstance(clock, OffsetClock)
    assert clock.offset_ns() == 0  # missing: nothing added
    offset.write_text("")
    assert clock.offset_ns() == 0
    offset.write_text("not a number")
    assert clock.offset_ns() == 0
    offset.write_text(str(8 * 86400))
    before = time.time_ns()
    assert clock.now_ns() - before >= 8 * 86400 * NS
    offset.write_text("1.5")
    assert clock.offset_ns() == int(1.5 * NS)
