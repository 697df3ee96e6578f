"""The progress display of long offline work: fsck, import, export.

A tqdm bar on stderr when stderr is a terminal; nothing at all otherwise,
so that logs, pipes and scripts see only the command's own report.  It
counts items (objects checked, entries imported) and, where the work is
mostly copying, shows the bytes beside them.
"""

from __future__ import annotations

import io
import os
import sys
from typing import IO

from tqdm import tqdm

from mithrilfs.units import format_size

# Redrawn at most this often: a terminal is slow next to an import of small files.
REDRAW_S = 0.1
# The terminal's size when it does not say (a pty nobody sized reports 0 by 0).
DEFAULT_COLUMNS = 100
DEFAULT_ROWS = 24


class Progress:
    """One line: LABEL DONE/TOTAL UNIT[, BYTES of TOTAL] (PERCENT%) |bar| elapsed<left."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        total_bytes: int | None = None,
        *,
        unit: str = "",
        stream: IO[str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.total_bytes = total_bytes
        self.bytes = 0
        shown_unit = f" {unit}" if unit else ""
        columns, rows = _terminal_size(self.stream)
        self._bar = tqdm(
            total=total,
            desc=label,
            file=self.stream,
            disable=not self.enabled,
            mininterval=REDRAW_S,
            ncols=columns,
            nrows=rows,
            bar_format=(
                "{desc} {n_fmt}/{total_fmt}" + shown_unit + "{postfix} ({percentage:3.0f}%) "
                "|{bar:24}| {elapsed}<{remaining}"
            ),
        )

    @property
    def total(self) -> int | None:
        total: int | None = self._bar.total
        return total

    def set_totals(self, total: int, total_bytes: int | None = None) -> None:
        """Totals learned once the work has started (an archive's header, a listing)."""
        self._bar.total = total
        self.total_bytes = total_bytes
        self._bar.refresh()

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        if not self.enabled:
            return
        self.bytes += nbytes
        if self.total_bytes is not None:
            self._bar.set_postfix_str(
                f"{format_size(self.bytes)} of {format_size(self.total_bytes)}", refresh=False
            )
        self._bar.update(items)

    def update_to(self, done: int, total: int) -> None:
        """A callback for work that counts for itself (fsck.check's *progress*)."""
        if not self.enabled:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def finish(self) -> None:
        """Draw the final state and end the line (nothing when disabled)."""
        self._bar.close()


def _terminal_size(stream: IO[str]) -> tuple[int | None, int | None]:
    """The terminal's (columns, rows), for tqdm, which draws nothing on a terminal that
    reports a size of 0 (a pty nobody sized); None where *stream* has none to ask."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None, None
    return size.columns or DEFAULT_COLUMNS, size.lines or DEFAULT_ROWS
