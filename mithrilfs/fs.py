"""The pyfuse3 request handlers.

Handlers translate a request into calls on the index (namespace) and the
open-file layer (content), and turn the outcome into what the kernel
expects.  This is the one place where errors become errnos: `FsError`
carries its own, a few `OSError`s from the backing disk pass through (ENOSPC
must reach the writer as ENOSPC), and anything unexpected is logged with its
traceback and answered with EIO so that the mount stays up.

The kernel sees inode 1 as the root; here that is the root directory of the
mount's device class.  Every other inode number is the index's own.

Tenancy (docs/security.md): every change of a name or of content is checked
against the tree it is in: the shared tree takes changes from trusted
writers only, `users/` and the private roots from nobody; a name missing in
a private directory is cloned from the shared tree at its first lookup.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from mithrilfs.errors import FsError
from mithrilfs.index import (
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SUPER_ROOT,
    Inode,
)
from mithrilfs.layouts import (
    OTHER_LAYOUT,
    SHARED_TREE,
    USERS_DIR,
    USERS_TREE,
    EntryMarker,
    entry_marker,
    layout_of,
)
from mithrilfs.permissions import inherit_from, without_privileges
from mithrilfs.services import Services
from mithrilfs.trees import BeingWritten
from mithrilfs.xattrs import INODE_XATTR_BYTES
from mithrilfs.xattrs import check_name as check_xattr_name

log = logging.getLogger(__name__)

# Every change to the namespace goes through this daemon and so through the
# kernel, which updates its own caches as it forwards them; names the
# filesystem drops on its own are invalidated explicitly.  So the kernel may
# keep what it learns for a long time, negative lookups included.
ENTRY_TIMEOUT = 3600.0
ATTR_TIMEOUT = 3600.0
NEGATIVE_TIMEOUT = 3600.0
# Python and cp size their buffers by st_blksize; 4 KiB would mean many
# small reads per file.
BLOCK_SIZE = 128 * 1024
READDIR_BATCH = 256
STATFS_BLOCK = 4096

# What `layouts` records for a private root (users/<name>), whose children
# are layout roots like the mount root's.
_PRIVATE_ROOT = "private-root"
# The tree label of misses in users/ (names nobody has a tree for).
_USERS_LABEL = USERS_DIR.decode()

# OSErrors from the backing store that mean the same to the caller.
_PASSTHROUGH_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
# SQLite's result code for a full disk.  Python 3.10's sqlite3 gives neither
# the constant nor the error's code, only SQLite's message for it.
_SQLITE_FULL = 13
_SQLITE_FULL_MESSAGE = "database or disk is full"


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return _SQLITE_FULL_MESSAGE in str(exc)
    return code == _SQLITE_FULL


P = ParamSpec("P")
R = TypeVar("R")


def guarded(
    handler: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    """Map every failure of *handler* to a FUSEError; never let one escape."""

    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(self, *args, **kwargs)
        except FUSEError:
            raise
        except FsError as exc:
            raise FUSEError(exc.errno) from None
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                log.exception("%s failed", handler.__name__)
                raise FUSEError(errno.EIO) from None
            log.warning("%s: the store's disk is full", handler.__name__)
            raise FUSEError(errno.ENOSPC) from None
        except OSError as exc:
            if exc.errno in _PASSTHROUGH_ERRNOS:
                raise FUSEError(exc.errno) from None
            log.exception("%s failed", handler.__name__)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise FUSEError(errno.EIO) from None

    functools.update_wrapper(wrapper, handler)
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        services: Services,
        *,
        read_only: bool = False,
        xattrs: bool = False,
    ):
        """Handlers over *services*, built and connected by `services.build_services`."""
        super().__init__()
        self.index = services.index
        self.store = services.content
        self.root = services.root
        self.read_only = read_only
        self.xattrs = xattrs
        self.stats = services.stats
        self.files = services.files
        self.evictor = services.evictor
        self.kernel = services.kernel
        # How many times the kernel holds each inode (lookup count); an
        # unlinked inode is freed only when this drops to zero.
        self.lookups = services.kernel.lookups
        # The layout (triton, inductor, other) of each inode the kernel holds,
        # for the per-layout counters.
        self.layouts: dict[int, str] = {}
        # The tree (layouts.SHARED_TREE or a user's tree name) of each inode
        # the kernel holds: for the per-tree counters and the presentation.
        self.held_trees: dict[int, str] = {}
        # Held inodes that mark a cache entry, for the compile-level hit and
        # miss counters: opened for reading, the entry was found; created
        # (or renamed into place), it was compiled.
        self.markers: dict[int, EntryMarker] = {}
        # Markers created in this mount whose creator has not read them back yet.
        self.unread_markers: set[int] = set()
        self.trust = services.trust
        self.trees = services.trees
        self.users = self.trees.users
        # Cache entries whose objects were all checked against their hashes.
        self.verified_entries: set[int] = set()
        # Unlinked inodes nobody holds whose free failed; retried by housekeeping.
        self.unfreed: set[int] = set()
        # The shared tier, consulted on a local miss; with it, a name the
        # kernel was told is missing may appear without passing through the
        # kernel, so negative lookups are cached only briefly.
        self.remote = services.remote
        self.negative_timeout = (
            NEGATIVE_TIMEOUT if self.remote is None else self.remote.negative_ttl
        )

    # -- inode numbers and attributes ---------------------------------------

    def _ino(self, fuse_ino: int) -> int:
        return self.root if fuse_ino == pyfuse3.ROOT_INODE else fuse_ino

    def _fuse_ino(self, ino: int) -> pyfuse3.InodeT:
        return pyfuse3.ROOT_INODE if ino == self.root else pyfuse3.InodeT(ino)

    def _attrs(self, node: Inode, tree: str | None = None) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._fuse_ino(node.id)
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = pyfuse3.ModeT(self._shown_mode(node, tree or self.held_trees.get(node.id)))
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = node.rdev
        size = node.size
        mtime = node.mtime_ns
        unsealed = self.files.unsealed(node.id) if node.is_file else None
        if unsealed is not None:
            size, mtime = unsealed
        attrs.st_size = size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns = node.atime_ns
        attrs.st_mtime_ns = mtime
        attrs.st_ctime_ns = node.ctime_ns
        return attrs

    def _shown_mode(self, node: Inode, tree: str | None) -> int:
        """The stored mode, plus write bits on the shared tree when non-root writers are trusted.

        Those writers must pass the kernel's default_permissions check on
        uid 0's directories and files (inductor reopens lock files O_RDWR);
        the daemon's trust check is then what refuses everyone else.
        """
        mode = node.mode
        if self.trust.root_only or tree != SHARED_TREE or stat.S_ISLNK(mode):
            return mode
        granted = (mode & 0o011) << 1 if node.is_dir else (mode & 0o044) >> 1
        return mode | granted

    def _remember(
        self, node: Inode, layout: str | None = None, tree: str | None = None
    ) -> pyfuse3.EntryAttributes:
        """Reply with an entry the kernel will now hold: count it."""
        self.lookups[node.id] = self.lookups.get(node.id, 0) + 1
        if layout is not None:
            self.layouts[node.id] = layout
        if tree is not None:
            self.held_trees[node.id] = tree
        return self._attrs(node)

    def _layout_below(self, parent: int, name: bytes) -> str:
        if parent == self.root or self.layouts.get(parent) == _PRIVATE_ROOT:
            return layout_of(name)
        if parent == self.users:
            return _PRIVATE_ROOT  # its children are the layout roots of that tree
        return self.layouts.get(parent, OTHER_LAYOUT)

    def _note_marker(self, parent: int, name: bytes, ino: int, *, created: bool = False) -> None:
        """Remember whether the name *ino* is held under marks a cache entry.

        A creation is a miss (the compiler compiled); the hit is counted when
        the marker is opened for reading (`open`).
        """
        tree, names = self.index.tree_path(parent)
        marker = entry_marker([*names, name])
        if marker is None:
            self.markers.pop(ino, None)
            return
        self.markers[ino] = marker
        if created:
            self.stats.inc(
                "cache_entries_total", result="miss", kind=marker.kind, tree=tree or SHARED_TREE
            )
            if marker.read_back_by_creator:
                self.unread_markers.add(ino)

    def _tree_below(self, parent: int, name: bytes) -> str:
        if parent == self.root:
            return USERS_TREE if name == USERS_DIR else SHARED_TREE
        if parent == self.users:
            return name.decode(errors="replace")
        return self.held_trees.get(parent, SHARED_TREE)

    async def _entry_intact(self, entry_id: int) -> bool:
        """Verify a whole cache entry the first time one of its names is looked up.

        Checking at lookup, not only at open, matters: Triton stats every file
        of a group before it opens any, so a file that vanished only at open
        would crash it instead of being a miss.  An object with a valid
        verification mark costs a stat; only the others are hashed.
        """
        if entry_id in self.verified_entries:
            return True
        for ino, digest in self.index.entry_objects(entry_id):
            if self.files.is_being_written(ino):
                continue
            if not await self.files.object_intact(digest):
                if (ino, digest) not in self.index.entry_objects(entry_id):
                    return False  # evicted while it was checked: gone, not corrupt
                self._drop_corrupt(digest, ino)
                return False
        self.verified_entries.add(entry_id)
        return True

    def _drop_corrupt(self, digest: bytes, ino: int | None) -> None:
        """An object no longer matches its hash: never serve it again.

        *ino* is the inode it was opened as (None: found by the scrub).
        """
        log.error(
            "object %s (%s) does not match its hash; dropping every cache entry that uses it",
            digest.hex(),
            "found by the scrub" if ino is None else f"opened as inode {ino}",
        )
        self.stats.inc("integrity_failures_total")
        self.files.forget_verified(digest)
        self.evictor.remove_entries(self.index.entries_using(digest), "integrity")
        if self.index.object_size(digest) is not None:
            self.index.forget_mark(digest)  # a file outside any entry: hashed at its next open
        if ino is not None:
            self._maybe_free(ino)

    def drop_corrupt_object(self, digest: bytes) -> None:
        """The scrub found *digest* damaged (or gone)."""
        self._drop_corrupt(digest, None)

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    # -- tenancy: trees.py decides, the handlers ask ---------------------------

    def _check_change(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> tuple[str, int, int]:
        """The tree of *name* in *parent* and the owner new nodes there get, if allowed."""
        self._writable()
        return self.trees.check_change(parent, name, ctx.uid, ctx.gid, ctx.pid)

    def _check_new(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> tuple[str, int, int, int]:
        """Like _check_change, for a new node: its tree, mode, uid and gid."""
        tree, uid, gid = self._check_change(parent, name, ctx)
        mode, gid = inherit_from(self.index.get(parent), mode, gid)
        return tree, mode, uid, gid

    def _clone_shared(self, parent: int, name: bytes, label: str, tree: str) -> Inode | None:
        """The shared tree's *name* cloned into the private directory *parent*, if it is there."""
        try:
            return self.trees.clone_missing(parent, only=name)
        except BeingWritten:
            # A miss the kernel must not cache: once its writer closes it, the
            # shared name is there to clone, and nothing else would tell the
            # kernel so.
            self.stats.inc("lookups_total", result="miss", layout=label, tree=tree)
            raise FsError(errno.ENOENT) from None

    def _shared_name_appeared(self, parent: int, name: bytes) -> None:
        """A name appeared in a shared directory: drop negative entries in private views.

        Only directories the kernel holds can have cached entries below them
        (and before the FUSE handshake nothing may be notified).
        """
        self.kernel.shared_name_appeared(parent, name)

    def _maybe_free(self, ino: int) -> None:
        """Delete an unlinked inode once neither the kernel nor a handle holds it.

        A failure (the index locked or full) is logged and the inode kept in
        `unfreed` for `retry_frees`: a request whose own work is done must not
        fail for it, and `forget` must never fail at all.
        """
        if ino in self.lookups or self.files.is_open(ino):
            self.unfreed.discard(ino)  # held again: freed by whoever lets go last
            return
        try:
            unused = self.index.free_inode(ino)
        except (sqlite3.Error, OSError) as exc:
            log.warning("freeing inode %d failed, will retry: %s", ino, exc)
            self.unfreed.add(ino)
            return
        self.unfreed.discard(ino)
        if unused is not None:
            self.store.delete(unused)

    def retry_frees(self) -> int:
        """Free the inodes whose free failed before (housekeeping); returns how many are left."""
        for ino in list(self.unfreed):
            self._maybe_free(ino)
        return len(self.unfreed)

    def forget_all(self) -> None:
        """At unmount the kernel forgets everything at once."""
        self.files.close_all()
        remembered = list(self.lookups)
        self.lookups.clear()
        for ino in remembered:
            self._maybe_free(ino)

    # -- names ----------------------------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._ino(parent_inode)
        if name == b".":
            return self._remember(self.index.get(parent))
        if name == b"..":
            up = self.index.parent_of(parent) if parent != self.root else None
            return self._remember(self.index.get(up if up not in (None, SUPER_ROOT) else self.root))
        if len(name) > NAME_MAX:
            # The kernel passes names up to 1024 bytes; POSIX wants ENAMETOOLONG, not ENOENT.
            raise FsError(errno.ENAMETOOLONG)
        layout = self._layout_below(parent, name)
        tree = self._tree_below(parent, name)
        label = layout if layout != _PRIVATE_ROOT else OTHER_LAYOUT
        node = self.index.lookup(parent, name)
        if node is None and parent == self.users:
            node = self.trees.make_private_root(name, ctx.uid, ctx.gid)
            if node is None:
                # Not cached: the kernel's dentries are everyone's, and this
                # name may be made at its owner's first lookup.  Counted under
                # one label: probed names must not become counter rows.
                self.stats.inc("lookups_total", result="miss", layout=label, tree=_USERS_LABEL)
                raise FsError(errno.ENOENT)
        private = tree not in (SHARED_TREE, USERS_TREE)
        if node is None and private:
            node = self._clone_shared(parent, name, label, tree)
        if node is None and self.remote is not None:
            # This tree's own namespace first (a private tree's entries follow
            # their owner across nodes), then, below a private directory, the
            # shared tree's, cloned like any shared name.
            if await self.remote.lookup(parent, name) is not None:
                node = self.index.lookup(parent, name)  # what is there after the await
            elif private:
                shared_parent = self.trees.shared_counterpart_dir(parent)
                if (
                    shared_parent is not None
                    and await self.remote.lookup(shared_parent, name) is not None
                ):
                    node = self.index.lookup(parent, name) or self._clone_shared(
                        parent, name, label, tree
                    )
        # Verification awaits (large entries hash in a thread), and eviction
        # may remove the entry meanwhile: answer from what is there after
        # each await, never from what was there before it.
        while node is not None and node.entry is not None:
            if node.entry in self.verified_entries:
                break
            changes = self.index.changes
            intact = await self._entry_intact(node.entry)
            if self.index.changes != changes:
                node = self.index.lookup(parent, name)
            if not intact and node is not None:
                self.stats.inc("lookups_total", result="miss", layout=label, tree=tree)
                raise FsError(errno.ENOENT)  # dropped: the compiler sees a clean miss
        if node is None:
            self.stats.inc("lookups_total", result="miss", layout=label, tree=tree)
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = pyfuse3.InodeT(0)
            negative.entry_timeout = self.negative_timeout
            return negative
        self.stats.inc("lookups_total", result="hit", layout=label, tree=tree)
        if layout != OTHER_LAYOUT and node.is_file:
            self._note_marker(parent, name, node.id)
        return self._remember(node, layout, tree)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Not guarded: pyfuse3 gives forget no reply to carry an error, and
        # anything raised here would end its main loop, so nothing may be.
        for fuse_ino, count in inode_list:
            ino = self._ino(fuse_ino)
            remaining = self.lookups.get(ino, 0) - count
            if remaining > 0:
                self.lookups[ino] = remaining
                continue
            self.lookups.pop(ino, None)
            self.layouts.pop(ino, None)
            self.held_trees.pop(ino, None)
            self.markers.pop(ino, None)
            self.unread_markers.discard(ino)
            try:
                self._maybe_free(ino)
            except Exception:
                log.exception("forget of inode %d failed; freeing it later", ino)
                self.unfreed.add(ino)

    @guarded
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self.index.get(self._ino(inode)))

    @guarded
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino = self._ino(inode)
        self._writable()
        self.trees.check_node_change(ino, ctx.uid, ctx.gid, ctx.pid)
        node = self.index.get(ino)
        now = time.time_ns()
        if fields.update_size:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_file:
                raise FsError(errno.EINVAL)
            await self.files.truncate(ino, attr.st_size, fh)
            node = self.index.get(ino)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            self.files.set_mtime(ino, attr.st_mtime_ns)
        # Every setattr is a change of the inode, even chown(-1, -1): ext4
        # sets ctime for it (only utimensat with both UTIME_OMIT never comes).
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now
        with self.index.transaction():
            self.index.set_attrs(ino, **changes)
        return self._attrs(self.index.get(ino))

    @guarded
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.index.get(self._ino(inode))
        if node.target is None:
            raise FsError(errno.EINVAL)
        return node.target

    @guarded
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self._ino(parent_inode)
        tree, mode, uid, gid = self._check_new(parent, name, mode, ctx)
        # FIFOs, sockets and device nodes are metadata only; the kernel has
        # already refused device nodes to callers without CAP_MKNOD, and the
        # mount is nodev, so a device node is never opened as a device.
        with self.index.transaction():
            node = self.index.make_node(parent, name, mode, uid, gid, rdev=rdev)
        self._shared_name_appeared(parent, name)
        return self._remember(node, self._layout_below(parent, name), tree)

    @guarded
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self._ino(parent_inode)
        dir_mode = stat.S_IFDIR | stat.S_IMODE(mode)
        tree, dir_mode, uid, gid = self._check_new(parent, name, dir_mode, ctx)
        with self.index.transaction():
            node = self.index.make_node(parent, name, dir_mode, uid, gid)
        self._shared_name_appeared(parent, name)
        return self._remember(node, self._layout_below(parent, name), tree)

    @guarded
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self._ino(parent_inode)
        tree, mode, uid, gid = self._check_new(parent, name, stat.S_IFLNK | 0o777, ctx)
        with self.index.transaction():
            node = self.index.make_node(parent, name, mode, uid, gid, target=target)
        self._shared_name_appeared(parent, name)
        return self._remember(node, self._layout_below(parent, name), tree)

    @guarded
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino, parent = self._ino(inode), self._ino(new_parent_inode)
        tree = self._check_change(parent, new_name, ctx)[0]
        self.trees.check_node_change(ino, ctx.uid, ctx.gid, ctx.pid)
        if self.trees.tree_of(ino) != tree:
            raise FsError(errno.EXDEV)  # a name belongs to one tree, and so does its inode
        node = self.index.link(ino, parent, new_name)
        self._shared_name_appeared(parent, new_name)
        if self.remote is not None:
            self.remote.notify_renamed(parent, new_name)  # the new name's entry
        return self._remember(node, self._layout_below(parent, new_name), tree)

    @guarded
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = self._ino(parent_inode)
        self._check_change(parent, name, ctx)
        node = self.index.unlink(parent, name)
        self._maybe_free(node.id)

    @guarded
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = self._ino(parent_inode)
        self._check_change(parent, name, ctx)
        node = self.index.rmdir(parent, name)
        self._maybe_free(node.id)

    @guarded
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent, new_parent = self._ino(parent_inode_old), self._ino(parent_inode_new)
        old_tree = self._check_change(old_parent, name_old, ctx)[0]
        if self._check_change(new_parent, name_new, ctx)[0] != old_tree:
            raise FsError(errno.EXDEV)  # a name belongs to one tree for its whole life
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        replaced = self.index.rename(old_parent, name_old, new_parent, name_new, flags)
        if replaced is not None:
            self._maybe_free(replaced.id)
        self._shared_name_appeared(new_parent, name_new)
        moved = self.index.lookup(new_parent, name_new)
        if moved is not None and moved.is_file:
            # Compilers write each file under a temporary name: an entry is
            # created when its marker is renamed into place.
            exchange = bool(flags & RENAME_EXCHANGE)
            self._note_marker(new_parent, name_new, moved.id, created=not exchange)
        if flags & RENAME_EXCHANGE and (other := self.index.lookup(old_parent, name_old)):
            self._note_marker(old_parent, name_old, other.id)
        if self.remote is not None:
            # Compilers write under a temporary name and rename into place.
            self.remote.notify_renamed(self._ino(parent_inode_new), name_new)

    # -- extended attributes (xattrs.py: user. only) ------------------------------

    def _check_xattr(self, name: bytes | None) -> None:
        """Refuse what this mount does not keep.

        Without --xattrs: ENOSYS, which the kernel remembers for the whole
        mount (it answers EOPNOTSUPP itself from then on), so writes do not
        cost a security.capability request each.
        """
        if not self.xattrs:
            raise FsError(errno.ENOSYS)
        if name is not None:
            check_xattr_name(name)

    @guarded
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        self._check_xattr(name)
        value = self.index.get_xattr(self._ino(inode), name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    @guarded
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._check_xattr(None)
        return self.index.list_xattrs(self._ino(inode))

    @guarded
    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        ino = self._ino(inode)
        self._check_xattr(name)
        self._writable()
        self.trees.check_node_change(ino, ctx.uid, ctx.gid, ctx.pid)
        self.index.set_xattr(ino, name, value, INODE_XATTR_BYTES)

    @guarded
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        ino = self._ino(inode)
        self._check_xattr(name)
        self._writable()
        self.trees.check_node_change(ino, ctx.uid, ctx.gid, ctx.pid)
        self.index.remove_xattr(ino, name)

    # -- directories ----------------------------------------------------------

    @guarded
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        ino = self._ino(inode)
        if not self.index.get(ino).is_dir:
            raise FsError(errno.ENOTDIR)
        if self.held_trees.get(ino, SHARED_TREE) not in (SHARED_TREE, USERS_TREE):
            self.trees.clone_missing(ino)  # a listing shows the union
        return pyfuse3.FileHandleT(ino)

    @guarded
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        after = start_id
        while True:
            batch = self.index.readdir(fh, after, READDIR_BATCH)
            for entry_id, name, node in batch:
                tree = self._tree_below(fh, name)
                if not pyfuse3.readdir_reply(token, name, self._attrs(node, tree), entry_id):
                    return
                self.lookups[node.id] = self.lookups.get(node.id, 0) + 1
                self.layouts[node.id] = self._layout_below(fh, name)
                self.held_trees[node.id] = tree
                if node.is_file:
                    self._note_marker(fh, name, node.id)
                after = entry_id
            if len(batch) < READDIR_BATCH:
                return

    @guarded
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        """Nothing to free: a directory handle is the directory's inode number."""

    @guarded
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None

    # -- files ------------------------------------------------------------------

    @guarded
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._ino(parent_inode)
        file_mode = stat.S_IFREG | stat.S_IMODE(mode)
        tree, file_mode, uid, gid = self._check_new(parent, name, file_mode, ctx)
        with self.index.transaction():
            node = self.index.make_node(parent, name, file_mode, uid, gid)
        fh = self.files.open(node.id, flags & ~os.O_TRUNC)
        self._shared_name_appeared(parent, name)
        self._note_marker(parent, name, node.id, created=True)
        attrs = self._remember(node, self._layout_below(parent, name), tree)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True), attrs

    @guarded
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        ino = self._ino(inode)
        # A read-only mount still lets an existing file be opened for writing
        # (filelock opens its lock files O_RDWR on every inductor hit); the
        # writes themselves are refused.
        if flags & os.O_TRUNC:
            self._writable()
        if not self.read_only and (flags & os.O_TRUNC or flags & os.O_ACCMODE != os.O_RDONLY):
            self.trees.check_node_change(ino, ctx.uid, ctx.gid, ctx.pid)
        node = self.index.get(ino)
        if not node.is_file:
            raise FsError(errno.EISDIR)
        try:
            fh = self.files.open(ino, flags, node)
        except FileNotFoundError:
            assert node.object is not None
            self._drop_corrupt(node.object, ino)  # its object file is gone
            raise FsError(errno.ENOENT) from None
        try:
            corrupt = await self.files.verify(fh)
            if corrupt is not None:
                self._drop_corrupt(corrupt, ino)
                raise FsError(errno.ENOENT)  # now a miss: the compiler rebuilds the entry
            if flags & os.O_TRUNC and flags & os.O_ACCMODE == os.O_RDONLY:
                # Linux truncates even on a read-only open, and the kernel has
                # already set its cached size to 0; no writer will seal this one.
                await self.files.truncate(ino, 0, fh)
            if flags & os.O_TRUNC and without_privileges(node.mode, ctx.uid) != node.mode:
                with self.index.transaction():
                    self.index.set_attrs(ino, mode=without_privileges(node.mode, ctx.uid))
        except BaseException:
            # The caller gets no handle, so none may stay open here.
            self.files.abandon(fh)
            self._maybe_free(ino)
            raise
        self.stats.inc(
            "opens_total",
            layout=self.layouts.get(ino, OTHER_LAYOUT),
            tree=self.held_trees.get(ino, SHARED_TREE),
        )
        if flags & os.O_ACCMODE == os.O_RDONLY:
            self.evictor.recency.touch(node.entry)
            self._marker_read(ino)
        # Content is immutable once sealed and every change passes through
        # the kernel's own page cache, so cached pages stay valid across opens.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    def _marker_read(self, ino: int) -> None:
        marker = self.markers.get(ino)
        if marker is None:
            return
        if ino in self.unread_markers:
            self.unread_markers.discard(ino)  # its creator reading it back: part of the miss
            return
        self.stats.inc(
            "cache_entries_total",
            result="hit",
            kind=marker.kind,
            tree=self.held_trees.get(ino, SHARED_TREE),
        )

    @guarded
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        data = self.files.read(fh, off, size)
        self.stats.inc("read_bytes_total", len(data))
        return data

    @guarded
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        self._writable()
        written = self.files.write(fh, off, buf)
        self.evictor.grew()
        return written

    @guarded
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        await self.files.flush(fh)

    @guarded
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.files.fsync(fh)

    @guarded
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        ino = self.files.inode_of(fh)
        try:
            await self.files.release(fh)
        finally:
            self._maybe_free(ino)  # also after a failed seal: the handle is gone

    # -- the filesystem ---------------------------------------------------------

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The cap is the filesystem's size; room under it (or on the disk) is free."""
        backing = os.statvfs(self.store.root)
        block = STATFS_BLOCK
        disk_free = backing.f_bavail * backing.f_frsize
        free = min(self.evictor.room(), disk_free)
        data = pyfuse3.StatvfsData()
        data.f_bsize = block
        data.f_frsize = block
        data.f_blocks = self.evictor.cap // block
        data.f_bfree = free // block
        data.f_bavail = free // block
        data.f_files = backing.f_files
        data.f_ffree = backing.f_ffree
        data.f_favail = backing.f_favail
        data.f_namemax = NAME_MAX
        return data
