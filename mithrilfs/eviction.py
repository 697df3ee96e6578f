"""Keeping a store under its cap: recency, victim selection, removal in batches.

Recency is the last time an entry was opened for reading, or had a file
placed in it (creating an entry is a use).  It has nanosecond resolution, so
an entry read a moment ago always ranks after one created before that
moment, and it is kept in memory on the request path and written to the
index in batches, never one SQLite write per read.

What counts against the cap is *pressure*: what the store takes on disk, as
`du` counts it (whole blocks of the stored objects after dedup and of the
files being written, the shard directories, the index and its WAL), less
the largest file being written.  That one file
is not known to fit until it is complete: a file that ends in EFBIG must not
have emptied the cache on its way there, so the store may hold at most one
file's worth beyond the cap, and every other byte counts at once.

Eviction starts one write (1 MiB, FUSE's largest) below the cap: the
request that crosses that threshold (a write, a seal) removes a bounded
number of entries itself, least recently read first, so that the cap holds
at every moment; then the background task takes pressure down to the low
watermark in bounded batches, letting requests in between.  Each
batch costs time in proportion to what it removes (a keyset walk up the
`last_read` index), never in proportion to the size of the store.  Entries
with a file being written are skipped: their newest bytes are not sealed yet.

Every entry removed is announced to the evictor's listeners
(`interfaces.RemovalListener`): the counters, and the kernel's caches, which
are invalidated through pyfuse3's asynchronous queue, never from inside a
request handler.  Growth (a seal, a fetch) reaches the evictor through
`grew`, which wakes the background task through a trio Event it owns.

Besides the cap: `expire` drops entries not read within `max_age`, and
`select_entries`/`plan` choose and price the entries that `mithrilfs evict`
names (by age, device class, path pattern).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import trio
import trio.lowlevel

from mithrilfs.clock import SYSTEM_CLOCK, Clock
from mithrilfs.errors import UserError
from mithrilfs.index import Index
from mithrilfs.interfaces import Holders, NothingHeld, NothingStaged, RemovalListener, Staging
from mithrilfs.layouts import EntryKey
from mithrilfs.store import ContentStore

log = logging.getLogger(__name__)

LOW_WATERMARK = 0.9
# FUSE hands the daemon writes of up to 1 MiB, and the cap is checked after
# each one: eviction starts this far below the cap (at most down to the low
# watermark), so that the write that triggers it cannot take the store past it.
MAX_WRITE = 1 << 20
BATCH_ENTRIES = 64
# At most this many entries are removed inside the one request that crossed
# the cap; what is left is the background task's.
CULL_ENTRIES = 16
RECENCY_FLUSH_SECONDS = 2.0
DEFAULT_CAP_FRACTION = 0.10
DEFAULT_CAP_MIN = 1 << 30
DEFAULT_CAP_MAX = 100 << 30
NS = 1_000_000_000


def check_path_pattern(pattern: str) -> str:
    """Validate a ``--path`` pattern: fnmatch syntax, relative to the device-class root."""
    problem = None
    if not pattern.strip():
        problem = "empty"
    elif pattern.startswith("/"):
        problem = "paths are relative to the device-class root, e.g. 'triton/*'"
    elif "\0" in pattern:
        problem = "contains a NUL byte"
    elif ".." in pattern.split("/"):
        problem = "'..' never appears in a stored path"
    elif _unclosed_bracket(pattern):
        # fnmatch would quietly take an unterminated '[' literally: surely a typo.
        problem = "unterminated '[' (write '[[]' for a literal bracket)"
    if problem:
        raise UserError(f"invalid path pattern '{pattern}': {problem}", 2)
    return pattern


def _unclosed_bracket(pattern: str) -> bool:
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                return True
            i = j
        i += 1
    return False


def default_cap(store_fs_bytes: int) -> int:
    """10% of the store's filesystem, kept between 1 GiB and 100 GiB."""
    return max(DEFAULT_CAP_MIN, min(DEFAULT_CAP_MAX, int(store_fs_bytes * DEFAULT_CAP_FRACTION)))


@dataclass
class Recency:
    """Entry reads seen since the last flush: entry id -> unix time (ns)."""

    clock: Clock = SYSTEM_CLOCK
    pending: dict[int, int] = field(default_factory=dict)

    def touch(self, entry_id: int | None, now: int | None = None) -> None:
        if entry_id is not None:
            self.pending[entry_id] = self.clock.now_ns() if now is None else now

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
    skipped: int = 0  # entries left alone because a file of theirs is being written


@dataclass(frozen=True)
class Candidate:
    """An entry chosen for removal, named for people."""

    entry_id: int
    location: str  # device class / path below the class root
    last_read: int  # unix ns


class Evictor:
    def __init__(
        self,
        index: Index,
        content: ContentStore,
        cap: int,
        *,
        staging: Staging | None = None,
        holders: Holders | None = None,
        listeners: Sequence[RemovalListener] = (),
        max_age: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """*staging* and *holders* default to an offline store's: nothing written or held."""
        self.index = index
        self.content = content
        self.cap = cap
        self.max_age = max_age
        self.clock = clock
        self.recency = Recency(clock)
        self.staging: Staging = staging if staging is not None else NothingStaged()
        self.holders: Holders = holders if holders is not None else NothingHeld()
        self.listeners = list(listeners)
        self._wake = trio.Event()
        # True while the background task runs, i.e. inside a serving daemon:
        # only then does `wake` remove entries on the spot.
        self._serving = False

    # -- accounting ---------------------------------------------------------

    def footprint(self) -> int:
        """Bytes the store takes on disk now, as `du` counts them: the blocks
        of the objects (after dedup) and of the files being written, the
        shard directories, the index and its WAL."""
        return (
            self.index.allocated_bytes + self.staging.staged_bytes() + self.content.overhead_bytes()
        )

    def usage(self) -> int:
        """What counts against the cap: the footprint, with the WAL counted at
        the size it may reach between checkpoints.  The WAL grows with every
        commit, evictions' own included, and shrinks at checkpoints; reserving
        its room keeps `du` under the cap whatever its size, and keeps
        eviction from chasing it."""
        floors = {self.index.wal_name: self.index.wal_limit}
        return (
            self.index.allocated_bytes
            + self.staging.staged_bytes()
            + self.content.overhead_bytes(floors)
        )

    def pressure(self) -> int:
        """What must fit under the cap: usage less the largest file being written."""
        return self.usage() - self.staging.largest_staged()

    def room(self) -> int:
        """Free space under the cap as `df` shows it: against the footprint, as `du` sees it."""
        return max(0, self.cap - self.footprint())

    def low_watermark(self) -> int:
        return int(self.cap * LOW_WATERMARK)

    def threshold(self) -> int:
        """Pressure at which eviction starts: one write's worth below the cap."""
        return max(self.cap - MAX_WRITE, self.low_watermark())

    def over_cap(self) -> bool:
        """Eviction is due (pressure is within one write of the cap, or past it)."""
        return self.pressure() > self.threshold()

    # -- the cap ------------------------------------------------------------

    def flush_recency(self) -> int:
        """Write the reads seen since the last flush to the index (housekeeping, unmount)."""
        return self.recency.flush(self.index)

    def grew(self) -> None:
        """The store took in content (a seal, a fetch): evict if that brought it to the cap."""
        if self.over_cap():
            self.wake()

    def file_sealed(self, ino: int, size: int, new_object: bool) -> None:
        self.grew()

    def wake(self) -> None:
        """Eviction is due: make room now, and get to the low watermark soon.

        Inside a serving daemon a bounded number of entries goes right here,
        in the request that crossed the threshold (diskcache's culling bounded
        per write), so that the cap holds at every moment; the background
        task, woken too, finishes the way down to the low watermark.
        """
        if self._serving and self.over_cap():
            result = EvictionResult()
            self.recency.flush(self.index)
            target = self.low_watermark()
            for _ in self.batches(target, self.pressure, "cap", result, limit=CULL_ENTRIES):
                pass
            if result.entries:
                log.debug(
                    "culled %d entries (%d bytes) inside a request",
                    result.entries,
                    result.bytes_freed,
                )
        self._wake.set()

    async def run(self) -> None:
        """Background task: when woken over the cap, evict down to the low watermark."""
        self._serving = True
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                target = self.low_watermark()
                if self.pressure() <= target:
                    continue
                result = EvictionResult()
                self.recency.flush(self.index)
                for _ in self.batches(target, self.pressure, "cap", result):
                    await trio.lowlevel.checkpoint()  # let requests in between batches
                if result.entries:
                    log.info(
                        "evicted %d entries (%d bytes) to stay under the cap of %d bytes",
                        result.entries,
                        result.bytes_freed,
                        self.cap,
                    )
        finally:
            self._serving = False

    def batches(
        self,
        target: int,
        measure: Callable[[], int],
        reason: str,
        result: EvictionResult,
        *,
        limit: int | None = None,
        read_before: int | None = None,
    ) -> Iterator[None]:
        """Remove entries, least recently read first, while ``measure() > target``.

        Yields after each batch of at most BATCH_ENTRIES entries looked at, so
        that an async caller can let requests in.  *limit* bounds the entries
        removed; *read_before* (unix ns) considers only entries read before it.
        """
        after: tuple[int, int] | None = None
        removed = 0
        while measure() > target:
            batch = self.index.entries_by_age(BATCH_ENTRIES, after, read_before)
            if not batch:
                return
            for last_read, entry_id in batch:
                after = (last_read, entry_id)
                if measure() <= target:
                    return
                if self._remove(entry_id, reason, result):
                    removed += 1
                    if limit is not None and removed >= limit:
                        return
            yield

    def evict_until_below(self, target: int, reason: str = "cap") -> EvictionResult:
        """Remove least recently read entries until usage <= *target* (synchronous)."""
        result = EvictionResult()
        self.recency.flush(self.index)
        for _ in self.batches(target, self.usage, reason, result):
            pass
        return result

    def plan_until_below(self, target: int) -> list[tuple[Candidate, int]]:
        """What `evict_until_below` would remove, and the bytes each would free."""
        self.recency.flush(self.index)
        freed = 0
        uses: dict[bytes, int] = {}
        planned: list[tuple[Candidate, int]] = []
        after: tuple[int, int] | None = None
        usage = self.usage()
        while usage - freed > target:
            batch = self.index.entries_by_age(BATCH_ENTRIES, after)
            if not batch:
                break
            for last_read, entry_id in batch:
                after = (last_read, entry_id)
                if usage - freed <= target:
                    break
                if any(
                    self.staging.is_being_written(ino) for ino in self.index.entry_files(entry_id)
                ):
                    continue
                candidate = Candidate(entry_id, _location(self.index, entry_id), last_read)
                frees = _freed_by(self.index, entry_id, uses)
                freed += frees
                planned.append((candidate, frees))
        return planned

    # -- expiry and chosen entries ------------------------------------------

    def expire(self) -> EvictionResult:
        """Drop entries not read for longer than max_age (called periodically)."""
        if self.max_age is None:
            return EvictionResult()
        return self.evict_older_than(self.clock.now_ns() - int(self.max_age * NS))

    def evict_older_than(self, cutoff: int, reason: str = "max_age") -> EvictionResult:
        """Remove every entry last read before *cutoff* (unix ns)."""
        result = EvictionResult()
        self.recency.flush(self.index)
        for _ in self.batches(-1, lambda: 0, reason, result, read_before=cutoff):
            pass
        return result

    def remove_entries(self, entry_ids: Iterable[int], reason: str) -> EvictionResult:
        result = EvictionResult()
        for entry_id in entry_ids:
            self._remove(entry_id, reason, result)
        return result

    def _remove(self, entry_id: int, reason: str, result: EvictionResult) -> bool:
        files = self.index.entry_files(entry_id)
        if any(self.staging.is_being_written(ino) for ino in files) or self.index.entry_in_progress(
            entry_id
        ):
            result.skipped += 1
            return False  # being written: never evict half-written work
        removed = self.index.evict_entry(entry_id, self.holders.is_held)
        if not removed.names:
            return False  # already gone
        for digest in removed.unused_objects:
            self.content.delete(digest)
        result.entries += 1
        result.bytes_freed += removed.bytes_freed
        for listener in self.listeners:
            listener.entry_removed(removed, reason)
        log.debug(
            "evicted entry %d (%s): %d names, %d bytes",
            entry_id,
            reason,
            len(removed.names),
            removed.bytes_freed,
        )
        return True


# -- choosing entries by age, device class and path -----------------------------


@dataclass(frozen=True)
class Selection:
    """The entries `mithrilfs evict` names; every given criterion must hold."""

    older_than: float | None = None  # seconds since the last read
    device_class: str | None = None  # one class tree, whole
    path: str | None = None  # fnmatch pattern, relative to the class root

    def describe(self) -> str:
        parts = []
        if self.older_than is not None:
            parts.append(f"not read for {self.older_than:g}s")
        if self.device_class is not None:
            parts.append(f"in class {self.device_class}")
        if self.path is not None:
            parts.append(f"matching '{self.path}'")
        return ", ".join(parts) or "everything"


def select_entries(index: Index, selection: Selection, now_ns: int) -> list[Candidate]:
    """The entries *selection* names, least recently read first.

    A path pattern matches an entry when it matches the entry's own path
    (its directory; ``dir/stem.*`` for a stem) or the path of any of its
    files; ``*`` also crosses ``/``, as in fnmatch.  An unknown device class
    is a `UserError` (exit 2).
    """
    if selection.path is not None:
        check_path_pattern(selection.path)
    cutoff = None
    if selection.older_than is not None:
        cutoff = now_ns - int(selection.older_than * NS)
    if selection.device_class is None and selection.path is None:
        return _select_by_age(index, cutoff)

    roots = index.class_roots()
    if selection.device_class is not None:
        wanted = os.fsencode(selection.device_class)
        known = [os.fsdecode(name) for name, _root in roots]
        roots = [(name, root) for name, root in roots if name == wanted]
        if not roots:
            raise UserError(
                f"no device class '{selection.device_class}' in this store "
                f"(it has: {', '.join(known) or 'none'})",
                2,
            )
    table = index.entry_table()
    chosen: list[Candidate] = []
    for class_name, class_root in roots:
        paths = _TreePaths(index.names_below(class_root), class_root)
        files: dict[int, list[str]] = {}
        for parent, name, _ino, entry in paths.rows:
            if entry is not None:
                files.setdefault(entry, []).append(paths.below(parent, name))
        for entry_id, file_paths in files.items():
            key, _entry_root, last_read = table[entry_id]
            if cutoff is not None and last_read >= cutoff:
                continue
            own = _entry_path(key, paths, file_paths)
            if selection.path is not None and not any(
                fnmatch.fnmatchcase(path, selection.path) for path in (own, *file_paths)
            ):
                continue
            chosen.append(Candidate(entry_id, f"{os.fsdecode(class_name)}/{own}", last_read))
    chosen.sort(key=lambda c: (c.last_read, c.entry_id))
    return chosen


def _select_by_age(index: Index, cutoff: int | None) -> list[Candidate]:
    chosen: list[Candidate] = []
    after: tuple[int, int] | None = None
    while batch := index.entries_by_age(1000, after, cutoff):
        for last_read, entry_id in batch:
            chosen.append(Candidate(entry_id, _location(index, entry_id), last_read))
        after = batch[-1]
    return chosen


class _TreePaths:
    """Paths below a class root for the rows of `Index.names_below`."""

    def __init__(self, rows: list[tuple[int, bytes, int, int | None]], root: int) -> None:
        self.rows = rows
        self._links = {ino: (parent, name) for parent, name, ino, _entry in rows}
        self._paths: dict[int, str] = {root: ""}

    def of(self, ino: int) -> str:
        chain: list[int] = []
        node = ino
        while node not in self._paths:
            chain.append(node)
            node = self._links[node][0]
        for node in reversed(chain):
            self._paths[node] = self.below(*self._links[node])
        return self._paths[ino]

    def below(self, parent: int, name: bytes) -> str:
        """The path of *name* in *parent*: a hard-linked file has one per name."""
        above = self.of(parent)
        return f"{above}/{os.fsdecode(name)}" if above else os.fsdecode(name)


def _entry_path(key: EntryKey, paths: _TreePaths, file_paths: list[str]) -> str:
    if key.kind == "file":
        return file_paths[0]
    return key.describe(paths.of(key.root))


def _location(index: Index, entry_id: int) -> str:
    found = index.entry_location(entry_id)
    if found is None:
        return f"entry {entry_id}"
    class_name, path = found
    return f"{os.fsdecode(class_name)}/{os.fsdecode(path)}"


def plan(index: Index, candidates: Iterable[Candidate]) -> list[tuple[Candidate, int]]:
    """Each candidate with the bytes its removal frees, if those before it go too.

    With dedup an object is freed only when the last file using it goes,
    so this counts an object once, at the entry that drops its last use.
    """
    uses: dict[bytes, int] = {}
    return [(c, _freed_by(index, c.entry_id, uses)) for c in candidates]


def _freed_by(index: Index, entry_id: int, uses: dict[bytes, int]) -> int:
    freed = 0
    for digest, size, refcount, count in index.entry_content(entry_id):
        seen = uses.get(digest, 0) + count
        uses[digest] = seen
        if seen == refcount:
            freed += size
    return freed
