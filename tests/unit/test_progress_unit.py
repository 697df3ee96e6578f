"""progress.py: a bar on a terminal, nothing at all elsewhere."""

from __future__ import annotations

import io
import os
import pty

from mithrilfs.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_written_where_stderr_is_not_a_terminal() -> None:
    log = io.StringIO()
    shown = Progress("import x:", 3, 300, unit="entries", stream=log)
    for _ in range(3):
        shown.advance(1, 100)
    shown.finish()
    assert log.getvalue() == ""


def test_a_terminal_gets_counts_bytes_and_percent() -> None:
    terminal = FakeTerminal()
    shown = Progress("import x:", unit="entries", stream=terminal)
    shown.set_totals(2, 3 << 20)
    shown.advance(1, 1 << 20)
    shown.advance(1, 2 << 20)
    shown.finish()
    drawn = terminal.getvalue()
    assert "\r" in drawn
    assert "import x: 2/2 entries, 3.0 MiB of 3.0 MiB (100%)" in drawn
    assert drawn.endswith("\n")


def test_a_terminal_of_size_zero_still_gets_the_line() -> None:
    controller, terminal_fd = pty.openpty()
    try:
        with os.fdopen(terminal_fd, "w") as terminal:
            assert os.get_terminal_size(terminal_fd).columns == 0
            shown = Progress("fsck: checking objects", stream=terminal)
            for done in range(1, 10):
                shown.update_to(done, 9)
            shown.finish()
        drawn = _read_all(controller)
    finally:
        os.close(controller)
    assert b"fsck: checking objects 9/9 (100%)" in drawn


def _read_all(controller: int) -> bytes:
    """Everything the terminal was sent: a pty hands it over in chunks, and
    reading the controller fails with EIO once the terminal side is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
