"""The SQLite index: the namespace, the objects it refers to, and store metadata.

Every method runs on the trio thread and performs its statements without
awaiting, so each one is atomic with respect to the other requests; those that
change several rows do so in one transaction.  Object files are never touched
here: a method that drops the last reference to an object returns its digest,
and the caller deletes the file after the commit.

Every SQL statement of mithrilfs is here (the schema migration keeps its
own, in `Index._migrate`); other modules call named methods.  `IndexReader`
holds the read-only queries, for connections of their own.

Inode 1 is the store's super-root.  It is never shown through a mount; its
entries are the device-class directories (``cuda-sm90``, ``cpu-x86_64-avx2``,
...), and a mount serves one of them as its root.
"""

from __future__ import annotations

import errno
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mithrilfs.errors import FsError, UserError, not_found
from mithrilfs.layouts import (
    TRITON_TMP_PREFIX,
    USERS_DIR,
    EntryKey,
    entry_rule,
    is_transient,
    split_tree,
)
from mithrilfs.store import DEFAULT_BLOCK, EMPTY_DIGEST

SCHEMA_VERSION = 3
# Format 1 had no `rdev` and no `xattrs`; format 2 no verification marks (see _migrate).
SUPER_ROOT = 1
# How long a statement waits for another process's write lock (fsck, import).
BUSY_TIMEOUT = 10.0
# The WAL's bounds: see limit_wal.
WAL_MIN = 64 << 10
WAL_MAX = 4 << 20
NAME_MAX = 255
DIR_SIZE = 4096

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_SCHEMA = """
-- Content objects.  `refcount` is the number of inodes whose `object` is this
-- hash; a row whose refcount would drop to 0 is deleted in the same
-- transaction and its file removed after the commit.
-- The verification mark (docs/crash-safety.md): the mount epoch in which the
-- file's bytes last matched the hash, and the file's ctime then.  Both NULL:
-- never verified, or the mark was dropped by recovery after an unclean stop.
CREATE TABLE IF NOT EXISTS objects (
    hash           BLOB PRIMARY KEY,     -- 32-byte blake3 digest; file objects/ab/cd/<hex>
    size           INTEGER NOT NULL,
    refcount       INTEGER NOT NULL,
    verified_epoch INTEGER,              -- meta.mount_epoch of the last verification
    verified_ctime INTEGER               -- the object file's st_ctime_ns then
) WITHOUT ROWID;

-- Files, directories, symlinks and special nodes (FIFOs, sockets, character
-- and block devices: metadata only, no object, no cache entry).
-- AUTOINCREMENT keeps inode numbers from being reused while the kernel may
-- still remember them.
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
    target   BLOB,                 -- symlinks: the link target
    entry    INTEGER,              -- regular files: the cache entry they belong to
    rdev     INTEGER NOT NULL DEFAULT 0  -- device nodes: the device number, else 0
);
CREATE INDEX IF NOT EXISTS inodes_unlinked ON inodes(id) WHERE nlink = 0;
CREATE INDEX IF NOT EXISTS inodes_object ON inodes(object) WHERE object IS NOT NULL;
CREATE INDEX IF NOT EXISTS inodes_entry ON inodes(entry) WHERE entry IS NOT NULL;

-- Cache entries, the unit of eviction (layouts.py says which files form one).
-- `key` names the entry (layouts.EntryKey encodes and decodes it):
-- b"d<ino>" the directory <ino> and everything in it;
-- b"s<parent>/<stem>" the files named <stem>.* in <parent>; b"f<ino>" one file.
-- A row exists while some linked file refers to it.
CREATE TABLE IF NOT EXISTS cache_entries (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       BLOB NOT NULL UNIQUE,
    root      INTEGER NOT NULL,      -- the directory (d), parent directory (s) or file (f)
    last_read INTEGER NOT NULL       -- unix nanoseconds of the last open for reading, or of
                                     -- the last file placed in it (creation is a use)
);
CREATE INDEX IF NOT EXISTS cache_entries_age ON cache_entries(last_read, id);

-- Counters that survive a remount (stats.py), one row per name and label set.
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT NOT NULL,
    labels TEXT NOT NULL,            -- JSON object, keys sorted
    value  INTEGER NOT NULL,
    PRIMARY KEY (name, labels)
) WITHOUT ROWID;

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

-- Extended attributes (user. namespace only: xattrs.py), deleted with their inode.
CREATE TABLE IF NOT EXISTS xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;

-- Store-wide facts: schema version, whether the last daemon shut down cleanly.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
"""

_INODE_COLUMNS = (
    "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, object, target, entry, rdev"
)
# The same columns of `inodes i` in a join, built once: lookup and readdir
# are on the request path of every cache hit.
_I_COLUMNS = ", ".join(f"i.{column.strip()}" for column in _INODE_COLUMNS.split(","))
# Node types that hold neither content nor a target: only their inode row.
SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})


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
    entry: int | None = None
    rdev: int = 0

    @property
    def is_special(self) -> bool:
        """A FIFO, socket or device node: a name with attributes, never cache content."""
        return stat.S_IFMT(self.mode) in SPECIAL_TYPES

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


@dataclass
class EvictedEntry:
    """What removing one cache entry did."""

    names: list[tuple[int, bytes, int]]  # (parent, name, inode) of every name removed
    held: list[int]  # inodes left unlinked for the caller to free once released
    unused_objects: list[bytes]  # object files to delete now that the commit is done
    bytes_freed: int


class IndexReader:
    """The named read-only queries, on any connection to an index.

    `Index` has them all; a thread or a process that must not share the
    daemon's connection (the per-tree usage for /metrics, `mithrilfs stats`)
    opens its own with `open_read_only`.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    def open_read_only(cls, path: Path) -> IndexReader:
        """A connection of its own that cannot change the index (waits for writers)."""
        return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT))

    def close(self) -> None:
        self.db.close()

    def _column(self, sql: str, params: tuple[object, ...] = ()) -> list[int]:
        """The first column of every row of a query (ids)."""
        return [row[0] for row in self.db.execute(sql, params)]

    def get_meta(self, key: str, default: object = None) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def get(self, ino: int) -> Inode:
        row = self.db.execute(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id=?", (ino,)).fetchone()
        if row is None:
            raise not_found()
        return Inode(*row)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        row = self.db.execute(
            f"SELECT {_I_COLUMNS} FROM entries e JOIN inodes i ON i.id = e.inode "
            "WHERE e.parent=? AND e.name=?",
            (parent, name),
        ).fetchone()
        return Inode(*row) if row else None

    def names_in(self, directory: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every name in *directory*, by name."""
        rows: list[tuple[bytes, int]] = self.db.execute(
            "SELECT name, inode FROM entries WHERE parent=? ORDER BY name", (directory,)
        ).fetchall()
        return rows

    def names_with_prefix(
        self, directory: int, prefix: bytes, limit: int = -1
    ) -> list[tuple[bytes, int]]:
        """(name, inode) of the names in *directory* that start with *prefix*, by name.

        A range on the (parent, name) index, so the cost is the names returned.
        """
        if not prefix or prefix[-1] == 0xFF:
            raise ValueError(f"no range of names for the prefix {prefix!r}")
        after = prefix[:-1] + bytes([prefix[-1] + 1])
        rows: list[tuple[bytes, int]] = self.db.execute(
            "SELECT name, inode FROM entries WHERE parent=? AND name >= ? AND name < ? "
            "ORDER BY name LIMIT ?",
            (directory, prefix, after, limit),
        ).fetchall()
        return rows

    def class_roots(self) -> list[tuple[bytes, int]]:
        """(name, inode) of every device-class tree, by name."""
        return self.names_in(SUPER_ROOT)

    def private_roots(self, class_root: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every private tree root under *class_root*."""
        users = self.lookup(class_root, USERS_DIR)
        if users is None:
            return []
        rows: list[tuple[bytes, int]] = self.db.execute(
            "SELECT name, inode FROM entries WHERE parent=?", (users.id,)
        ).fetchall()
        return rows

    def names_below(self, root: int) -> list[tuple[int, bytes, int, int | None]]:
        """(parent, name, inode, cache entry) of every name in the tree under *root*."""
        rows: list[tuple[int, bytes, int, int | None]] = self.db.execute(
            _names_below("parent=?") + "SELECT t.parent, t.name, t.inode, i.entry FROM tree t "
            "JOIN inodes i ON i.id = t.inode",
            (root,),
        ).fetchall()
        return rows

    def file_usage(self, directory: int) -> tuple[int, int, int]:
        """(files, the sum of their sizes, cache entries) below *directory*.

        A hard-linked file counts once, as du counts it.
        """
        row: tuple[int, int, int] = self.db.execute(
            _names_below("parent=?")
            + "SELECT count(*), coalesce(sum(i.size), 0), count(DISTINCT i.entry) "
            + _FILES_IN_TREE,
            (directory,),
        ).fetchone()
        return row

    def object_usage(self, directory: int) -> tuple[int, int]:
        """(distinct objects, the sum of their sizes) used by the files below *directory*."""
        row: tuple[int, int] = self.db.execute(
            _names_below("parent=?")
            + "SELECT count(*), coalesce(sum(o.size), 0) FROM objects o "
            + f"WHERE o.hash IN (SELECT i.object {_FILES_IN_TREE})",
            (directory,),
        ).fetchone()
        return row

    # -- counters and gauges saved by the daemon (stats.py) ---------------------

    def load_counters(self) -> list[tuple[str, str, int]]:
        return self.db.execute("SELECT name, labels, value FROM counters").fetchall()

    def saved_gauges(self) -> list[tuple[str, object]]:
        """(gauge, value) as the daemon last saved them."""
        return [
            (key.removeprefix(_GAUGE_PREFIX), value)
            for key, value in self.db.execute(
                "SELECT key, value FROM meta WHERE key LIKE ?", (_GAUGE_PREFIX + "%",)
            )
        ]


class Index(IndexReader):
    """The index as the daemon (or an offline command) changes it."""

    def __init__(self, db: sqlite3.Connection, block_size: int = DEFAULT_BLOCK) -> None:
        super().__init__(db)
        # Objects take whole blocks of the backing filesystem; the cap counts
        # what they take (allocated_bytes), not what they hold.
        self.block_size = block_size
        # The WAL's file name beside the database and the size it may reach
        # between checkpoints (limit_wal): the cap reserves that much for it.
        self.wal_name = ""
        self.wal_limit = WAL_MAX
        # Running totals, computed once at open and kept current by every
        # change, so that the cap check and the gauges cost nothing.
        self.stored_bytes = 0
        self.allocated_bytes = 0
        self.object_count = 0
        self.logical_bytes = 0
        # dir inode -> (names from the class root down, their inodes); used to
        # place new files in their cache entry without walking up each time.
        self._dir_paths: dict[int, tuple[list[bytes], list[int]]] = {}
        # The mount epoch a serving daemon began (begin_epoch); None offline,
        # where nothing is marked verified.
        self.epoch: int | None = None

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        node = super().lookup(parent, name)
        if node is not None and node.is_dir:
            self._extend_dir_path(parent, name, node.id)
        return node

    @property
    def changes(self) -> int:
        """Rows changed through this connection so far (the daemon's is the only writer).

        Equal before and after an await: nothing was changed meanwhile.  The
        WAL checkpointer asks the same to learn whether there is anything new.
        """
        return self.db.total_changes

    @classmethod
    def open(
        cls, path: Path, *, block_size: int = DEFAULT_BLOCK, busy_timeout: float | None = None
    ) -> Index:
        """Open (creating if needed) the index at *path*.

        *block_size* is the backing filesystem's allocation unit (objects are
        priced in whole blocks); *busy_timeout* (seconds, default
        BUSY_TIMEOUT) is how long a statement waits for another process's
        write lock before it fails.

        A file that is not a readable mithrilfs index is refused with a
        `UserError`, never a traceback and never a change to the file.
        """
        timeout = BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a crash of the daemon; only a power
            # loss can drop the last transactions, never corrupt the file.
            # fsync(2) on a file asks for more: see make_durable.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            db.execute("PRAGMA cache_size=-65536")

            version = cls._schema_version(db)
            if version is None:
                # executescript commits first; keep schema and version in one transaction.
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT INTO meta(key, value) "
                    f"VALUES ('schema_version', {SCHEMA_VERSION}); COMMIT;"
                )
            elif version < SCHEMA_VERSION:
                cls._migrate(db, version)
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
        index = cls(db, block_size)
        index.wal_name = path.name + "-wal"
        index.limit_wal(None)
        index._ensure_super_root()
        index._migrate_recency_to_ns()
        index._load_totals()
        return index

    def recount(self) -> None:
        """Recompute the running totals from the tables (once, at open)."""
        # The empty object is not counted: its row lives as long as the store.
        block = self.block_size
        self.stored_bytes, self.allocated_bytes, self.object_count = self.db.execute(
            "SELECT coalesce(sum(size), 0), coalesce(sum((size + ? - 1) / ? * ?), 0), count(*) "
            "FROM objects WHERE hash != ?",
            (block, block, block, EMPTY_DIGEST),
        ).fetchone()
        self.logical_bytes = self.db.execute(
            "SELECT coalesce(sum(size), 0) FROM inodes WHERE object IS NOT NULL"
        ).fetchone()[0]

    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        """Bring a store of an older format up to SCHEMA_VERSION, in one transaction.

        1 -> 2: special nodes keep their device number in `rdev`; every
        existing inode is a file, directory or symlink, so 0 is right for all.
        Extended attributes get their (empty) table.
        2 -> 3: objects get their verification mark, NULL for all: nothing
        is trusted that this format did not see verified, so each object is
        hashed once more, at its first read or by the scrub.
        """
        with _transaction(db):
            if version < 2:
                db.execute("ALTER TABLE inodes ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0")
                db.execute(
                    "CREATE TABLE xattrs (inode INTEGER NOT NULL, name BLOB NOT NULL, "
                    "value BLOB NOT NULL, PRIMARY KEY (inode, name)) WITHOUT ROWID"
                )
            if version < 3:
                db.execute("ALTER TABLE objects ADD COLUMN verified_epoch INTEGER")
                db.execute("ALTER TABLE objects ADD COLUMN verified_ctime INTEGER")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))

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

    def _load_totals(self) -> None:
        """The running totals: saved by the last close, or recounted.

        Recounting scans every inode, which would make mounting grow with the
        store.  The saved totals are deleted as soon as they are read, so a
        process that dies before its close() leaves none and the next open
        recounts.
        """
        saved = self.get_meta("totals")
        if isinstance(saved, str):
            with self.transaction():
                self.db.execute("DELETE FROM meta WHERE key='totals'")
        parts = saved.split(",") if isinstance(saved, str) else []
        # Totals saved by an older version, or on a filesystem with other
        # blocks (the store was copied), are recounted.
        if len(parts) != 5 or int(parts[4]) != self.block_size:
            self.recount()
            return
        self.stored_bytes, self.object_count, self.logical_bytes, self.allocated_bytes = (
            int(part) for part in parts[:4]
        )

    def close(self) -> None:
        try:
            with self.transaction():
                self.set_meta(
                    "totals",
                    f"{self.stored_bytes},{self.object_count},{self.logical_bytes},"
                    f"{self.allocated_bytes},{self.block_size}",
                )
        except sqlite3.Error:
            pass  # read-only or full: the next open recounts
        self.db.close()

    def limit_wal(self, cap: int | None) -> None:
        """Keep the WAL small next to a store's *cap*, which it counts against.

        It is checkpointed when it reaches a sixteenth of the cap (within
        WAL_MIN..WAL_MAX; WAL_MAX, SQLite's own default, without a cap) and
        cut back to that size afterwards, so that a burst of writes does not
        leave it big.  `wal_limit` is what it may take between checkpoints.
        A serving daemon checkpoints long before that, off the request path
        (WalCheckpointer); this limit is then only the backstop.
        """
        limit = WAL_MAX if cap is None else max(WAL_MIN, min(WAL_MAX, cap // 16))
        self.db.execute(f"PRAGMA wal_autocheckpoint={max(1, limit // 4096)}")
        self.db.execute(f"PRAGMA journal_size_limit={limit}")
        self.wal_limit = limit

    def make_durable(self) -> None:
        """Make every commit so far survive a power loss (fsync(2) on a file).

        Commits run with synchronous=NORMAL, which a crash of the process
        never loses but a power loss may.  A full checkpoint syncs the WAL,
        copies it into the database file and syncs that.  When a reader's
        snapshot keeps the checkpoint from finishing, one commit with
        synchronous=FULL syncs the WAL, and with it every commit before.
        """
        busy, _frames, _done = self.db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        if not busy:
            return
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            with self.transaction():
                self.set_meta("durable_at_ns", time.time_ns())
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        outermost = not self.db.in_transaction
        try:
            with _transaction(self.db):
                yield
        except BaseException:
            if outermost:
                # Rolled back: a path remembered for a directory made in it
                # would outlive its row, and the row's id may be given out again.
                self._dir_paths.clear()
            raise

    # -- metadata ---------------------------------------------------------

    def set_meta(self, key: str, value: object) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # -- reading ----------------------------------------------------------

    def readdir(self, parent: int, after: int, limit: int) -> list[tuple[int, bytes, Inode]]:
        rows = self.db.execute(
            f"SELECT e.id, e.name, {_I_COLUMNS} FROM entries e "
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

    def link_of(self, ino: int) -> tuple[int, bytes] | None:
        """(parent, name) of a linked inode."""
        row = self.db.execute(
            "SELECT parent, name FROM entries WHERE inode=? LIMIT 1", (ino,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def parent_of(self, ino: int) -> int | None:
        row = self.db.execute("SELECT parent FROM entries WHERE inode=? LIMIT 1", (ino,)).fetchone()
        return row[0] if row else None

    def unlinked_inodes(self) -> list[int]:
        return self._column("SELECT id FROM inodes WHERE nlink=0")

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
                f"INSERT INTO inodes({_INODE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,0)",
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
        rdev: int = 0,
    ) -> Inode:
        """Create a file, directory, symlink or special node named *name* in *parent*.

        Must run inside a transaction.  A new regular file refers to the empty
        object, so every file always has content to serve.  A special node
        (SPECIAL_TYPES) is its inode row alone; *rdev* is kept for device
        nodes, which the mount (nodev) never opens as devices.
        """
        check_name(name)
        self._require_linked(parent)
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
        elif stat.S_IFMT(mode) in SPECIAL_TYPES:
            nlink, size, digest = 1, 0, None
        else:
            raise FsError(errno.EINVAL, f"unknown node type {stat.S_IFMT(mode):o}")
        if not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode):
            rdev = 0
        cursor = self.db.execute(
            "INSERT INTO inodes(mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, "
            "object, target, rdev) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (mode, uid, gid, nlink, size, now, now, now, digest, target, rdev),
        )
        ino = cursor.lastrowid
        assert ino is not None
        self.db.execute(
            "INSERT INTO entries(parent, name, inode) VALUES (?,?,?)", (parent, name, ino)
        )
        self._touch_dir(parent, now, nlink_delta=1 if stat.S_ISDIR(mode) else 0)
        if stat.S_ISDIR(mode):
            self._extend_dir_path(parent, name, ino)
        entry = self._place_in_entry(ino, parent, name, now) if stat.S_ISREG(mode) else None
        return Inode(ino, mode, uid, gid, nlink, size, now, now, now, digest, target, entry, rdev)

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        """Give the non-directory *ino* another name, *name* in *parent* (link(2)).

        The inode keeps the cache entry it is in; each name only adds to
        `nlink` and counts where eviction is concerned (see evict_entry).
        """
        check_name(name)
        self._require_linked(parent)
        node = self.get(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if node.nlink == 0:
            raise not_found()  # unlinked while open: it may not get a name again
        if self.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        with self.transaction():
            self.db.execute(
                "INSERT INTO entries(parent, name, inode) VALUES (?,?,?)", (parent, name, ino)
            )
            self.db.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE id=?", (now, ino))
            self._touch_dir(parent, now)
        return self.get(ino)

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
        self._require_linked(new_parent)
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
            self._replace_after_move(moved, new_parent, new_name, now)
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
        self._replace_after_move(first, new_parent, new_name, now)
        self._replace_after_move(second, old_parent, old_name, now)

    def _check_not_inside(self, moved: Inode, new_parent: int) -> None:
        """A directory may not be moved into itself or its own subtree (EINVAL)."""
        if not moved.is_dir:
            return
        if new_parent == moved.id or any(
            parent == moved.id for _ino, parent, _name in self._links_up(new_parent)
        ):
            raise FsError(errno.EINVAL)

    def _require_linked(self, directory: int) -> None:
        """ENOENT for a directory that is gone (evicted while the kernel still had it).

        Eviction removes names on its own and the kernel learns of it
        asynchronously; a create that resolved the directory before that must
        not put a name under a directory nobody can reach any more.
        """
        row = self.db.execute("SELECT nlink FROM inodes WHERE id=?", (directory,)).fetchone()
        if row is None or row[0] == 0:
            raise not_found()

    def _existing(self, parent: int, name: bytes) -> Inode:
        node = self.lookup(parent, name)
        if node is None:
            raise not_found()
        return node

    def _drop_entry(self, parent: int, name: bytes, node: Inode) -> None:
        now = time.time_ns()
        self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (parent, name))
        survivor = None if node.is_dir else self.link_of(node.id)
        if survivor is not None:
            # Another name remains: the inode and its content stay, in that
            # name's cache entry.
            self.db.execute(
                "UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE id=?", (now, node.id)
            )
            node.nlink -= 1
            self._touch_dir(parent, now)
            if node.entry is not None:
                self._move_to_survivor(node.id, node.entry, survivor, now)
            return
        self.db.execute(
            "UPDATE inodes SET nlink=0, ctime_ns=?, entry=NULL WHERE id=?", (now, node.id)
        )
        node.nlink = 0
        self._touch_dir(parent, now, nlink_delta=-1 if node.is_dir else 0)
        if node.is_dir:
            self._dir_paths.pop(node.id, None)
        if node.entry is not None:
            self._drop_cache_entry_if_empty(node.entry)

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

    def set_content(
        self, ino: int, digest: bytes, size: int, mtime_ns: int, verified_ctime: int | None = None
    ) -> bytes | None:
        """Point a file at new content; return an object digest that is no longer used.

        *verified_ctime*: the object's file was just written from the bytes
        hashed, with this ctime; it is marked verified (mark_verified).
        """
        with self.transaction():
            old = self.db.execute("SELECT object, size FROM inodes WHERE id=?", (ino,)).fetchone()
            if old is None:
                raise not_found()
            old_digest, old_size = old
            if old_digest == digest:
                self.db.execute("UPDATE inodes SET mtime_ns=? WHERE id=?", (mtime_ns, ino))
                return None
            self._incref(digest, size)
            if verified_ctime is not None:
                self.mark_verified(digest, verified_ctime)
            self.db.execute(
                "UPDATE inodes SET object=?, size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                (digest, size, mtime_ns, mtime_ns, ino),
            )
            self.logical_bytes += size - old_size
            return self._decref(old_digest) if old_digest is not None else None

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
        row = self.db.execute(
            "SELECT object, nlink, size FROM inodes WHERE id=?", (ino,)
        ).fetchone()
        if row is None or row[1] != 0 or ino == SUPER_ROOT:
            return None
        with self.transaction():
            return self._delete_inode(ino, row[0], row[2])

    def _delete_inode(self, ino: int, digest: bytes | None, size: int) -> bytes | None:
        self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
        self.drop_xattrs(ino)
        if digest is None:
            return None
        self.logical_bytes -= size
        return self._decref(digest)

    def _incref(self, digest: bytes, size: int) -> None:
        refcount = self.db.execute(
            "INSERT INTO objects(hash, size, refcount) VALUES (?,?,1) "
            "ON CONFLICT(hash) DO UPDATE SET refcount=refcount+1 RETURNING refcount",
            (digest, size),
        ).fetchone()[0]
        if refcount == 1 and digest != EMPTY_DIGEST:  # the empty row is never deleted
            self._count_object(size, +1)

    def _decref(self, digest: bytes) -> bytes | None:
        row = self.db.execute(
            "UPDATE objects SET refcount=refcount-1 WHERE hash=? RETURNING refcount, size",
            (digest,),
        ).fetchone()
        if row is not None and row[0] <= 0 and digest != EMPTY_DIGEST:
            self.db.execute("DELETE FROM objects WHERE hash=?", (digest,))
            self._count_object(row[1], -1)
            return digest
        return None

    def _count_object(self, size: int, delta: int) -> None:
        self.stored_bytes += delta * size
        self.allocated_bytes += delta * (-(-size // self.block_size) * self.block_size)
        self.object_count += delta

    # -- extended attributes ------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def list_xattrs(self, ino: int) -> list[bytes]:
        return [
            bytes(row[0])
            for row in self.db.execute(
                "SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,)
            )
        ]

    def set_xattr(self, ino: int, name: bytes, value: bytes, limit: int) -> None:
        """Set one attribute; ENOSPC when the inode's attributes would pass *limit* bytes."""
        self.get(ino)
        (others,) = self.db.execute(
            "SELECT coalesce(sum(length(name) + length(value)), 0) FROM xattrs "
            "WHERE inode=? AND name!=?",
            (ino, name),
        ).fetchone()
        if others + len(name) + len(value) > limit:
            raise FsError(errno.ENOSPC)
        with self.transaction():
            self.db.execute(
                "INSERT INTO xattrs(inode, name, value) VALUES (?,?,?) "
                "ON CONFLICT(inode, name) DO UPDATE SET value=excluded.value",
                (ino, name, value),
            )
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (time.time_ns(), ino))

    def remove_xattr(self, ino: int, name: bytes) -> None:
        """Remove one attribute; ENODATA when there is none of that name."""
        with self.transaction():
            if (
                self.db.execute(
                    "DELETE FROM xattrs WHERE inode=? AND name=? RETURNING 1", (ino, name)
                ).fetchone()
                is None
            ):
                raise FsError(errno.ENODATA)
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (time.time_ns(), ino))

    # -- cache entries: placement, recency, eviction -------------------------

    def _links_up(self, ino: int) -> Iterator[tuple[int, int, bytes]]:
        """(inode, parent, name) from *ino* up to the link into the super-root.

        The one upward walk: it stops early at an inode without a name (a
        detached directory).  A directory has one name; a hard-linked file
        is walked up through any one of its names.
        """
        while True:
            link = self.link_of(ino)
            if link is None:
                return
            yield ino, *link
            if link[0] == SUPER_ROOT:
                return
            ino = link[0]

    def _extend_dir_path(self, parent: int, name: bytes, directory: int) -> None:
        """Remember *directory*'s path (its name is *name* in *parent*) from its parent's.

        The kernel looks a path up one name at a time, so the parent's is
        known (or walked once, for the first directory of a mount); this
        spares the upward walk at each directory's first file.  Kept
        consistent the way dir_path's own results are: a moved directory
        clears them all, a removed one drops its own, a rollback clears them.
        """
        if directory in self._dir_paths:
            return
        if parent == SUPER_ROOT:  # a class root: its path starts below it
            self._dir_paths[directory] = ([], [])
            return
        names, inodes = self.dir_path(parent)  # walked once per directory at most
        self._dir_paths[directory] = ([*names, name], [*inodes, directory])

    def dir_path(self, directory: int) -> tuple[list[bytes], list[int]]:
        """Names and inodes from the class root (exclusive) down to *directory*.

        For a detached directory, the part that is still linked.
        """
        cached = self._dir_paths.get(directory)
        if cached is not None:
            return cached
        names: list[bytes] = []
        inodes: list[int] = []
        for ino, parent, name in self._links_up(directory):
            if parent == SUPER_ROOT:
                break  # *ino* is the class root
            names.append(name)
            inodes.append(ino)
        path = (names[::-1], inodes[::-1])
        self._dir_paths[directory] = path
        return path

    # The shared tier's code still calls the earlier, private name.

    def _entry_key(self, ino: int, parent: int, name: bytes) -> EntryKey:
        names, inodes = self.dir_path(parent)
        offset, _tree = split_tree([*names, name])
        rule = entry_rule([*names[offset:], name])
        if rule.depth is not None:
            return EntryKey("dir", inodes[offset + rule.depth - 1])
        if rule.stem is not None:
            return EntryKey("stem", parent, rule.stem)
        return EntryKey("file", ino)

    # -- trees: the shared tree and the private ones (docs/security.md) ------

    def tree_path(self, directory: int) -> tuple[str, list[bytes]]:
        """(tree, names from that tree's root down to *directory*).

        The tree is `layouts.SHARED_TREE`, a user's tree name, or
        `layouts.USERS_TREE` for the `users` directory itself.
        """
        names, _inodes = self.dir_path(directory)
        offset, tree = split_tree(names)
        return tree, names[offset:]

    def links_of(self, ino: int) -> list[tuple[int, bytes]]:
        """(parent, name) of every name of *ino* (a hard-linked file has several)."""
        rows: list[tuple[int, bytes]] = self.db.execute(
            "SELECT parent, name FROM entries WHERE inode=? ORDER BY id", (ino,)
        ).fetchall()
        return rows

    def walk(self, start: int, names: Iterable[bytes]) -> Inode | None:
        """The directory reached from *start* through *names*, or None."""
        node: Inode | None = self.get(start)
        for name in names:
            node = self.lookup(start, name)
            if node is None or not node.is_dir:
                return None
            start = node.id
        return node

    def clone(
        self,
        parent: int,
        name: bytes,
        source: Inode,
        uid: int,
        gid: int,
        *,
        whole: bool,
        skip: Callable[[Inode], bool],
        copies: dict[int, int] | None = None,
    ) -> Inode:
        """Copy *source* (a node of the shared tree) into *parent* as *name*.

        Must run inside a transaction.  A file becomes a new inode that refers
        to the same object (no content is copied); a directory is copied with
        its subtree when *whole*, else empty; a symlink is copied.  Copies
        belong to *uid*/*gid* and lose the group and other write bits; they
        keep the source's extended attributes.  Names for which *skip* is
        true (being written, transient) stay behind.  Two names of one inode
        within one clone stay two names of one copy (*copies*: source inode
        to its copy so far).
        """
        copies = {} if copies is None else copies
        if source.id in copies:
            return self.link(copies[source.id], parent, name)
        mode = (source.mode & ~0o022) if not stat.S_ISLNK(source.mode) else source.mode
        node = self.make_node(parent, name, mode, uid, gid, target=source.target)
        self.db.execute(
            "INSERT INTO xattrs(inode, name, value) SELECT ?, name, value FROM xattrs "
            "WHERE inode=?",
            (node.id, source.id),
        )
        if source.nlink > 1:
            copies[source.id] = node.id
        if source.is_file and source.object is not None:
            self.set_content(node.id, source.object, source.size, source.mtime_ns)
            node = self.get(node.id)
        if source.is_dir and whole:
            for _entry, child_name, child in self.readdir(source.id, -1, 1 << 62):
                if not skip(child) and not is_transient(child_name):
                    self.clone(
                        node.id, child_name, child, uid, gid, whole=True, skip=skip, copies=copies
                    )
        return node

    def place_in_entry(self, ino: int, parent: int, name: bytes) -> int:
        """Put a file in the cache entry its path says (fsck repair; in a transaction)."""
        return self._place_in_entry(ino, parent, name, time.time_ns())

    def _place_in_entry(self, ino: int, parent: int, name: bytes, now_ns: int) -> int:
        # Placing a file is a use of its entry: an entry being assembled
        # (Triton writes its artifacts one by one, the group file last) is
        # among the most recent ones, never the next victim.
        key = self._entry_key(ino, parent, name)
        row = self.db.execute(
            "INSERT INTO cache_entries(key, root, last_read) VALUES (?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET last_read=max(last_read, excluded.last_read) "
            "RETURNING id",
            (key.encode(), key.root, now_ns),
        ).fetchone()
        entry_id: int = row[0]
        self.db.execute("UPDATE inodes SET entry=? WHERE id=?", (entry_id, ino))
        return entry_id

    def _replace_after_move(self, moved: Inode, new_parent: int, new_name: bytes, now: int) -> None:
        """A renamed file, or every file under a renamed directory, may change entry."""
        if moved.is_dir:
            self._dir_paths.clear()
            files = self.db.execute(
                _names_below("inode=?") + "SELECT t.inode, t.parent, t.name, i.entry FROM tree t "
                f"JOIN inodes i ON i.id = t.inode WHERE (i.mode & {_S_IFMT}) = {stat.S_IFREG}",
                (moved.id,),
            ).fetchall()
        elif moved.is_file:
            files = [(moved.id, new_parent, new_name, moved.entry)]
        else:
            return
        for ino, parent, name, old_entry in files:
            new_entry = self._place_in_entry(ino, parent, name, now)
            if old_entry is not None and old_entry != new_entry:
                self._drop_cache_entry_if_empty(old_entry)

    def _move_to_survivor(
        self, ino: int, entry_id: int, survivor: tuple[int, bytes], now: int
    ) -> None:
        """A hard-linked file lost a name: it now belongs to the entry of *survivor*."""
        if self._place_in_entry(ino, *survivor, now) != entry_id:
            self._drop_cache_entry_if_empty(entry_id)

    def _drop_cache_entry_if_empty(self, entry_id: int) -> None:
        if (
            self.db.execute("SELECT 1 FROM inodes WHERE entry=? LIMIT 1", (entry_id,)).fetchone()
            is None
        ):
            self.drop_cache_entry(entry_id)

    def drop_cache_entry(self, entry_id: int) -> None:
        """Delete a cache entry's row (its files keep pointing at it: callers see to them)."""
        self.db.execute("DELETE FROM cache_entries WHERE id=?", (entry_id,))

    def _migrate_recency_to_ns(self) -> None:
        """Stores made before recency had nanosecond resolution kept seconds."""
        stale = (1, _NS_FLOOR - 1)
        if (
            self.db.execute(
                "SELECT 1 FROM cache_entries WHERE last_read BETWEEN ? AND ? LIMIT 1", stale
            ).fetchone()
            is None
        ):
            return
        with self.transaction():
            self.db.execute(
                "UPDATE cache_entries SET last_read = last_read * 1000000000 "
                "WHERE last_read BETWEEN ? AND ?",
                stale,
            )

    def touch_entries(self, reads: Iterable[tuple[int, int]]) -> None:
        """Record read times (entry id, unix nanoseconds) in one transaction."""
        with self.transaction():
            self.db.executemany(
                "UPDATE cache_entries SET last_read=max(last_read, ?) WHERE id=?",
                [(when, entry_id) for entry_id, when in reads],
            )

    def entry_count(self) -> int:
        count: int = self.db.execute("SELECT count(*) FROM cache_entries").fetchone()[0]
        return count

    def entries_by_age(
        self, limit: int, after: tuple[int, int] | None = None, read_before: int | None = None
    ) -> list[tuple[int, int]]:
        """(last_read, id) of up to *limit* entries, least recently read first.

        *after* continues from the last pair returned (keyset paging on the
        `cache_entries_age` index: a call costs the rows it returns, whatever
        the size of the store and however many entries were skipped before);
        *read_before* (unix ns) stops at the first entry read at or after it.
        Ties in last_read go by id, i.e. the older entry first.
        """
        last_read, entry_id = after if after is not None else (-1, -1)
        cutoff = read_before if read_before is not None else _NS_MAX
        rows: list[tuple[int, int]] = self.db.execute(
            "SELECT last_read, id FROM cache_entries "
            "WHERE (last_read, id) > (?, ?) AND last_read < ? ORDER BY last_read, id LIMIT ?",
            (last_read, entry_id, cutoff, limit),
        ).fetchall()
        return rows

    def entry_table(self) -> dict[int, tuple[EntryKey, int, int]]:
        """id -> (key, root, last_read) of every cache entry (selection by path)."""
        return {
            row[0]: (EntryKey.decode(row[1]), row[2], row[3])
            for row in self.db.execute("SELECT id, key, root, last_read FROM cache_entries")
        }

    def entry_key(self, entry_id: int) -> EntryKey | None:
        """The key of cache entry *entry_id*, None when there is no such entry."""
        row = self.db.execute("SELECT key FROM cache_entries WHERE id=?", (entry_id,)).fetchone()
        return None if row is None else EntryKey.decode(row[0])

    def entry_location(self, entry_id: int) -> tuple[bytes, bytes] | None:
        """(device class, path below the class root) that names an entry, for people.

        A directory entry is its directory's path, a stem entry ``dir/stem.*``
        and a single file its own path.
        """
        key = self.entry_key(entry_id)
        if key is None:
            return None
        directory, leaf = key.root, key.leaf
        if key.kind == "file":
            link = self.link_of(key.root)
            if link is None:
                return None
            directory, leaf = link
        climbed = self._climb(directory)
        if climbed is None:
            return None
        device_class, names = climbed
        return device_class, b"/".join([*names, leaf] if leaf else names)

    def class_of(self, directory: int) -> bytes | None:
        """The device class whose tree holds *directory* (None when detached)."""
        climbed = self._climb(directory)
        return None if climbed is None else climbed[0]

    def _climb(self, directory: int) -> tuple[bytes, list[bytes]] | None:
        """(device class, names from the class root down to *directory*), None if detached."""
        names: list[bytes] = []
        for _ino, parent, name in self._links_up(directory):
            if parent == SUPER_ROOT:
                return name, names[::-1]
            names.append(name)
        return None

    def entry_content(self, entry_id: int) -> list[tuple[bytes, int, int, int]]:
        """(object, size, refcount, files of this entry using it) for each object of an entry.

        What removing the entry would free, without removing it: an object
        goes when every file that uses it goes (dry runs).
        """
        rows: list[tuple[bytes, int, int, int]] = self.db.execute(
            "SELECT o.hash, o.size, o.refcount, count(*) FROM inodes i "
            "JOIN objects o ON o.hash = i.object WHERE i.entry=? GROUP BY o.hash",
            (entry_id,),
        ).fetchall()
        return rows

    def entry_in_progress(self, entry_id: int) -> bool:
        """True while a writer is assembling a directory entry.

        Triton publishes each file through a ``tmp.pid_*`` directory inside
        the key directory (makedirs, write, replace, removedirs); evicting the
        key directory between its makedirs and its open would fail the
        compile with ENOENT.  Such a directory's presence marks the entry busy.
        """
        key = self.entry_key(entry_id)
        if key is None or key.kind != "dir":
            return False
        return bool(self.names_with_prefix(key.root, TRITON_TMP_PREFIX, limit=1))

    def entry_objects(self, entry_id: int) -> list[tuple[int, bytes]]:
        """(inode, object digest) of every file in a cache entry."""
        return self.db.execute(
            "SELECT id, object FROM inodes WHERE entry=? AND object IS NOT NULL", (entry_id,)
        ).fetchall()

    def entries_using(self, digest: bytes) -> list[int]:
        """The cache entries with a linked file whose content is *digest*."""
        return self._column(
            "SELECT DISTINCT entry FROM inodes WHERE object=? AND entry IS NOT NULL", (digest,)
        )

    def entry_files(self, entry_id: int) -> list[int]:
        return self._column("SELECT id FROM inodes WHERE entry=?", (entry_id,))

    def evict_entry(self, entry_id: int, held: Callable[[int], bool]) -> EvictedEntry:
        """Remove a cache entry whole, in one transaction.

        Every file's content reference is dropped at once, so the bytes count
        as freed now.  Inodes for which *held* is true (the kernel or an open
        handle still has them) stay as unlinked rows without content until
        the caller frees them; an open handle keeps reading through the
        object file descriptor it already has.  Names come back parents
        first, so the caller can invalidate them deepest first.  The cost is
        that of the rows removed (indexed), whatever the size of the store.
        """
        key = self.entry_key(entry_id)
        result = EvictedEntry([], [], [], 0)
        if key is None:
            return result
        others: set[int] = set()
        with self.transaction():
            if key.kind == "dir":
                names = self.db.execute(
                    _names_below("inode=?") + "SELECT parent, name, inode FROM tree",
                    (key.root,),
                ).fetchall()
                top_parent = self.parent_of(key.root)
                if top_parent is not None:
                    self._touch_dir(top_parent, time.time_ns(), nlink_delta=-1)
            else:
                names = self.db.execute(
                    "SELECT e.parent, e.name, e.inode FROM inodes i "
                    "JOIN entries e ON e.inode = i.id WHERE i.entry=?",
                    (entry_id,),
                ).fetchall()
                # A hard link elsewhere is not part of this entry: it keeps
                # the inode (and its content) alive.
                names = [
                    (parent, name, ino)
                    for parent, name, ino in names
                    if self._entry_key(ino, parent, name) == key
                ]
            removed: dict[int, int] = {}
            for parent, name, ino in names:
                self.db.execute("DELETE FROM entries WHERE parent=? AND name=?", (parent, name))
                removed[ino] = removed.get(ino, 0) + 1
            now = time.time_ns()
            for parent, name, ino in names:
                result.names.append((parent, name, ino))
                self._dir_paths.pop(ino, None)
            for ino, count in removed.items():
                survivor = self.link_of(ino)
                if survivor is not None:
                    (entry,) = self.db.execute(
                        "UPDATE inodes SET nlink=nlink-?, ctime_ns=? WHERE id=? RETURNING entry",
                        (count, now, ino),
                    ).fetchone()
                    if entry == entry_id:
                        self._place_in_entry(ino, *survivor, now)
                    continue
                digest, size, entry = self.db.execute(
                    "UPDATE inodes SET nlink=0, entry=NULL WHERE id=? "
                    "RETURNING object, size, entry",
                    (ino,),
                ).fetchone()
                if entry is not None and entry != entry_id:
                    others.add(entry)  # moved in under this directory: goes with it
                before = self.stored_bytes
                if held(ino):
                    result.held.append(ino)
                    self.db.execute("UPDATE inodes SET object=NULL WHERE id=?", (ino,))
                    unused = None
                    if digest is not None:
                        self.logical_bytes -= size
                        unused = self._decref(digest)
                else:
                    unused = self._delete_inode(ino, digest, size)
                if unused is not None:
                    result.unused_objects.append(unused)
                    result.bytes_freed += before - self.stored_bytes
            self.drop_cache_entry(entry_id)
            for other in others:
                self._drop_cache_entry_if_empty(other)
        return result

    # -- verification marks (docs/crash-safety.md) ---------------------------

    def begin_epoch(self) -> int:
        """Start a new mount epoch (a daemon starts serving); marks made now carry it."""
        with self.transaction():
            epoch = int(str(self.get_meta("mount_epoch", 0))) + 1
            self.set_meta("mount_epoch", epoch)
        self.epoch = epoch
        return epoch

    def end_epoch_cleanly(self) -> None:
        """Every mark made so far is trusted from now on (the objects were synced)."""
        self.set_meta("clean_epoch", self.get_meta("mount_epoch", 0))

    def forget_marks_since_clean(self) -> int:
        """After an unclean stop: drop every mark made since the last clean epoch.

        Objects sealed or verified since then may not have reached the disk
        (a power loss), so they are hashed again before they are served.
        """
        with self.transaction():
            cursor = self.db.execute(
                "UPDATE objects SET verified_epoch=NULL, verified_ctime=NULL "
                "WHERE verified_epoch > ?",
                (int(str(self.get_meta("clean_epoch", 0))),),
            )
        return cursor.rowcount

    def verification_mark(self, digest: bytes) -> tuple[int, int] | None:
        """(size, ctime of the file when verified) of a marked object, else None."""
        row = self.db.execute(
            "SELECT size, verified_ctime FROM objects WHERE hash=? AND verified_epoch IS NOT NULL",
            (digest,),
        ).fetchone()
        return (row[0], row[1]) if row is not None else None

    def mark_verified(self, digest: bytes, ctime_ns: int) -> None:
        """Record that *digest*'s file, with this ctime, matched its hash (when serving)."""
        if self.epoch is None:
            return
        with self.transaction():
            self.db.execute(
                "UPDATE objects SET verified_epoch=?, verified_ctime=? WHERE hash=?",
                (self.epoch, ctime_ns, digest),
            )

    def forget_mark(self, digest: bytes) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE objects SET verified_epoch=NULL, verified_ctime=NULL WHERE hash=?",
                (digest,),
            )

    def objects_after(self, after: bytes, limit: int) -> list[tuple[bytes, int]]:
        """(digest, size) of up to *limit* objects after *after*, in hash order (the scrub)."""
        return self.db.execute(
            "SELECT hash, size FROM objects WHERE hash > ? AND hash != ? ORDER BY hash LIMIT ?",
            (after, EMPTY_DIGEST, limit),
        ).fetchall()

    def save_scrub_progress(self, cursor: bytes, progress: dict[str, int]) -> None:
        """Where the scrub's pass stands (scrub.py): the last object checked and the counts."""
        with self.transaction():
            self.set_meta("scrub.cursor", cursor)
            for name, value in progress.items():
                self.set_meta(f"scrub.{name}", value)

    # -- the invariant checker's queries and repairs (fsck.py) -------------------
    # The repairs change rows as they are told, without keeping the running
    # totals current: fsck runs with no daemon, and the next open recounts.

    def object_references(self) -> dict[bytes, int]:
        """Object digest -> how many inodes refer to it."""
        return dict(
            self.db.execute(
                "SELECT object, count(*) FROM inodes WHERE object IS NOT NULL GROUP BY object"
            )
        )

    def object_rows(self) -> list[tuple[bytes, int, int]]:
        """(digest, size, refcount) of every object row."""
        return self.db.execute("SELECT hash, size, refcount FROM objects").fetchall()

    def unplaced_files(self) -> list[int]:
        """Linked regular files whose cache entry does not exist."""
        return self._column(
            "SELECT i.id FROM inodes i LEFT JOIN cache_entries c ON c.id = i.entry "
            f"WHERE (i.mode & {_S_IFMT}) = {stat.S_IFREG} AND i.nlink > 0 AND c.id IS NULL"
        )

    def empty_cache_entries(self) -> list[int]:
        """Cache entries that no inode belongs to."""
        return self._column(
            "SELECT c.id FROM cache_entries c WHERE NOT EXISTS "
            "(SELECT 1 FROM inodes i WHERE i.entry = c.id)"
        )

    def names_per_inode(self) -> dict[int, int]:
        """Inode -> how many names it has."""
        return dict(self.db.execute("SELECT inode, count(*) FROM entries GROUP BY inode"))

    def subdirs_per_dir(self) -> dict[int, int]:
        """Directory -> how many directories it holds."""
        return dict(
            self.db.execute(
                "SELECT e.parent, count(*) FROM entries e JOIN inodes i ON i.id = e.inode "
                f"WHERE (i.mode & {_S_IFMT}) = {stat.S_IFDIR} GROUP BY e.parent"
            )
        )

    def inode_summaries(self) -> list[tuple[int, int, int, int, bytes | None]]:
        """(inode, mode, nlink, size, object) of every inode."""
        return self.db.execute("SELECT id, mode, nlink, size, object FROM inodes").fetchall()

    def xattr_owners_missing(self) -> list[int]:
        """Inode numbers that have extended attributes but no inode row."""
        return self._column(
            "SELECT DISTINCT x.inode FROM xattrs x LEFT JOIN inodes i ON i.id = x.inode "
            "WHERE i.id IS NULL"
        )

    def dangling_names(self) -> list[tuple[int, int, int]]:
        """(name id, parent, inode) of names whose parent is not a directory or whose
        parent or inode does not exist."""
        return self.db.execute(
            "SELECT e.id, e.parent, e.inode FROM entries e "
            "LEFT JOIN inodes p ON p.id = e.parent LEFT JOIN inodes c ON c.id = e.inode "
            f"WHERE p.id IS NULL OR c.id IS NULL OR (p.mode & {_S_IFMT}) != {stat.S_IFDIR}"
        ).fetchall()

    def set_refcount(self, digest: bytes, refcount: int) -> None:
        self.db.execute("UPDATE objects SET refcount=? WHERE hash=?", (refcount, digest))

    def delete_object_row(self, digest: bytes) -> None:
        self.db.execute("DELETE FROM objects WHERE hash=?", (digest,))

    def remove_object(self, digest: bytes) -> None:
        """Delete the object row and every inode still using it, with their names."""
        for (ino,) in self.db.execute("SELECT id FROM inodes WHERE object=?", (digest,)).fetchall():
            self.db.execute("DELETE FROM entries WHERE inode=?", (ino,))
            self.db.execute("DELETE FROM inodes WHERE id=?", (ino,))
            self.drop_xattrs(ino)
        self.delete_object_row(digest)

    def restore_empty_object(self, refcount: int) -> None:
        """The empty object's row, with *refcount* (its file exists)."""
        self.db.execute(
            "INSERT INTO objects(hash, size, refcount) VALUES (?, 0, ?) "
            "ON CONFLICT(hash) DO UPDATE SET refcount=excluded.refcount",
            (EMPTY_DIGEST, refcount),
        )

    def unlink_everywhere(self, ino: int) -> None:
        """Remove every name of *ino* and mark it unlinked (free_inode deletes it)."""
        self.db.execute("DELETE FROM entries WHERE inode=?", (ino,))
        self.db.execute("UPDATE inodes SET nlink=0 WHERE id=?", (ino,))

    def set_nlink(self, ino: int, nlink: int) -> None:
        self.db.execute("UPDATE inodes SET nlink=? WHERE id=?", (nlink, ino))

    def drop_xattrs(self, ino: int) -> None:
        self.db.execute("DELETE FROM xattrs WHERE inode=?", (ino,))

    def drop_name(self, name_id: int) -> None:
        """Delete one directory entry by its row id (a dangling name)."""
        self.db.execute("DELETE FROM entries WHERE id=?", (name_id,))

    # -- counters ---------------------------------------------------------

    def save_counters(self, rows: Iterable[tuple[str, str, int]], gauges: dict[str, int]) -> None:
        with self.transaction():
            self.db.executemany(
                "INSERT INTO counters(name, labels, value) VALUES (?,?,?) "
                "ON CONFLICT(name, labels) DO UPDATE SET value=excluded.value",
                list(rows),
            )
            for name, value in gauges.items():
                self.set_meta(_GAUGE_PREFIX + name, value)


_S_IFMT = 0o170000
_GAUGE_PREFIX = "gauge."
# The regular files among the inodes of a `tree` (see _names_below).
_FILES_IN_TREE = (
    "FROM (SELECT DISTINCT inode FROM tree) t JOIN inodes i ON i.id = t.inode "
    f"WHERE (i.mode & {_S_IFMT}) = {stat.S_IFREG}"
)
# Recency is kept in unix nanoseconds; anything below this (1970-01-02 in ns)
# is a value from the days of whole seconds.
_NS_FLOOR = 10**14
_NS_MAX = (1 << 63) - 1
_SETTABLE = frozenset({"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns"})


def _names_below(start: str) -> str:
    """A `tree(parent, name, inode)` of the names matching *start* and every name below them.

    It walks names, not inodes: a hard-linked file is reached through each
    of its names below the start, never through a name elsewhere.
    """
    return (
        "WITH RECURSIVE tree(parent, name, inode) AS ("
        f"  SELECT parent, name, inode FROM entries WHERE {start} UNION ALL "
        "  SELECT e.parent, e.name, e.inode FROM entries e JOIN tree t ON e.parent = t.inode) "
    )


class WalCheckpointer:
    """Copies committed WAL frames into the database file, off the request path.

    With synchronous=NORMAL every fsync of the index happens at a checkpoint.
    SQLite's automatic checkpoint runs inside the commit that crosses its
    threshold, so one request in a few hundred paid for copying and syncing
    the whole WAL (milliseconds, where a commit costs tens of microseconds).
    The daemon calls `checkpoint` from a worker thread on a connection of
    its own, shortly after commits; PASSIVE neither waits for nor blocks the
    daemon's writes or any reader.  Durability is unchanged: a commit still
    survives the death of the process the moment it returns.
    """

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def checkpoint(self) -> int:
        """Checkpoint what no reader still needs; return the WAL frames copied so far."""
        _busy, _frames, copied = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(copied)

    def close(self) -> None:
        self.db.close()


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction; nested use joins the outer one."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # Also when COMMIT itself fails (disk full): a transaction left open
        # would swallow every later statement into it.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
