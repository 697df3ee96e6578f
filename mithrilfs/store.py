"""The blake3 content-addressed object store on disk.

Objects live at ``objects/ab/cd/<64 hex digits>``: immutable, named by the
blake3 hash of their bytes, written by renaming a finished staging file into
place.  Files still being written live in ``staging/``.  Names from the mount
never reach the disk; the only paths here are hashes and inode numbers.

A shard directory is made for the first object under it and removed with its
last one: an empty directory still takes a block, and the cap bounds what
`du` sees.  This module also prices that footprint (`allocated`,
`overhead_bytes`) for the cap, without walking the tree on the request path.

Nothing in this module touches the index: the caller decides when an object
is referenced and when it may be deleted (after the index commit, so a crash
leaves an orphan file, never a row that points at nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

DIGEST_SIZE = 32
EMPTY_DIGEST: bytes = blake3.blake3(b"").digest()

# Files up to this size are hashed on the calling thread: handing them to a
# worker thread costs more than hashing them.
INLINE_HASH_LIMIT = 256 * 1024
_CHUNK = 1024 * 1024


def hash_fd(fd: int) -> tuple[bytes, int]:
    """Return the blake3 digest and size of everything in *fd* (by pread)."""
    hasher = blake3.blake3()
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.digest(), offset


def block_size(path: Path) -> int:
    """The allocation unit of the filesystem holding *path* (what `du` rounds to)."""
    backing = os.statvfs(path)
    return backing.f_frsize or backing.f_bsize or DEFAULT_BLOCK


class StagingWriter:
    """One new object streamed into a staging file and hashed as it arrives.

    The one way content enters the store other than an open file's staging
    copy (openfiles.py): `ContentStore.stage` and `put`, imports, and the
    shared tier's fetches, which write several objects a round trip at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.hasher = blake3.blake3()

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> bytes:
        """Close the file; return the digest of everything written."""
        os.close(self.fd)
        self.fd = -1
        digest: bytes = self.hasher.digest()
        return digest

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Staged:
    """A finished staging file: what `ContentStore.publish` takes."""

    path: Path
    digest: bytes
    size: int


DEFAULT_BLOCK = 4096
_LIBC = ctypes.CDLL(None, use_errno=True)
# How long a listing of the store's top level (index, WAL, lock) stays good.
TOP_LEVEL_TTL = 0.1


class ContentStore:
    """Objects and staging files under one store directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.staging_dir = root / "staging"
        self._objects_str = os.fspath(self.objects_dir)
        self._staging_names = itertools.count()
        # Set by `scan` from the backing filesystem; these defaults are ext4's.
        self.block = DEFAULT_BLOCK
        self.dir_bytes = DEFAULT_BLOCK
        self.shard_dirs = 0  # directories below objects/, kept current by publish and delete
        # The last figures of the top level, without and with floors, and when
        # they were taken: the cap is checked at every write, and the index
        # grows slowly next to a WAL whose room is reserved anyway.
        self._top_level_bytes = {False: 0, True: 0}
        self._scanned_at = {False: -TOP_LEVEL_TTL, True: -TOP_LEVEL_TTL}

    def create_dirs(self) -> None:
        for path in (self.root, self.objects_dir, self.staging_dir):
            path.mkdir(mode=0o700, exist_ok=True)

    def scan(self) -> int:
        """Learn the backing filesystem's block and directory sizes, count the shard
        directories and remove empty ones (stores made before shard directories
        were removed with their last object kept them all).  Returns how many
        empty ones went.  Costs one listing of the shard directories, not of
        the objects.
        """
        self.block = block_size(self.root)
        # In the root, not in staging/ (whose entries recovery takes for
        # files); one left by a crash here is simply used again.
        probe = self.root / ".dir-size-probe"
        probe.mkdir(mode=0o700, exist_ok=True)
        try:
            self.dir_bytes = os.stat(probe).st_blocks * 512
        finally:
            probe.rmdir()
        removed = kept = 0
        for first in _subdirs(self.objects_dir):
            inner = _subdirs(first)
            for second in inner:
                if _remove_if_empty(second):
                    removed += 1
                else:
                    kept += 1
            if _remove_if_empty(first):
                removed += 1
            else:
                kept += 1
        self.shard_dirs = kept
        return removed

    def allocated(self, size: int) -> int:
        """What a file of *size* bytes takes on disk: whole blocks."""
        return -(-size // self.block) * self.block

    def overhead_bytes(self, floors: Mapping[str, int] | None = None) -> int:
        """Everything in the store that is not an object or a staging file: the
        index and its WAL, the lock, the directories (stat of the top level,
        plus the shard directories counted in memory).  A top-level file
        named in *floors* counts as at least that many bytes."""
        floors = floors or {}
        now = time.monotonic()
        if now - self._scanned_at[bool(floors)] < TOP_LEVEL_TTL:
            return self.shard_dirs * self.dir_bytes + self._top_level_bytes[bool(floors)]
        try:
            top = 0
            unseen = dict(floors)  # a floor counts even while its file is absent
            with os.scandir(self.root) as listing:
                for item in listing:
                    with contextlib.suppress(FileNotFoundError):
                        taken = item.stat(follow_symlinks=False).st_blocks * 512
                        top += max(taken, unseen.pop(item.name, 0))
            top += sum(unseen.values())
            self._top_level_bytes[bool(floors)] = top
            self._scanned_at[bool(floors)] = now
        except OSError:
            pass  # unreadable for a moment: the last figure is the best guess
        return self.shard_dirs * self.dir_bytes + self._top_level_bytes[bool(floors)]

    def object_path(self, digest: bytes) -> Path:
        hexname = digest.hex()
        return self.objects_dir / hexname[:2] / hexname[2:4] / hexname

    def _make_shard_dirs(self, target: Path) -> None:
        # mkdir(parents=True) would give the first level the umask's mode.
        made: list[Path] = []
        try:
            for directory in (target.parent.parent, target.parent):
                try:
                    directory.mkdir(mode=0o700)
                except FileExistsError:
                    continue
                made.append(directory)
                self.shard_dirs += 1
        except OSError:
            # A full disk: leave no empty directory behind.
            for directory in made:
                if _remove_if_empty(directory):
                    self.shard_dirs -= 1
            raise

    def has(self, digest: bytes) -> bool:
        return self.object_path(digest).exists()

    def _object_str(self, digest: bytes) -> str:
        # On the open path of every cache hit: plain strings, no pathlib.
        hexname = digest.hex()
        return f"{self._objects_str}/{hexname[:2]}/{hexname[2:4]}/{hexname}"

    def open_object(self, digest: bytes) -> int:
        return os.open(self._object_str(digest), os.O_RDONLY | os.O_CLOEXEC)

    def object_stat(self, digest: bytes) -> os.stat_result:
        return os.stat(self._object_str(digest))

    def new_staging(self, inode: int) -> tuple[Path, int]:
        """Create an empty staging file for *inode*; return its path and a rw fd."""
        path = self.staging_dir / f"{inode}.{os.getpid()}.{next(self._staging_names)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return path, fd

    def stage(self, read: Callable[[int], bytes], tag: str = "put") -> Staged:
        """Copy everything *read* yields into a new staging file, hashing it on the way.

        The file is left for the caller to `publish` (or delete): an import
        stages everything before it publishes anything.
        """
        writer = StagingWriter(
            self.staging_dir / f"{tag}.{os.getpid()}.{next(self._staging_names)}"
        )
        try:
            while chunk := read(_CHUNK):
                writer.write(chunk)
            digest = writer.close()
        except BaseException:
            writer.discard()
            raise
        return Staged(writer.path, digest, writer.size)

    def put(self, read: Callable[[int], bytes]) -> tuple[bytes, int]:
        """Store everything *read* yields as an object (staged, then published,
        deduplicated); return its digest and size.  The caller references it in
        the index afterwards: until then it is an orphan that recovery removes."""
        staged = self.stage(read)
        self.publish(staged.path, staged.digest)
        return staged.digest, staged.size

    def copy_object_into(self, digest: bytes, dest_fd: int, length: int) -> None:
        """Copy the first *length* bytes of an object into *dest_fd* (copy on write)."""
        src = self.open_object(digest)
        try:
            offset = 0
            while offset < length:
                copied = os.copy_file_range(src, dest_fd, length - offset, offset, offset)
                if copied == 0:
                    break
                offset += copied
        finally:
            os.close(src)

    def publish(self, staging_path: Path, digest: bytes) -> bool:
        """Move a finished staging file into place under its digest.

        Returns True when the object is new, False when identical content was
        already stored (then the staging file is simply dropped: dedup).
        """
        target = self.object_path(digest)
        try:
            os.stat(target)
        except FileNotFoundError:
            pass
        else:
            os.unlink(staging_path)
            return False
        self._make_shard_dirs(target)
        os.chmod(staging_path, 0o400)
        os.replace(staging_path, target)
        return True

    def sync_object(self, digest: bytes) -> None:
        """Sync an object and the directories that name it (its rename), for fsync(2).

        The object may have been sealed by an earlier close, unsynced.
        """
        path = self.object_path(digest)
        for target in (path, path.parent, path.parent.parent, self.objects_dir):
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sync_filesystem(self) -> None:
        """Flush everything written to the store's filesystem (syncfs(2))."""
        fd = os.open(self.objects_dir, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _LIBC.syncfs(fd) != 0:
                os.sync()  # not on this kernel: the whole machine, then
        finally:
            os.close(fd)

    def ensure_empty_object(self) -> None:
        target = self.object_path(EMPTY_DIGEST)
        if not target.exists():
            self._make_shard_dirs(target)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o400)
            os.close(fd)

    def delete(self, digest: bytes) -> None:
        path = self.object_path(digest)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # The last object of a shard takes its directories with it.
        for directory in (path.parent, path.parent.parent):
            if not _remove_if_empty(directory):
                break
            self.shard_dirs -= 1

    def verify(self, digest: bytes, size: int) -> str | None:
        """Return None when the object is intact, else what is wrong with it."""
        try:
            fd = self.open_object(digest)
        except FileNotFoundError:
            return "missing"
        try:
            actual, actual_size = hash_fd(fd)
        finally:
            os.close(fd)
        if actual_size != size:
            return f"size {actual_size}, expected {size}"
        if actual != digest:
            return "content does not match its hash"
        return None

    def iter_objects(self) -> Iterator[tuple[bytes | None, Path]]:
        """Yield (digest, path) for every file under objects/; digest None if misnamed."""
        for dirpath, _dirnames, filenames in os.walk(self.objects_dir):
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    digest = None
                if digest is not None and (
                    len(digest) != DIGEST_SIZE or path != self.object_path(digest)
                ):
                    digest = None
                yield digest, path

    def staging_files(self) -> list[Path]:
        return sorted(self.staging_dir.iterdir())

    def clear_staging(self) -> int:
        """Remove every staging file; they belong to writers that never finished."""
        removed = 0
        for path in self.staging_files():
            path.unlink()
            removed += 1
        return removed


def _subdirs(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as listing:
            return [Path(item.path) for item in listing if item.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _remove_if_empty(directory: Path) -> bool:
    """rmdir; False when the directory still holds something or is already gone."""
    try:
        directory.rmdir()
    except OSError:
        return False  # not empty (the usual case), gone, or not ours to remove
    return True
