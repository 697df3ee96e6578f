"""A store directory opened for exclusive use: lock, index and objects together.

One daemon (or one offline command such as fsck) holds a store at a time;
the lock file records its pid so that a second one can say who holds it.
Opening a store also recovers it from an unclean shutdown: staging files of
writers that never finished are dropped, inodes that were unlinked while
open are freed, and the quick form of fsck (rows against files, refcounts,
the tree; no re-hashing) runs and repairs what it finds, such as object
files that no row refers to (a crash between the rename into objects/ and
the index commit).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mithrilfs import fsck
from mithrilfs.errors import UserError
from mithrilfs.index import Index
from mithrilfs.store import ContentStore

log = logging.getLogger(__name__)

INDEX_NAME = "mithril.db"
LOCK_NAME = "lock"


def default_store_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mithril")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "mithrilfs"


def holder_pid(root: Path) -> int | None:
    """The pid recorded in a store's lock file, if that process is alive."""
    try:
        pid = int((root / LOCK_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


@dataclass
class Recovery:
    unclean: bool = False
    staging_removed: int = 0
    inodes_freed: int = 0
    orphans_removed: int = 0
    problems_repaired: int = 0  # by the quick check, orphans included
    problems_left: int = 0
    marks_dropped: int = 0  # verification marks made since the last clean stop


class Repository:
    def __init__(self, root: Path, lock_fd: int, index: Index, content: ContentStore) -> None:
        self.root = root
        self.index = index
        self.content = content
        self._lock_fd = lock_fd
        self.recovery = Recovery()

    @classmethod
    def open(
        cls, root: Path, *, create: bool = True, busy_timeout: float | None = None
    ) -> Repository:
        """Take the store at *root*; *busy_timeout* is the index's (see Index.open)."""
        root = root.absolute()
        if not root.exists():
            if not create:
                raise UserError(f"store {root} does not exist", 2)
            try:
                root.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                raise UserError(f"cannot create store {root}: {exc.strerror}", 2) from None
        if not root.is_dir():
            raise UserError(f"store {root} is not a directory", 2)
        if not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f"store {root} is not writable by this user", 2)
        lock_fd = _take_lock(root)
        try:
            content = ContentStore(root)
            content.create_dirs()
            swept = content.scan()
            if swept:
                log.info("removed %d empty shard directories from %s", swept, root)
            _create_private(root / INDEX_NAME)
            index = Index.open(
                root / INDEX_NAME, block_size=content.block, busy_timeout=busy_timeout
            )
        except OSError as exc:
            os.close(lock_fd)
            raise UserError(f"cannot open store {root}: {exc.strerror or exc}", 2) from None
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, lock_fd, index, content)

    def recover(self) -> Recovery:
        """Bring the store to a consistent state before it is served."""
        recovery = self.recovery
        recovery.unclean = self.index.get_meta("clean_shutdown", 1) != 1
        recovery.staging_removed = self.content.clear_staging()
        for ino in self.index.unlinked_inodes():
            unused = self.index.free_inode(ino)
            if unused is not None:
                self.content.delete(unused)
            recovery.inodes_freed += 1
        # File first, then the row that points at it.
        self.content.ensure_empty_object()
        self.index.ensure_empty_object()
        if recovery.unclean:
            recovery.marks_dropped = self.index.forget_marks_since_clean()
            self._quick_check(recovery)
        if recovery.unclean or recovery.staging_removed or recovery.inodes_freed:
            log.warning(
                "recovered store %s after an unclean shutdown: %d unfinished writes dropped, "
                "%d unlinked files freed, %d orphan objects removed, %d problems repaired",
                self.root,
                recovery.staging_removed,
                recovery.inodes_freed,
                recovery.orphans_removed,
                recovery.problems_repaired,
            )
        return recovery

    def _quick_check(self, recovery: Recovery) -> None:
        """fsck without re-hashing, repairing what it finds (after an unclean shutdown)."""
        log.info("store %s was not shut down cleanly; checking it (no re-hashing)", self.root)
        report = fsck.check(self.index, self.content, verify_hashes=False)
        for problem in report.problems:
            log.warning("recovery: %s: %s", problem.kind, problem.detail)
        fsck.repair(report)
        self.index.recount()  # repairs change rows behind the running totals
        recovery.orphans_removed = sum(p.repaired for p in report.problems if p.kind == "orphan")
        recovery.problems_repaired = report.repaired
        recovery.problems_left = len(report.problems) - report.repaired
        if recovery.problems_left:
            log.error(
                "store %s: %d problems need 'mithrilfs fsck --repair --store %s' (unmounted)",
                self.root,
                recovery.problems_left,
                self.root,
            )

    def mark_in_use(self) -> None:
        with self.index.transaction():
            self.index.set_meta("clean_shutdown", 0)
        self.index.begin_epoch()

    def close(self, *, clean: bool | None = None) -> None:
        """Release the store; *clean* records how a daemon's service ended."""
        if clean:
            # The verification marks of this mount are trusted after a clean
            # stop, so the objects they vouch for must be on disk first.
            self.content.sync_filesystem()
        if clean is not None:
            with self.index.transaction():
                self.index.set_meta("clean_shutdown", 1 if clean else 0)
                if clean:
                    self.index.end_epoch_cleanly()
        else:
            # Offline commands (fsck --repair, import, gc) may change rows
            # behind the running totals that close() saves.
            self.index.recount()
        self.index.close()
        os.close(self._lock_fd)


def store_in_use(root: Path) -> bool:
    """True while some process holds the store's lock (probed, never kept)."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock too
    return False


def _create_private(path: Path) -> None:
    """Create *path* readable by its owner only; SQLite gives its -wal and -shm
    files the same mode as the database file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


def _take_lock(root: Path) -> int:
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"cannot open store lock {path}: {exc.strerror}", 2) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        pid = holder_pid(root)
        holder = f"mithrilfs pid {pid}" if pid else "another process"
        raise UserError(
            f"store {root} is in use by {holder}; one store is served by one daemon "
            "(unmount it first)",
            1,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
