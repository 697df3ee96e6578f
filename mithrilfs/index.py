"""The SQLite index: the namespace, the objects it refers to, and store metadata.

Every method runs on the trio thread and performs its statements without
awaiting, so each one is atomic with respect to the other requests; those that
change several rows do so in one transaction.  Object files are never touched
here: a method that drops the last reference to an object returns its digest,
and the caller deletes the file after the commit.

Inode 1 is the store's super-root.  It is never shown through a mount; its
entries are the device-class directories (``cuda-sm90``, ``cpu-x86_64-avx2``,
...), and a mount serves one of them as its root.
"""

from __future__ import annotations

import errno
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mithrilfs.errors import FsError, UserError, not_found
from mithrilfs.store import EMPTY_DIGEST

SCHEMA_VERSION = 1
SUPER_ROOT = 1
NAME_MAX = 255
DIR_SIZE = 4096

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_SCHEMA = """
-- Content objects.  `refcount` is the number of inodes whose `object` is this
-- hash; a row whose refcount would drop to 0 is deleted in the same
-- transaction and its file removed after the commit.
CREATE TABLE IF NOT EXISTS objects (
    hash     BLOB PRIMARY KEY,     -- 32-byte blake3 digest; file objects/ab/cd/<hex>
    size     INTEGER NOT NULL,
    refcount INTEGER NOT NULL
) WITHOUT ROWID;

-- Files, directories and symlinks.  AUTOINCREMENT keeps inode numbers from
-- being reused while the kernel may still remember them.
CREATE TABLE IF NOT EXISTS inodes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    mode     INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    nlink    INTEGER NOT NULL,     -- 0: unlinked, kept until the kernel forgets it
    size     INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    object   BLOB,                 -- regular files: their content (never NULL for files)
    target   BLOB                  -- symlinks: the link target
);
CREATE INDEX IF NOT EXISTS inodes_unlinked ON inodes(id) WHERE nlink = 0;
CREATE INDEX IF NOT EXISTS inodes_object ON inodes(object) WHERE object IS NOT NULL;

-- Directory entries.  `id` is the readdir cursor: a rename updates the row in
-- place, so a listing in progress never skips or repeats another entry.
CREATE TABLE IF NOT EXISTS entries (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS entries_inode ON entries(inode);

-- Store-wide facts: schema version, whether the last daemon shut down cleanly.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
"""

_INODE_COLUMNS = "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, object, target"


@dataclass(slots=True)
class Inode:
    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    object: bytes | None
    target: bytes | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


class Index:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    def open(cls, path: Path) -> Index:
        """Open (creating if needed) the index at *path*.

        A file that is not a readable mithrilfs index is refused with a
        `UserError`, never a traceback and never a change to the file.
        """
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a crash of the daemon; only a power
            # loss can drop the last transactions, never corrupt the file.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA cache_size=-65536")
            version = cls._schema_version(db)
            if version is None:
                # executescript commits first; keep schema and version in one transaction.
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta(key, value) "
                    f"VALUES ('schema_version', {SCHEMA_VERSION}); COMMIT;"
                )
            elif version != SCHEMA_VERSION:
                raise UserError(
                    f"{path}: store format {version} is not supported by this mithrilfs "
                    f"(format {SCHEMA_VERSION})",
                    3,
                )
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"{path} is damaged or not a mithrilfs index ({exc}); "
                "move the store aside and mount an empty one",
                3,
            ) from None
        index = cls(db)
        index._ensure_super_root()
        return index

    @staticmethod
    def _schema_version(db: sqlite3.Connection) -> int | None:
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if not has_meta:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise UserError("the store's index holds tables that mithrilfs did not create", 3)
            return None
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with _transaction(self.db):
            yield

    # -- metadata ---------------------------------------------------------

    def get_meta(self, key: str, default: object = None) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: object) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # -- reading ----------------------------------------------------------

    def get(self, ino: int) -> Inode:
        row = self.db.execute(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id=?", (ino,)).fetchone()
        if row is None:
            raise not_found()
        return Inode(*row)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        row = self.db.execute(
            f"SELECT {_prefixed('i')} FROM entries e JOIN inodes i ON i.id = e.inode "
            "WHERE e.parent=? AND e.name=?",
            (parent, name),
        ).fetchone()
        return Inode(*row) if row else None

    def readdir(self, parent: int, after: int, limit: int) -> list[tuple[int, bytes, Inode]]:
        rows = self.db.execute(
            f"SELECT e.id, e.name, {_prefixed('i')} FROM entries e "
            "JOIN inodes i ON i.id = e.inode "
            "WHERE e.parent=? AND e.id>? ORDER BY e.id LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [(row[0], row[1], Inode(*row[2:])) for row in rows]

    def has_children(self, ino: int) -> bool:
        return (
            self.db.execute("SELECT 1 FROM entries WHERE parent=? LIMIT 1", (ino,)).fetchone()
            is not None
        )

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute("SELECT parent FROM entries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        return row[0] if row else None

    def unlinked_inodes(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM inodes WHERE nlink=0")]

    def object_size(self, digest: bytes) -> int | None:
        row = self.db.execute("SELECT size FROM objects WHERE hash=?", (digest,)).fetchone()
        return row[0] if row else None

    # -- the namespace ----------------------------------------------------

    def _ensure_super_root(self) -> None:
        if self.db.execute("SELECT 1 FROM inodes WHERE id=?", (SUPER_ROOT,)).fetchone():
            return
        now = time.time_ns()
        with self.transaction():
            self.db.execute(
                f"INSERT INTO inodes({_INODE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,NULL,NULL)",
                (SUPER_ROOT, stat.S_IFDIR | 0o755, 0, 0, 2, DIR_SIZE, now, now, now),
            )

    def ensure_dir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """The directory *name* in *parent*, created if absent (class roots, layouts)."""
        existing = self.lookup(parent, name)
        if existing is not None:
            if not existing.is_dir:
                raise FsError(errno.ENOTDIR, f"{name!r} exists and is not a directory")
            return existing
        with self.transaction():
            return self.make_node(parent, name, stat.S_IFDIR | mode, uid, gid)

    def make_node(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        target: bytes | None = None,
    ) -> Inode:
        """Create a file, directory or symlink named *name* in *parent*.

        Must run inside a transaction.  A new regular file refers to the empty
        object, so every file always has content to serve.
        """
        check_name(name)
        if self.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        if stat.S_ISDIR(mode):
            nlink, size, digest = 2, DIR_SIZE, None
        elif stat.S_ISLNK(mode):
            assert target is not None
            nlink, size, digest = 1, len(target), None
        elif stat.S_ISREG(mode):
            nlink, size, digest = 1, 0, EMPTY_DIGEST
            self._incref(EMPTY_DIGEST, 0)
        else:
            raise FsError(errno.EPERM, "only files, directories and symlinks are supported")
        cursor = self.db.execute(
            "INSERT INTO inodes(mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, "
            "object, target) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (mode, uid, gid, nlink, size, now, now, now, digest, target),
        )
        ino = cursor.lastrowid
        assert ino is not None
        self.db.execute(
            "INSERT INTO entries(parent, name, inode) VALUES (?,?,?)", (parent, name, ino)
        )
        self._touch_dir(parent, now, nlink_delta=1 if stat.S_ISDIR(mode) else 0)
        return Inode(ino, mode, uid, gid, nlink, size, now, now, now, digest, target)

    def unlink(self, parent: int, name: bytes) -> Inode:
        """Remove a non-directory entry; the inode stays (nlink 0) until forgotten."""
        node = self._existing(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        with self.transaction():
            self._drop_entry(parent, name, node)
        return node

    def rmdir(self, parent: int, name: bytes) -> Inode:
        node = self._existing(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.has_children(node.id):
            raise FsError(errno.ENOTEMPTY)
        with self.transaction():
            self._drop_entry(parent, name, node)
        return node

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> Inode | None:
        """Rename an entry; returns the inode it replaced (now unlinked), if any."""
        check_name(new_name)
        moved = self._existing(old_parent, old_name)
        replaced = self.lookup(new_parent, new_name)
        if flags & RENAME_NOREPLACE and replaced is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if replaced is None:
                raise FsError(errno.ENOENT)
            self._check_not_inside(moved, new_parent)
            self._check_not_inside(replaced, old_parent)
            with self.transaction():
                self._exchange(old_parent, old_name, moved, new_parent, new_name, replaced)
            return None
        if moved.is_dir:
            self._check_not_inside(moved, new_parent)
        if replaced is not None:
            if replaced.id == moved.id:
                return None
            if moved.is_dir and not replaced.is_dir:
                raise FsError(errno.ENOTDIR)
            if not moved.is_dir and replaced.is_dir:
                raise FsError(errno.EISDIR)
            if replaced.is_dir and self.has_children(replaced.id):
                raise FsError(errno.ENOTEMPTY)
        now = time.time_ns()
        with self.transaction():
            if replaced is not None:
                self._drop_entry(new_parent, new_name, replaced)
            self.db.execute(
                "UPDATE entries SET parent=?, name=? WHERE parent=? AND name=?",
                (new_parent, new_name, old_parent, old_name),
            )
            moved_dirs = 1 if moved.is_dir and old_parent != new_parent else 0
            self._touch_dir(old_parent, now, nlink_delta=-moved_dirs)
            self._touch_dir(new_parent, now, nlink_delta=moved_dirs)
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, moved.id))
        return replaced

    def _exchange(
        self,
        old_parent: int,
        old_name: bytes,
        first: Inode,
        new_parent: int,
        new_name: bytes,
        second: Inode,
    ) -> None:
        now = time.time_ns()
        self.db.execute(
            "UPDATE entries SET inode=? WHERE parent=? AND name=?",
            (second.id, old_parent, old_name),
        )
        self.db.execute(
            "UPDATE entries SET inode=? WHERE parent=? AND name=?", (first.id, new_parent, new_name)
        )
        if old_parent != new_parent:
            shift = int(first.is_dir) - int(second.is_dir)
            self._touch_dir(old_parent, now, nlink_delta=-shift)
            self._touch_dir(new_parent, now, nlink_delta=shift)
        else:
            self._touch_dir(old_parent, now)

    def _check_not_inside(self, moved: Inode, new_parent: int) -> None:
        """A directory may not be moved into itself or its own subtree (EINVAL)."""
        if not moved.is_dir:
            return
        ino: int | None = new_parent
        while ino is not None and ino != SUPER_ROOT:
            if ino == moved.id:
                raise FsError(errno.EINVAL)
            ino = self.parent_of(ino)

    def _existing(self, parent: int, name: bytes) -> Inode:
        node = self.lookup(parent, name)
        if node is None:
            raise not_found()
        return node

    def _drop_entry(self, parent: int, name: bytes, node: Inode) -> None:
        now = time.time_ns()
        self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (parent, name))
        self.db.execute("UPDATE inodes SET nlink=0, ctime_ns=? WHERE id=?", (now, node.id))
        node.nlink = 0
        self._touch_dir(parent, now, nlink_delta=-1 if node.is_dir else 0)

    def _touch_dir(self, ino: int, now: int, nlink_delta: int = 0) -> None:
        self.db.execute(
            "UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE id=?",
            (now, now, nlink_delta, ino),
        )

    # -- attributes and content -------------------------------------------

    def set_attrs(self, ino: int, **fields: int) -> None:
        if not fields:
            return
        assignments = ", ".join(f"{column}=?" for column in fields)
        for column in fields:
            if column not in _SETTABLE:
                raise ValueError(f"not a settable attribute: {column}")
        self.db.execute(f"UPDATE inodes SET {assignments} WHERE id=?", (*fields.values(), ino))

    def set_content(self, ino: int, digest: bytes, size: int, mtime_ns: int) -> bytes | None:
        """Point a file at new content; return an object digest that is no longer used."""
        with self.transaction():
            old = self.db.execute("SELECT object FROM inodes WHERE id=?", (ino,)).fetchone()
            if old is None:
                raise not_found()
            if old[0] == digest:
                self.db.execute(
                    "UPDATE inodes SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, ino)
                )
                return None
            self._incref(digest, size)
            self.db.execute(
                "UPDATE inodes SET object=?, size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                (digest, size, mtime_ns, mtime_ns, ino),
            )
            return self._decref(old[0]) if old[0] is not None else None

    def ensure_empty_object(self) -> None:
        """Give the empty object its row, so that its file is never an orphan.

        The row stays (refcount 0 or more) for the life of the store: every
        new file starts out referring to it.
        """
        with self.transaction():
            self.db.execute(
                "INSERT INTO objects(hash, size, refcount) VALUES (?, 0, 0) "
                "ON CONFLICT(hash) DO NOTHING",
                (EMPTY_DIGEST,),
            )

    def free_inode(self, ino: int) -> bytes | None:
        """Delete an unlinked inode; return its object digest if that is now unused."""
        with self.transaction():
            row = self.db.execute("SELECT object, nlink FROM inodes WHERE id=?", (ino,)).fetchone()
            if row is None or row[1] != 0 or ino == SUPER_ROOT:
                return None
            self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
            return self._decref(row[0]) if row[0] is not None else None

    def _incref(self, digest: bytes, size: int) -> None:
        self.db.execute(
            "INSERT INTO objects(hash, size, refcount) VALUES (?,?,1) "
            "ON CONFLICT(hash) DO UPDATE SET refcount=refcount+1",
            (digest, size),
        )

    def _decref(self, digest: bytes) -> bytes | None:
        refcount = self.db.execute(
            "UPDATE objects SET refcount=refcount-1 WHERE hash=? RETURNING refcount", (digest,)
        ).fetchone()
        if refcount is not None and refcount[0] <= 0 and digest != EMPTY_DIGEST:
            self.db.execute("DELETE FROM objects WHERE hash=?", (digest,))
            return digest
        return None


_SETTABLE = frozenset({"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns"})


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in _INODE_COLUMNS.split(","))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction; nested use joins the outer one."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
