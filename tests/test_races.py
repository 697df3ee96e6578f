"""Races inside the daemon, made deterministic by calling the layers directly.

No mount: `Operations` handlers and `OpenFiles` are driven from a trio run
with a real index and store, and the hashing function is replaced by one
that reports when it runs and waits to be let go, so that other work (an
eviction, more seals) lands exactly while a hash is in flight.
"""

from __future__ import annotations

import os
import stat
import threading

import pyfuse3
import trio
import trio.testing

from mithrilfs.fs import Operations
from mithrilfs.index import SUPER_ROOT
from mithrilfs.openfiles import OpenFiles, hashing_threads
from mithrilfs.repository import Repository
from mithrilfs.services import build_services
from mithrilfs.stats import Stats
from mithrilfs.store import INLINE_HASH_LIMIT, hash_fd

BIG = INLINE_HASH_LIMIT + 64 * 1024  # hashed in a worker thread
WAIT = 10.0


def class_tree(repo: Repository) -> tuple[int, int]:
    """(class root, its triton/ directory)."""
    root = repo.index.ensure_dir(SUPER_ROOT, b"cpu-test", 0o755, 0, 0).id
    return root, repo.index.ensure_dir(root, b"triton", 0o755, 0, 0).id


class GatedHasher:
    """A hash function that counts the calls in flight and holds each until let go."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        self.started = threading.Event()
        self.go = threading.Event()

    def __call__(self, fd: int) -> tuple[bytes, int]:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.lock.notify_all()
        self.started.set()
        try:
            assert self.go.wait(WAIT), "never let go"
            return hash_fd(fd)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.lock.notify_all()

    async def until_in_flight(self, count: int) -> None:
        def wait() -> bool:
            with self.lock:
                return self.lock.wait_for(lambda: self.in_flight == count, WAIT)

        assert await trio.to_thread.run_sync(wait), f"never {count} hashes in flight"


def test_a_lookup_answers_a_miss_when_the_entry_is_evicted_during_its_verification(
    repo: Repository,
) -> None:
    _root, triton = class_tree(repo)
    ops = Operations(
        build_services(repo.index, repo.content, _root, stats=Stats("cpu-test"), cap=1 << 30)
    )
    ctx = pyfuse3.RequestContext()
    hasher = GatedHasher()

    async def scenario() -> pyfuse3.EntryAttributes:
        key = (await ops.mkdir(pyfuse3.InodeT(triton), b"KEY", pyfuse3.ModeT(0o755), ctx)).st_ino
        info, attrs = await ops.create(
            key, b"k.cubin", pyfuse3.ModeT(stat.S_IFREG | 0o644), pyfuse3.FlagT(os.O_WRONLY), ctx
        )
        await ops.write(info.fh, 0, os.urandom(BIG))
        await ops.release(info.fh)
        entry = repo.index.get(attrs.st_ino).entry
        assert entry is not None
        # As after a remount: the kernel holds nothing, nothing is verified yet.
        ops.lookups.clear()
        ops.verified_entries.clear()
        ops.files._verified.clear()
        ops.files.hasher = hasher
        answer: list[pyfuse3.EntryAttributes] = []

        async def look() -> None:
            answer.append(await ops.lookup(key, b"k.cubin", ctx))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            assert await trio.to_thread.run_sync(hasher.started.wait, WAIT)
            # The entry goes while its object is being hashed.
            assert ops.evictor.remove_entries([entry], "evict").entries == 1
            hasher.go.set()
        return answer[0]

    attrs = trio.run(scenario)
    assert attrs.st_ino == 0, "the reply named a file that eviction had removed"
    assert not ops.lookups, "the kernel was handed an inode that no longer exists"


def test_concurrent_seals_and_verifications_never_exceed_one_hashing_thread_per_core(
    repo: Repository,
) -> None:
    _root, triton = class_tree(repo)
    hasher = GatedHasher()
    files = OpenFiles(repo.index, repo.content, hasher=hasher)
    limit = hashing_threads()
    assert files.hash_threads.total_tokens == limit
    count = 3 * limit + 1

    async def scenario() -> None:
        handles = []
        for i in range(count):
            with repo.index.transaction():
                node = repo.index.make_node(triton, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
            fh = files.open(node.id, os.O_WRONLY)
            # Back half first: writes out of order are hashed at the seal, in
            # threads (in-order writes are hashed as they arrive).
            data = os.urandom(BIG)
            files.write(fh, BIG // 2, data[BIG // 2 :])
            files.write(fh, 0, data[: BIG // 2])
            handles.append(fh)
        async with trio.open_nursery() as nursery:
            for fh in handles:
                nursery.start_soon(files.release, fh)
            await hasher.until_in_flight(limit)
            # Every task has gone as far as it can: one thread each, unless limited.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert hasher.in_flight == limit
            hasher.go.set()
        assert hasher.peak == limit
        # Verification shares the same bound.
        digests = [digest for (digest,) in repo.index.db.execute("SELECT hash FROM objects")]
        files._verified.clear()
        hasher.go.clear()
        hasher.peak = 0
        async with trio.open_nursery() as nursery:
            for digest in digests:
                nursery.start_soon(files.object_intact, digest)
            await hasher.until_in_flight(limit)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            hasher.go.set()
        assert hasher.peak == limit

    trio.run(scenario)
    assert repo.index.db.execute("SELECT count(*) FROM objects").fetchone()[0] == count + 1
