"""The evictor without a mount: victim selection, batches, caps and expiry on an injected clock."""

from __future__ import annotations

import os
import random

import trio

from mithrilfs.eviction import BATCH_ENTRIES, EvictionResult, Evictor
from mithrilfs.index import EvictedEntry
from mithrilfs.openfiles import OpenFiles
from mithrilfs.repository import Repository
from tests.unit.conftest import FixedClock, directory, write_file

KiB = 1024
DAY = 86400.0


class Removals:
    """A removal listener that records what it is told: the entry's names, and why."""

    def __init__(self) -> None:
        self.seen: list[tuple[EvictedEntry, str]] = []

    def entry_removed(self, removed: EvictedEntry, reason: str) -> None:
        self.seen.append((removed, reason))

    def keys(self) -> list[str]:
        """The key directory of each entry removed, in order."""
        return [
            name.decode()
            for removed, _reason in self.seen
            for _parent, name, _ino in removed.names
            if name.startswith(b"KEY")
        ]


def key_of(index: int) -> str:
    return f"KEY{index:03d}"


def make_entries(
    repo: Repository, files: OpenFiles, root: int, count: int, size: int = 64 * KiB
) -> list[int]:
    """*count* Triton entries (one key directory, one file each), distinct content; their ids."""
    triton = directory(repo, root, "triton")
    made = []
    for i in range(count):
        key = directory(repo, triton, key_of(i))
        ino = write_file(files, repo, key, "k.so", random.Random(i).randbytes(size))
        entry = repo.index.get(ino).entry
        assert entry is not None
        made.append(entry)
    return made


def evictor_for(
    repo: Repository, files: OpenFiles, clock: FixedClock, cap: int = 1 << 30, **kwargs: object
) -> tuple[Evictor, Removals]:
    removals = Removals()
    evictor = Evictor(
        repo.index,
        repo.content,
        cap,
        staging=files,
        listeners=[removals],
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
    return evictor, removals


def read_in_order(evictor: Evictor, clock: FixedClock, entries: list[int]) -> None:
    """Read *entries* one after the other, a second apart, after their creation."""
    for entry in entries:
        clock.advance(1)
        evictor.recency.touch(entry)
    evictor.flush_recency()


def test_the_least_recently_read_entries_go_first(
    repo: Repository, root: int, clock: FixedClock
) -> None:
    files = OpenFiles(repo.index, repo.content)
    entries = make_entries(repo, files, root, 6)
    evictor, removals = evictor_for(repo, files, clock)
    order = [entries[i] for i in (3, 0, 5, 1, 4, 2)]  # least recently read first
    read_in_order(evictor, clock, order)

    target = evictor.usage() - 150 * KiB  # more than two entries' worth
    result = evictor.evict_until_below(target)

    assert evictor.usage() <= target
    assert result.entries >= 3
    assert removals.keys() == [key_of(entries.index(e)) for e in order[: result.entries]]
    assert {reason for _removed, reason in removals.seen} == {"cap"}
    for entry in order[result.entries :]:
        assert repo.index.entry_files(entry), f"entry {entry} was read later and must stay"


def test_an_entry_being_written_is_skipped(repo: Repository, root: int, clock: FixedClock) -> None:
    files = OpenFiles(repo.index, repo.content)
    busy, idle = make_entries(repo, files, root, 2)
    evictor, removals = evictor_for(repo, files, clock)
    (ino,) = repo.index.entry_files(busy)
    fh = files.open(ino, os.O_WRONLY)
    files.write(fh, 0, b"more")  # staged, not sealed
    assert evictor.staging.staged_bytes() > 0

    result = evictor.remove_entries([busy, idle], "evict")

    assert (result.entries, result.skipped) == (1, 1)
    assert removals.keys() == [key_of(1)]
    trio.run(files.release, fh)
    assert repo.index.entry_files(busy) == [ino]


def test_batches_yield_between_bounded_batches_and_respect_the_limit(
    repo: Repository, root: int, clock: FixedClock
) -> None:
    files = OpenFiles(repo.index, repo.content)
    count = BATCH_ENTRIES + 6
    entries = make_entries(repo, files, root, count, size=1)
    evictor, _removals = evictor_for(repo, files, clock)

    limited = EvictionResult()
    assert len(list(evictor.batches(-1, lambda: 1, "cap", limited, limit=4))) == 0
    assert limited.entries == 4

    rest = EvictionResult()
    yields = len(list(evictor.batches(-1, lambda: 1, "cap", rest)))
    assert rest.entries == count - 4
    assert yields == 2  # one full batch of BATCH_ENTRIES looked at, then the remainder
    assert repo.index.entry_count() == 0
    assert all(not repo.index.entry_files(entry) for entry in entries)


def test_the_cap_and_its_thresholds(repo: Repository, root: int, clock: FixedClock) -> None:
    files = OpenFiles(repo.index, repo.content)
    make_entries(repo, files, root, 2)
    roomy, _ = evictor_for(repo, files, clock)
    assert not roomy.over_cap()
    assert roomy.room() == roomy.cap - roomy.footprint()
    assert roomy.low_watermark() <= roomy.threshold() < roomy.cap

    tight, removals = evictor_for(repo, files, clock, cap=roomy.usage() // 2)
    assert tight.over_cap()
    # Outside a serving daemon growth only wakes the background task: nothing goes yet.
    tight.grew()
    assert removals.seen == []
    result = tight.evict_until_below(tight.low_watermark())
    assert result.entries >= 1
    assert removals.keys() == [key_of(i) for i in range(result.entries)]
    # Down to the low watermark, unless the index alone is above it.
    assert tight.usage() <= tight.low_watermark() or repo.index.entry_count() == 0


def test_expiry_follows_the_injected_clock(repo: Repository, root: int, clock: FixedClock) -> None:
    files = OpenFiles(repo.index, repo.content)
    stale, fresh = make_entries(repo, files, root, 2)
    evictor, removals = evictor_for(repo, files, clock, max_age=7 * DAY)
    clock.advance(5 * DAY)
    evictor.recency.touch(fresh)
    assert evictor.expire().entries == 0  # nothing is 7 days old yet
    clock.advance(3 * DAY)

    result = evictor.expire()

    assert result.entries == 1
    assert removals.keys() == [key_of(0)]
    assert [reason for _removed, reason in removals.seen] == ["max_age"]
    assert repo.index.entry_files(fresh)


def test_an_open_file_is_pinned_before_its_object_goes(
    repo: Repository, root: int, clock: FixedClock
) -> None:
    files = OpenFiles(repo.index, repo.content)
    (entry,) = make_entries(repo, files, root, 1)
    (ino,) = repo.index.entry_files(entry)
    content = repo.index.get(ino)
    fh = files.open(ino, os.O_RDONLY)

    class OpenHolders:
        def is_held(self, held: int) -> bool:
            files.pin(held)
            return files.is_open(held)

    evictor, _removals = evictor_for(repo, files, clock, holders=OpenHolders())
    assert evictor.remove_entries([entry], "evict").entries == 1
    assert content.object is not None
    assert not repo.content.has(content.object)
    assert files.read(fh, 0, 16) == random.Random(0).randbytes(64 * KiB)[:16]
    trio.run(files.release, fh)
    repo.index.free_inode(ino)
