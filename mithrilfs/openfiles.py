"""Open files: staging, copy-on-write, and sealing content into the store.

A sealed file is an immutable object; readers read it directly.  The first
change to a file (a write, a truncate, O_TRUNC) copies its content into a
staging file, and every handle of that inode then reads and writes the
staging copy, so a process sees its own writes before close, as the linker
needs.  When the last writer closes the file (flush of its only writable
handle, or release), the staging file is hashed and *sealed*: renamed into
the object store unless identical content is already there (dedup), and the
inode is pointed at the object in one index transaction.

Sealing at flush, not only at release, matters: close(2) waits for flush but
not for release, and a writer whose close() returned must find its bytes in
the store even if the daemon is killed a moment later.  fsync(2) goes
further: the staging file, the object's directory entry and the index
transaction all reach the disk before it returns (power loss).

Hashing large files runs in worker threads, at most one per core at a time
(`hash_threads`), whether for sealing or for verification.  Most files are
written front to back: their writes are fed to a blake3 hasher as they
arrive, so that sealing them reads nothing back.  Any other write, a
truncate, or a staging copy seeded from earlier content (copy-on-write)
drops that hasher, and the seal hashes the staging file instead.

Verification before serving (docs/crash-safety.md): an object is trusted
without hashing when the index holds a mark for it (verified in an earlier
mount that stopped cleanly, or in this one) and its file still has the ctime
and size the mark recorded; anything else is hashed before its first byte is
served, and a match is marked.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import trio

from mithrilfs.errors import FsError
from mithrilfs.index import Index, Inode
from mithrilfs.interfaces import SealListener, VerificationListener
from mithrilfs.store import INLINE_HASH_LIMIT, ContentStore, hash_fd


def hashing_threads() -> int:
    """One hashing thread per core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(eq=False)
class OpenInode:
    """What every open handle of one inode shares."""

    ino: int
    digest: bytes | None
    size: int
    mtime_ns: int
    handles: int = 0
    writers: int = 0
    object_fd: int | None = None
    staging_path: Path | None = None
    staging_fd: int | None = None
    dirty: bool = False
    # Bumped on every change to the staging file; a seal whose hash was taken
    # before a change must not publish it.
    generation: int = 0
    # A write or truncate past the cap was refused (EFBIG): the unsealed
    # changes are dropped instead of sealed, so that the part of a file that
    # can never fit neither lands in the store nor evicts what is there.
    oversized: bool = False
    seal_lock: trio.Lock = field(default_factory=trio.Lock)
    # The staging file's bytes so far, hashed as they were written in order;
    # None once a write, truncate or seed broke the order (the seal hashes).
    running_hash: blake3.blake3 | None = None
    hashed: int = 0

    @property
    def staged(self) -> bool:
        return self.staging_fd is not None


@dataclass(eq=False)
class Handle:
    inode: OpenInode
    writable: bool
    # Changed the file since its last seal: its close must seal, even while
    # other writable handles (a lock holder, say) stay open.
    changed: bool = False


class OpenFiles:
    def __init__(
        self,
        index: Index,
        store: ContentStore,
        *,
        max_file_size: int | None = None,
        listeners: Sequence[SealListener] = (),
        hasher: Callable[[int], tuple[bytes, int]] = hash_fd,
        verifications: VerificationListener | None = None,
    ) -> None:
        self.index = index
        self.store = store
        # Seals and verifications of large files hash in threads: bounded, so
        # that a burst of closes cannot start a thread per file.
        self.hash_threads = trio.CapacityLimiter(hashing_threads())
        self.hasher = hasher
        # A file that can never fit under the cap is refused (EFBIG) rather
        # than evicting everything else and failing anyway.
        self.max_file_size = max_file_size
        # Told about every seal: the counters, the evictor, the shared tier.
        self.listeners = list(listeners)
        self._inodes: dict[int, OpenInode] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        # Objects whose bytes were checked against their name since the mount.
        self._verified: set[bytes] = set()
        # Called with the size of every object hashed to verify it before serving.
        self.verifications = verifications
        # Seals that had to read their staging file back (writes not in order).
        self.seals_read_back = 0

    # -- queries ------------------------------------------------------------

    def is_open(self, ino: int) -> bool:
        return ino in self._inodes

    def unsealed(self, ino: int) -> tuple[int, int] | None:
        """(size, mtime_ns) of a file with unsealed changes, or None when the index is current.

        The kernel caches what a stat during a write returns, so it must be
        what sealing will record, mtime included.
        """
        state = self._inodes.get(ino)
        if state is None or not state.staged:
            return None
        return state.size, state.mtime_ns

    def inode_of(self, fh: int) -> int:
        return self._handles[fh].inode.ino

    def set_mtime(self, ino: int, mtime_ns: int) -> None:
        """Keep an explicit utimens from being overwritten when the file is sealed."""
        state = self._inodes.get(ino)
        if state is not None:
            state.mtime_ns = mtime_ns

    async def verify(self, fh: int) -> bytes | None:
        """Check, once per object per daemon, that sealed content matches its hash.

        Returns the digest of a corrupt object (the caller drops every entry
        that uses it), None when the content is intact or not sealed yet.
        Objects are immutable, so one check covers every later open; the
        cost is a stat of a marked object, or one blake3 pass over one that
        is not, the first time it is opened.
        """
        state = self._handles[fh].inode
        digest = state.digest
        if state.staged or digest is None or digest in self._verified:
            return None
        # object_intact hashes through a descriptor of its own: this state's
        # may be closed and its number reused by a seal while the thread runs.
        return None if await self.object_intact(digest) else digest

    async def object_intact(self, digest: bytes) -> bool:
        """True when the stored object matches its name (checked once per daemon).

        A marked object whose file kept the mark's ctime and size is not
        hashed: nothing has written to it since it matched (bit rot that
        leaves the inode alone is the scrub's to find).
        """
        if digest in self._verified:
            return True
        mark = self.index.verification_mark(digest)
        if mark is not None:
            # The first lookup after a mount, for every object of an entry:
            # a stat, not an open.
            try:
                found = self.store.object_stat(digest)
            except FileNotFoundError:
                return False
            if mark == (found.st_size, found.st_ctime_ns):
                self._verified.add(digest)
                return True
        try:
            fd = self.store.open_object(digest)
        except FileNotFoundError:
            return False
        try:
            before = os.fstat(fd)
            if mark == (before.st_size, before.st_ctime_ns):
                self._verified.add(digest)
                return True
            if self.verifications is not None:
                self.verifications.hashed_before_serving(before.st_size)
            actual, _size = await self._hash(fd, before.st_size)
        finally:
            os.close(fd)
        if actual != digest:
            return False
        if self.index.object_size(digest) is not None:  # not evicted while it was hashed
            self.index.mark_verified(digest, before.st_ctime_ns)
        self._verified.add(digest)
        return True

    def forget_verified(self, digest: bytes) -> None:
        """A corrupt object: never take it for intact again in this mount."""
        self._verified.discard(digest)

    # -- open and close -----------------------------------------------------

    def staged_bytes(self) -> int:
        """Blocks held by staging files (they count against the cap)."""
        return sum(
            self.store.allocated(state.size) for state in self._inodes.values() if state.staged
        )

    def largest_staged(self) -> int:
        """The size of the largest file being written (eviction lets it exceed the cap)."""
        return max((state.size for state in self._inodes.values() if state.staged), default=0)

    def is_being_written(self, ino: int) -> bool:
        state = self._inodes.get(ino)
        return state is not None and (state.writers > 0 or state.staged)

    def open(self, ino: int, flags: int, node: Inode | None = None) -> int:
        state = self._inodes.get(ino)
        if state is None:
            if node is None:
                node = self.index.get(ino)
            if node.object is None:
                raise FsError(errno.ENOENT)  # evicted while the kernel still knew its name
            # The object file is opened at the first read: a warm open is
            # usually served from the page cache and never reads.  Eviction
            # pins open files first (see pin), so their bytes stay reachable.
            state = OpenInode(ino, node.object, node.size, node.mtime_ns)
            self._inodes[ino] = state
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        state.handles += 1
        if writable:
            state.writers += 1
        fh = next(self._next_fh)
        handle = Handle(state, writable)
        self._handles[fh] = handle
        if writable and flags & os.O_TRUNC:
            try:
                self._truncate_staged(state, 0)
            except BaseException:
                self._forget_handle(fh)
                raise
            # Its close must seal the truncation, other writers or not.
            handle.changed = True
        return fh

    def pin(self, ino: int) -> None:
        """Hold the object file of an open inode, before eviction deletes it."""
        state = self._inodes.get(ino)
        if state is not None and state.object_fd is None and state.digest is not None:
            with contextlib.suppress(FileNotFoundError):  # already gone: nothing to keep
                state.object_fd = self.store.open_object(state.digest)

    async def flush(self, fh: int) -> None:
        handle = self._handles[fh]
        # A close() that returned promises durable bytes, so a handle that
        # changed the file seals it.  The last writer seals too (its changes
        # may have come through another handle).  Another writer still busy
        # pays a copy on its next write; that is the price of the promise.
        if handle.writable and (handle.changed or handle.inode.writers == 1):
            await self.seal(handle.inode)
            handle.changed = handle.inode.dirty

    async def fsync(self, fh: int) -> None:
        """Make the file's current content survive a power loss, then return.

        The staging file is synced before it is renamed into objects/, the
        object's directory after, and the index transaction that points the
        inode at it is checkpointed into the synced database file.
        """
        state = self._handles[fh].inode
        if state.staged:
            os.fsync(state.staging_fd)  # type: ignore[arg-type]
        await self.seal(state)
        if state.digest is not None and not state.staged:
            self.store.sync_object(state.digest)
        self.index.make_durable()

    async def release(self, fh: int) -> None:
        """Close a handle, sealing what its last writer left.

        The handle goes even when sealing fails (a full disk): its staging
        file, its descriptors and its place among the open inodes are
        released whatever happens, so nothing is held until unmount.
        """
        handle = self._handles[fh]
        try:
            if handle.writable and handle.inode.writers == 1:
                await self.seal(handle.inode)
        finally:
            self._forget_handle(fh)

    def abandon(self, fh: int) -> None:
        """Drop a handle whose open failed half way: nothing of it is sealed."""
        self._forget_handle(fh)

    def _forget_handle(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        state = handle.inode
        if handle.writable:
            state.writers -= 1
        state.handles -= 1
        if state.handles == 0:
            self._close_fds(state)
            del self._inodes[state.ino]

    def close_all(self) -> None:
        for state in self._inodes.values():
            self._close_fds(state)
        self._inodes.clear()
        self._handles.clear()

    def _close_fds(self, state: OpenInode) -> None:
        if state.object_fd is not None:
            os.close(state.object_fd)
            state.object_fd = None
        if state.staging_fd is not None:
            os.close(state.staging_fd)
            state.staging_fd = None
        if state.staging_path is not None:
            state.staging_path.unlink(missing_ok=True)
            state.staging_path = None

    # -- data ---------------------------------------------------------------

    def read(self, fh: int, offset: int, size: int) -> bytes:
        state = self._handles[fh].inode
        if state.staging_fd is not None:
            return os.pread(state.staging_fd, size, offset)
        if state.object_fd is None:
            assert state.digest is not None
            state.object_fd = self.store.open_object(state.digest)
        return os.pread(state.object_fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._handles[fh]
        handle.changed = True
        state = handle.inode
        self._check_size(state, offset + len(data))
        self._stage(state)
        assert state.staging_fd is not None
        written = os.pwrite(state.staging_fd, data, offset)
        if state.running_hash is not None:
            if offset == state.hashed:
                state.running_hash.update(data[:written] if written < len(data) else data)
                state.hashed += written
            else:
                state.running_hash = None  # a hole or a rewrite: hash at seal
        state.size = max(state.size, offset + written)
        self._changed(state)
        return written

    async def truncate(self, ino: int, size: int, fh: int | None) -> None:
        """Set a file's size, by handle (ftruncate) or by path (truncate)."""
        if fh is not None:
            self._handles[fh].changed = True
        state = self._handles[fh].inode if fh is not None else self._inodes.get(ino)
        if state is not None:
            self._truncate_staged(state, size)
            if state.writers == 0:
                await self.seal(state)
            return
        # truncate(2) on a file nobody has open: stage, cut, seal at once.
        fh = self.open(ino, os.O_WRONLY)
        try:
            self._truncate_staged(self._handles[fh].inode, size)
        finally:
            await self.release(fh)

    def _check_size(self, state: OpenInode, size: int) -> None:
        if self.max_file_size is not None and size > self.max_file_size:
            state.oversized = True
            raise FsError(errno.EFBIG, "a file larger than the store's cap")

    def _truncate_staged(self, state: OpenInode, size: int) -> None:
        self._check_size(state, size)
        self._stage(state, keep=min(size, state.size))
        assert state.staging_fd is not None
        os.ftruncate(state.staging_fd, size)
        if size != state.hashed:
            state.running_hash = None
        state.size = size
        state.oversized = False  # what follows a successful truncate is well defined again
        self._changed(state)

    def _discard_staged(self, state: OpenInode) -> None:
        """Drop unsealed changes: the file keeps its last sealed content."""
        if state.staging_fd is not None:
            os.close(state.staging_fd)
        if state.staging_path is not None:
            state.staging_path.unlink(missing_ok=True)
        state.staging_fd, state.staging_path = None, None
        state.running_hash = None
        node = self.index.get(state.ino)
        state.size, state.mtime_ns = node.size, node.mtime_ns
        state.dirty, state.oversized = False, False
        state.generation += 1

    def _stage(self, state: OpenInode, keep: int | None = None) -> None:
        """Give *state* a private staging copy holding its first *keep* bytes."""
        if state.staged:
            return
        path, fd = self.store.new_staging(state.ino)
        try:
            length = state.size if keep is None else keep
            if length and state.digest is not None:
                self.store.copy_object_into(state.digest, fd, length)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        state.staging_path, state.staging_fd = path, fd
        state.size = length
        # A fresh file is hashed as it is written; a seeded copy is not (its
        # seed would have to be read to start the hash).
        state.running_hash = blake3.blake3() if length == 0 else None
        state.hashed = 0

    def _changed(self, state: OpenInode) -> None:
        state.generation += 1
        state.dirty = True
        state.mtime_ns = time.time_ns()

    # -- sealing ------------------------------------------------------------

    async def seal(self, state: OpenInode) -> None:
        """Turn the staging copy into an object and point the inode at it."""
        async with state.seal_lock:
            if state.oversized:
                self._discard_staged(state)
                return
            while state.dirty and state.staging_fd is not None:
                if self.index.get(state.ino).nlink == 0:
                    return  # unlinked: nobody can see this content again
                generation = state.generation
                fd = state.staging_fd
                if state.running_hash is not None and state.hashed == state.size:
                    digest, size = state.running_hash.digest(), state.size
                else:
                    self.seals_read_back += 1
                    digest, size = await self._hash(fd, state.size)
                if generation != state.generation or state.staging_fd != fd:
                    continue  # written to while hashing: hash again
                self._publish(state, digest, size)

    async def _hash(self, fd: int, size: int) -> tuple[bytes, int]:
        if size <= INLINE_HASH_LIMIT:
            return hash_fd(fd)  # cheaper than handing it to a thread
        return await trio.to_thread.run_sync(self.hasher, fd, limiter=self.hash_threads)

    def _publish(self, state: OpenInode, digest: bytes, size: int) -> None:
        assert state.staging_path is not None
        assert state.staging_fd is not None
        new_object = self.store.publish(state.staging_path, digest)
        # The staging fd now refers to the new object's file, which it keeps
        # serving (and holding, against an eviction) from here on, never
        # written again; a dropped duplicate's is closed.
        staged_fd = state.staging_fd
        state.staging_fd, state.staging_path = None, None
        state.running_hash = None
        sealed_fd: int | None = None
        ctime = None
        if new_object:
            sealed_fd = staged_fd
            self._verified.add(digest)  # we just hashed these very bytes
            # The file holds the bytes just hashed: marked verified in the
            # same transaction (a duplicate's file was not looked at).
            ctime = os.fstat(staged_fd).st_ctime_ns
        else:
            os.close(staged_fd)
        try:
            unused = self.index.set_content(
                state.ino, digest, size, state.mtime_ns, verified_ctime=ctime
            )
        except BaseException:
            if sealed_fd is not None:
                os.close(sealed_fd)
            if new_object:  # no row will ever point at it
                self.store.delete(digest)
                self._verified.discard(digest)
            raise
        if unused is not None:
            self.store.delete(unused)
        if state.object_fd is not None:
            os.close(state.object_fd)
        state.object_fd = sealed_fd if sealed_fd is not None else self.store.open_object(digest)
        state.digest, state.size, state.dirty = digest, size, False
        for listener in self.listeners:
            listener.file_sealed(state.ino, size, new_object)
