"""Keeping a store under its cap: recency, victim selection, removal in batches.

Recency is the last time an entry was opened for reading.  It is kept in
memory on the request path and written to the index in batches, never one
SQLite write per read.  When usage (stored objects after dedup, plus files
being written) passes the cap, a background task removes the least recently
read entries, whole, in bounded batches, until usage is below the low
watermark; each batch costs time in proportion to what it removes (an
indexed walk up the `last_read` order), not to the size of the store.

Every name removed this way is invalidated in the kernel through pyfuse3's
asynchronous invalidation queue, never from inside a request handler.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.lowlevel

from mithrilfs.errors import UserError
from mithrilfs.index import EvictedEntry, Index
from mithrilfs.store import ContentStore

log = logging.getLogger(__name__)

LOW_WATERMARK = 0.9
BATCH_ENTRIES = 64
RECENCY_FLUSH_SECONDS = 2.0
DEFAULT_CAP_FRACTION = 0.10
DEFAULT_CAP_MIN = 1 << 30
DEFAULT_CAP_MAX = 100 << 30

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'500M', '50G', '1T', '1.5G', '4096' -> bytes (binary units; a trailing B or iB is fine)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise UserError(
            f"invalid size '{text}': expected a number with an optional unit "
            "such as 500M, 50G or 1T",
            2,
        )
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1 or math.isinf(value):
        raise UserError(f"invalid size '{text}': must be at least 1 byte", 2)
    return int(value)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise UserError(f"invalid duration '{text}': expected e.g. 90s, 30m, 12h, 7d or 2w", 2)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def default_cap(store_fs_bytes: int) -> int:
    """10% of the store's filesystem, kept between 1 GiB and 100 GiB."""
    return max(DEFAULT_CAP_MIN, min(DEFAULT_CAP_MAX, int(store_fs_bytes * DEFAULT_CAP_FRACTION)))


@dataclass
class Recency:
    """Entry reads seen since the last flush: entry id -> unix time (seconds)."""

    pending: dict[int, int] = field(default_factory=dict)

    def touch(self, entry_id: int | None, now: int | None = None) -> None:
        if entry_id is not None:
            self.pending[entry_id] = int(time.time()) if now is None else now

    def flush(self, index: Index) -> int:
        if not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        index.touch_entries(batch.items())
        return len(batch)


@dataclass
class EvictionResult:
    entries: int = 0
    bytes_freed: int = 0


class Evictor:
    def __init__(
        self,
        index: Index,
        content: ContentStore,
        cap: int,
        *,
        staged_bytes: Callable[[], int] = lambda: 0,
        on_removed: Callable[[EvictedEntry], None] = lambda entry: None,
        is_busy: Callable[[int], bool] = lambda ino: False,
        is_held: Callable[[int], bool] = lambda ino: False,
        max_age: float | None = None,
    ) -> None:
        self.index = index
        self.content = content
        self.cap = cap
        self.max_age = max_age
        self.recency = Recency()
        self._staged_bytes = staged_bytes
        self._on_removed = on_removed
        self._is_busy = is_busy
        self._is_held = is_held
        self._wake = trio.Event()
        # Entries found being written during this round of eviction.
        self._busy: set[int] = set()

    def usage(self) -> int:
        return self.index.stored_bytes + self._staged_bytes()

    def room(self) -> int:
        return max(0, self.cap - self.usage())

    def over_cap(self) -> bool:
        return self.usage() > self.cap

    def wake(self) -> None:
        self._wake.set()

    def evict_until_below(self, target: int, reason: str = "cap") -> EvictionResult:
        """Remove least recently read entries until usage <= *target* (synchronous)."""
        result = EvictionResult()
        self.recency.flush(self.index)
        while self.usage() > target:
            if not self._evict_batch(target, reason, result):
                break
        return result

    def _evict_batch(self, target: int, reason: str, result: EvictionResult) -> bool:
        """One bounded batch of the oldest entries; False when nothing could go."""
        removed_any = False
        for entry_id in self.index.oldest_entries(BATCH_ENTRIES + len(self._busy)):
            if self.usage() <= target:
                return True
            if entry_id in self._busy:
                continue
            if self._remove(entry_id, reason, result):
                removed_any = True
            else:
                self._busy.add(entry_id)
        return removed_any

    def evict_older_than(self, cutoff: int, reason: str = "max_age") -> EvictionResult:
        result = EvictionResult()
        self.recency.flush(self.index)
        for entry_id in self.index.entries_read_before(cutoff):
            self._remove(entry_id, reason, result)
        return result

    def remove_entries(self, entry_ids: list[int], reason: str) -> EvictionResult:
        result = EvictionResult()
        for entry_id in entry_ids:
            self._remove(entry_id, reason, result)
        return result

    def _remove(self, entry_id: int, reason: str, result: EvictionResult) -> bool:
        files = self.index.entry_files(entry_id)
        if any(self._is_busy(ino) for ino in files):
            return False  # being written: never evict half-written work
        removed = self.index.evict_entry(entry_id, self._is_held)
        for digest in removed.unused_objects:
            self.content.delete(digest)
        result.entries += 1
        result.bytes_freed += removed.bytes_freed
        self._on_removed(removed)
        log.debug(
            "evicted entry %d (%s): %d names, %d bytes",
            entry_id,
            reason,
            len(removed.names),
            removed.bytes_freed,
        )
        return True

    async def run(self) -> None:
        """Background task: when woken over the cap, evict down to the low watermark."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._busy.clear()
            if not self.over_cap():
                continue
            target = int(self.cap * LOW_WATERMARK)
            result = EvictionResult()
            self.recency.flush(self.index)
            while self.usage() > target and self._evict_batch(target, "cap", result):
                await trio.lowlevel.checkpoint()  # let requests in between batches
            if result.entries:
                log.info(
                    "evicted %d entries (%d bytes) to stay under the cap of %d bytes",
                    result.entries,
                    result.bytes_freed,
                    self.cap,
                )

    def expire(self) -> EvictionResult:
        """Drop entries not read for longer than max_age (called periodically)."""
        if self.max_age is None:
            return EvictionResult()
        return self.evict_older_than(int(time.time() - self.max_age))
