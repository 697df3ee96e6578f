"""The background scrub: every stored object hashed again, slowly, all the time.

Requests trust an object whose verification mark is valid (openfiles.py,
docs/crash-safety.md) and hash only the others, so damage that leaves the
file's inode alone (bit rot, a bad sector) would go unseen.  The scrub walks
every object in hash order, paced so that a full pass takes about
`--scrub-period` without ever reading faster than `--scrub-rate`, hashes each
in a worker thread, renews its mark when it matches, and hands a damaged or
missing one to the daemon, which drops every cache entry that uses it.

Where a pass stands (its cursor, start, counts, last finding) lives in the
index, so a pass continues across remounts instead of starting over; the
same figures are gauges for `mithrilfs stats` and /metrics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mithrilfs.index import Index
from mithrilfs.stats import Stats
from mithrilfs.store import ContentStore, hash_fd

log = logging.getLogger(__name__)

DEFAULT_PERIOD = 7 * 86400.0
DEFAULT_RATE = 32 << 20
# Objects fetched from the index per query.
BATCH = 64
# What an object costs the pace at least: a tiny file still takes a block,
# an open and a close.
MIN_COST = 4096

# The progress kept in the index (meta) and shown as gauges.
PROGRESS = ("pass_started", "pass_objects", "pass_bytes", "last_finding")


@dataclass
class ScrubConfig:
    period: float = DEFAULT_PERIOD  # seconds a full pass should take
    rate: int = DEFAULT_RATE  # bytes per second, at most; 0: no scrub


class Scrubber:
    def __init__(
        self,
        index: Index,
        store: ContentStore,
        stats: Stats,
        config: ScrubConfig,
        on_corrupt: Callable[[bytes], None],
    ) -> None:
        self.index = index
        self.store = store
        self.stats = stats
        self.config = config
        self._on_corrupt = on_corrupt
        self.progress = {name: int(str(index.get_meta(f"scrub.{name}", 0))) for name in PROGRESS}
        cursor = index.get_meta("scrub.cursor", b"")
        self._cursor = cursor if isinstance(cursor, bytes) else b""
        self._publish()

    async def run(self) -> None:
        if self.config.rate <= 0:
            return
        while True:
            if not self._cursor:
                # A pass starts a period after the last one started.
                wait = self.progress["pass_started"] + self.config.period - time.time()
                if wait > 0:
                    await trio.sleep(wait)
                self._start_pass()
            batch = self.index.objects_after(self._cursor, BATCH)
            if not batch:
                self._end_pass()
                continue
            pace = self._pace()
            for digest, size in batch:
                # The pause comes first: a mount's first moments belong to its jobs.
                await trio.sleep(max(size, MIN_COST) / pace)
                await self._check(digest, size)
                self._cursor = digest
                self._save()

    def _pace(self) -> float:
        """Bytes per second: a full pass in about one period, never above the rate."""
        cost = self.index.stored_bytes + self.index.object_count * MIN_COST
        return min(float(self.config.rate), max(cost / self.config.period, 1.0))

    async def _check(self, digest: bytes, size: int) -> None:
        try:
            fd = self.store.open_object(digest)
        except FileNotFoundError:
            self._found(digest, "missing")
            return
        try:
            before = os.fstat(fd)
            actual, actual_size = await trio.to_thread.run_sync(hash_fd, fd)
        finally:
            os.close(fd)
        self.progress["pass_objects"] += 1
        self.progress["pass_bytes"] += actual_size
        self.stats.inc("scrub_verified_bytes_total", actual_size)
        # Evicted, or evicted and stored again, while it was hashed: what was
        # hashed is not what the index names now.
        if self.index.object_size(digest) != size or not _same_file(self.store, digest, before):
            return
        if actual == digest and actual_size == size:
            self.index.mark_verified(digest, before.st_ctime_ns)
        else:
            self._found(digest, f"size {actual_size} of {size}" if actual_size != size else "hash")

    def _found(self, digest: bytes, what: str) -> None:
        if self.index.object_size(digest) is None:
            return  # evicted meanwhile: gone, not damaged
        log.error("scrub: object %s is damaged (%s)", digest.hex(), what)
        self.progress["last_finding"] = int(time.time())
        self.stats.inc("scrub_findings_total")
        self._on_corrupt(digest)

    def _start_pass(self) -> None:
        self.progress.update(pass_started=int(time.time()), pass_objects=0, pass_bytes=0)
        self._save()

    def _end_pass(self) -> None:
        self.stats.inc("scrub_passes_total")
        log.info(
            "scrub: pass done, %d objects (%d bytes) verified",
            self.progress["pass_objects"],
            self.progress["pass_bytes"],
        )
        self._cursor = b""
        self._save()

    def _save(self) -> None:
        self.index.save_scrub_progress(self._cursor, self.progress)
        self._publish()

    def _publish(self) -> None:
        for name, value in self.progress.items():
            self.stats.set_gauge(f"scrub_{name}", value)


def _same_file(store: ContentStore, digest: bytes, seen: os.stat_result) -> bool:
    try:
        now = os.stat(store.object_path(digest))
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino)
