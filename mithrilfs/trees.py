"""The trees below a mount root, who may change them, and the union (docs/security.md).

    triton/, inductor/, ...      the shared tree: trusted writers only
    users/                       the daemon's: nobody makes, renames or removes names here
    users/<name>/                a private root: its layout (triton/, inductor/) is fixed
    users/<name>/triton/...      the user's own: the user and root

A private directory is a union over the same relative path in the shared
tree, by clone on first use: a name missing in it is copied from the shared
tree (files refer to the same object; a directory that is one whole cache
entry comes with its subtree, any other directory empty).

Errors are `FsError`s; fs.py turns them into errnos.  The handlers pass the
caller's uid, gid and pid; the kernel's caches and counting stay in fs.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from mithrilfs.errors import FsError
from mithrilfs.index import Index, Inode
from mithrilfs.layouts import (
    LAYOUT_ROOTS,
    PRIVATE_ROOT_MODE,
    SHARED_TREE,
    USERS_DIR,
    USERS_TREE,
    is_entry_root,
    is_in_entry,
    is_transient,
)
from mithrilfs.stats import Stats
from mithrilfs.tenancy import Trust, primary_gid, tree_name, tree_owner

log = logging.getLogger(__name__)

# Readdir of a shared directory in one go: the union clones all of it.
_ALL = 1 << 62


class BeingWritten(Exception):
    """The shared tree has the name, but its file is being written."""


class Trees:
    def __init__(
        self,
        index: Index,
        root: int,
        trust: Trust,
        stats: Stats,
        *,
        is_busy: Callable[[int], bool],
    ) -> None:
        self.index = index
        self.root = root
        self.trust = trust
        self.stats = stats
        self.is_busy = is_busy  # whether a file is being written (not clonable yet)
        users = index.lookup(root, USERS_DIR)
        self.users = users.id if users is not None else None

    # -- who may change what ----------------------------------------------------

    def check_change(
        self, parent: int, name: bytes, uid: int, gid: int, pid: int
    ) -> tuple[str, int, int]:
        """Refuse a change of *name* in *parent* that the caller may not make.

        Returns the tree and the owner (uid, gid) that new nodes there get:
        uid 0 in the shared tree, whoever made them; the tree's owner in a
        private tree (with the owner's current group when the owner makes
        them, the tree's group when root does).
        """
        if parent == self.users or (parent == self.root and name == USERS_DIR):
            raise FsError(errno.EPERM)  # only the daemon makes private trees
        tree, names = self.index.tree_path(parent)
        if tree == SHARED_TREE:
            if not self.trust.allows(uid, gid, pid):
                raise FsError(errno.EACCES)
            return tree, 0, 0
        owner = self.private_root(tree)
        if tree == USERS_TREE or not names or owner is None:
            raise FsError(errno.EPERM)  # a private root's layout is the daemon's
        if uid not in (0, owner.uid):
            raise FsError(errno.EACCES)
        # The owner's own nodes get its current group (sg, newgrp), as on ext4.
        return tree, owner.uid, gid if uid == owner.uid else owner.gid

    def check_node_change(self, ino: int, uid: int, gid: int, pid: int) -> None:
        """Refuse a change of *ino*'s content or attributes that the caller may not make."""
        if ino == self.root:
            self.check_change(self.root, b"", uid, gid, pid)
            return
        link = self.index.link_of(ino)
        if link is not None:  # an unlinked file is reached only through a checked handle
            self.check_change(*link, uid, gid, pid)

    def tree_of(self, ino: int) -> str | None:
        """The tree a linked *ino* is in (None when it has no name)."""
        link = self.index.link_of(ino)
        return None if link is None else self.index.tree_path(link[0])[0]

    # -- private roots ----------------------------------------------------------

    def private_root(self, tree: str) -> Inode | None:
        if self.users is None:
            return None
        return self.index.lookup(self.users, tree.encode())

    def make_private_root(self, name: bytes, uid: int, gid: int) -> Inode | None:
        """A private tree made at its first lookup: by its owner, or by root for
        an existing user (an administrator provisioning a tree).  None for
        anyone else's name, so nobody can make a tree in another's name."""
        if self.users is None:
            return None
        if uid == 0 and name != b"root":
            # Only names in the user database: a probe of a number must not
            # leave a tree behind.
            owner = None if name.isdigit() else tree_owner(os.fsdecode(name))
            if owner is None or tree_name(owner).encode() != name:
                return None
            uid, gid = owner, primary_gid(owner, gid)
        elif name != tree_name(uid).encode():
            return None
        gid = primary_gid(uid, gid)
        with self.index.transaction():
            root = self.index.make_node(
                self.users, name, stat.S_IFDIR | PRIVATE_ROOT_MODE, uid, gid
            )
            for layout in LAYOUT_ROOTS:
                self.index.make_node(root.id, layout.encode(), stat.S_IFDIR | 0o755, uid, gid)
        log.info("made the private tree users/%s", name.decode(errors="replace"))
        return self.index.get(root.id)

    # -- the union --------------------------------------------------------------

    def _shared_counterpart(self, directory: int) -> tuple[str, list[bytes], Inode] | None:
        """(tree, names, shared directory) for a private directory the union applies to.

        Not for a private root (its layout is fixed) nor inside a cache entry:
        an entry comes whole from one tree, never half from each.
        """
        tree, names = self.index.tree_path(directory)
        if tree in (SHARED_TREE, USERS_TREE) or not names or is_in_entry(names):
            return None
        shared = self.index.walk(self.root, names)
        return None if shared is None else (tree, names, shared)

    def shared_counterpart_dir(self, directory: int) -> int | None:
        """The shared directory a private *directory* shows through, if any."""
        found = self._shared_counterpart(directory)
        return None if found is None else found[2].id

    def _clonable(self, name: bytes, node: Inode) -> bool:
        # A FIFO, socket or device node is no cache content: each tree has its own.
        return not is_transient(name) and not node.is_special and not self._busy(node)

    def _busy(self, node: Inode) -> bool:
        return node.is_file and self.is_busy(node.id)

    def clone_missing(self, directory: int, only: bytes | None = None) -> Inode | None:
        """Clone shared names missing in a private *directory* (all of them, or *only*).

        Returns the clone of *only*; raises `BeingWritten` when *only* is a
        shared file that a writer still has open.  Each clone counts as a hit
        from the shared tree.
        """
        if only is not None and is_transient(only):
            return None  # a compiler's temporary name: never in the shared tree's view
        found = self._shared_counterpart(directory)
        if found is None:
            return None
        tree, names, shared = found
        owner = self.private_root(tree)
        if owner is None:
            return None
        if only is not None:
            source = self.index.lookup(shared.id, only)
            if source is not None and not self._clonable(only, source):
                raise BeingWritten
            candidates = [] if source is None else [(only, source)]
        else:
            candidates = [
                (name, node) for _id, name, node in self.index.readdir(shared.id, -1, _ALL)
            ]
        cloned: Inode | None = None
        with self.index.transaction():
            for name, source in candidates:
                if not self._clonable(name, source) or self.index.lookup(directory, name):
                    continue
                cloned = self.index.clone(
                    directory,
                    name,
                    source,
                    owner.uid,
                    owner.gid,
                    whole=source.is_dir and is_entry_root([*names, name]),
                    skip=lambda node: node.is_special or self._busy(node),
                )
                self.stats.inc("shared_hits_total", tree=tree)
        return cloned

    def views_of(self, parent: int, name: bytes) -> list[int]:
        """The private directories that show shared directory *parent*, for a new *name*.

        Their kernel entries for *name* (negative ones above all) are stale
        now.  Empty for a name that is not in the shared tree or never cloned.
        """
        if is_transient(name) or self.users is None:
            return []
        # Asked at every mkdir, create and rename: the cheaper question first.
        private_roots = self.index.private_roots(self.root)
        if not private_roots:
            return []
        tree, names = self.index.tree_path(parent)
        if tree != SHARED_TREE or not names:
            return []
        views = []
        for _name, private_root in private_roots:
            view = self.index.walk(private_root, names)
            if view is not None:
                views.append(view.id)
        return views
