"""The blake3 content-addressed object store on disk.

Objects live at ``objects/ab/cd/<64 hex digits>``: immutable, named by the
blake3 hash of their bytes, written by renaming a finished staging file into
place.  Files still being written live in ``staging/``.  Names from the mount
never reach the disk; the only paths here are hashes and inode numbers.

Nothing in this module touches the index: the caller decides when an object
is referenced and when it may be deleted (after the index commit, so a crash
leaves an orphan file, never a row that points at nothing).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from collections.abc import Iterator
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


class ContentStore:
    """Objects and staging files under one store directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects_dir = root / "objects"
        self.staging_dir = root / "staging"
        self._objects_str = os.fspath(self.objects_dir)
        self._staging_names = itertools.count()

    def create_dirs(self) -> None:
        for path in (self.root, self.objects_dir, self.staging_dir):
            path.mkdir(mode=0o700, exist_ok=True)

    def object_path(self, digest: bytes) -> Path:
        hexname = digest.hex()
        return self.objects_dir / hexname[:2] / hexname[2:4] / hexname

    @staticmethod
    def _make_shard_dirs(target: Path) -> None:
        # mkdir(parents=True) would give the first level the umask's mode.
        for directory in (target.parent.parent, target.parent):
            directory.mkdir(mode=0o700, exist_ok=True)

    def has(self, digest: bytes) -> bool:
        return self.object_path(digest).exists()

    def open_object(self, digest: bytes) -> int:
        # On the open path of every cache hit: plain strings, no pathlib.
        hexname = digest.hex()
        path = f"{self._objects_str}/{hexname[:2]}/{hexname[2:4]}/{hexname}"
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def new_staging(self, inode: int) -> tuple[Path, int]:
        """Create an empty staging file for *inode*; return its path and a rw fd."""
        path = self.staging_dir / f"{inode}.{os.getpid()}.{next(self._staging_names)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return path, fd

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
        if target.exists():
            staging_path.unlink()
            return False
        self._make_shard_dirs(target)
        os.chmod(staging_path, 0o400)
        os.replace(staging_path, target)
        return True

    def ensure_empty_object(self) -> None:
        target = self.object_path(EMPTY_DIGEST)
        if not target.exists():
            self._make_shard_dirs(target)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o400)
            os.close(fd)

    def delete(self, digest: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.object_path(digest).unlink()

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


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
