"""What the kernel holds of a mount, and the notices it gets about names.

The kernel caches names and attributes for an hour (fs.py), so every name
the filesystem drops or adds on its own (eviction, the shared tier, a name
appearing in the shared tree under private views) must be invalidated
explicitly.  That happens here, through pyfuse3's asynchronous queue, never
blocking the request that caused it.  Only names below inodes the kernel
holds are invalidated: it has no entry for an inode it never looked up, and
before the FUSE handshake (eviction at mount, after the cap was lowered)
libfuse refuses every notification with ENOSYS.
"""

from __future__ import annotations

import pyfuse3

from mithrilfs.index import EvictedEntry
from mithrilfs.trees import Trees


class KernelCaches:
    def __init__(self, root: int, trees: Trees) -> None:
        self.root = root
        self.trees = trees
        # How many times the kernel holds each inode (lookup count); kept by
        # the handlers (lookup, forget); an unlinked inode is freed only when
        # this drops to zero.
        self.lookups: dict[int, int] = {}

    def holds(self, ino: int) -> bool:
        return ino in self.lookups

    def fuse_ino(self, ino: int) -> pyfuse3.InodeT:
        """The kernel sees the mount's class root as inode 1."""
        return pyfuse3.ROOT_INODE if ino == self.root else pyfuse3.InodeT(ino)

    def invalidate(self, parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(self.fuse_ino(parent), name, ignore_enoent=True)

    def entry_removed(self, removed: EvictedEntry, reason: str) -> None:
        """A cache entry was removed: its names must vanish now, not in an hour.

        Deepest names first.  A plain invalidation (no "deleted" inode):
        asking the kernel to delete a directory dentry fails with ENOTEMPTY
        while it still caches children, negative ones included.
        """
        for parent, name, ino in reversed(removed.names):
            if self.holds(ino):
                self.invalidate(parent, name)

    def name_appeared(self, parent: int, name: bytes) -> None:
        """A name came from the shared tier: drop a negative entry the kernel may hold."""
        self.invalidate(parent, name)
        self.shared_name_appeared(parent, name)

    def shared_name_appeared(self, parent: int, name: bytes) -> None:
        """A name appeared in a shared directory: drop negative entries in private views."""
        for view in self.trees.views_of(parent, name):
            if self.holds(view):
                self.invalidate(view, name)
