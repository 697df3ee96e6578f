"""The local tree as the tier sees it: which tree a path is in, and who owns what lands there.

Trees: the class root's ``triton/`` and ``inductor/`` are the shared tree,
``users/<name>/{triton,inductor}`` the private tree of the user who owns
``users/<name>`` (and whom <name> names).  A tree publishes to and fetches
from its own namespace only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from mithrilfs import layouts
from mithrilfs.index import Index, Inode
from mithrilfs.layouts import LAYOUT_ROOTS
from mithrilfs.tenancy import tree_owner

_REMEMBERED_OWNERS = 10_000
_WALK_LIMIT = 100_000


def split_tree(parts: tuple[bytes, ...]) -> tuple[int, bytes | None] | None:
    """Which tree a path from the class root is in, as the tier sees it: (how many
    leading components name the tree, its owner's name or None for the shared
    tree), or None for a path outside the compilers' layouts."""
    skip, tree = layouts.split_tree(list(parts))
    rest = parts[skip:]
    if not rest or rest[0].decode(errors="replace") not in LAYOUT_ROOTS:
        return None
    return (0, None) if skip == 0 else (skip, parts[1])


def names_user(name: bytes, uid: int) -> bool:
    """Whether a private tree called *name* belongs to *uid*."""
    try:
        return tree_owner(os.fsdecode(name)) == uid
    except ValueError:
        return False


@dataclass(frozen=True)
class Tree:
    """A tree as the tier sees it: its namespace and who owns what lands in it."""

    prefix: int  # leading path components naming the tree (0: shared, 2: users/<name>)
    uid: int | None  # the namespace: None for the cluster-wide one, else the owner's uid
    owner: tuple[int, int]  # uid and gid of every node fetched into it


class LocalTree:
    """Paths and trees of one device class's directories, from the index."""

    def __init__(self, index: Index, root: int) -> None:
        self.index = index
        self.root = root
        self._top_dirs: set[int] = set()  # directories known to sit right below the root
        self._owners: dict[tuple[bytes, int], bool] = {}  # (tree name, uid) -> names_user

    def dir_path(self, ino: int) -> tuple[tuple[bytes, ...], list[int]] | None:
        """Names and inodes from the class root to directory *ino*; None if not in this tree."""
        if ino == self.root:
            return (), []
        names, inodes = self.index.dir_path(ino)
        if not inodes:
            return None  # detached
        top = inodes[0]
        if top not in self._top_dirs:
            # Inode numbers are never reused and no rename moves a directory
            # to another class: a directory that heads a path from the root
            # once is below this root whenever it heads one again.
            if self.index.parent_of(top) != self.root:
                return None
            self._top_dirs.add(top)
        return tuple(names), inodes

    def tree(self, path: tuple[bytes, ...], inodes: list[int]) -> Tree | None:
        """The tree of *path* (whose directories are *inodes*), or None: not in one, or a
        private tree whose root is not owned by the user it is named after."""
        split = split_tree(path)
        if split is None or len(inodes) <= split[0]:
            return None
        prefix, name = split
        if name is None:
            layout_root = self.index.get(inodes[0])
            return Tree(0, None, (layout_root.uid, layout_root.gid))
        root = self.index.get(inodes[1])
        known = self._owners.get((name, root.uid))
        if known is None:
            if len(self._owners) > _REMEMBERED_OWNERS:
                self._owners.clear()
            known = self._owners[(name, root.uid)] = names_user(name, root.uid)
        return Tree(prefix, root.uid, (root.uid, root.gid)) if known else None

    def place(
        self, local: tuple[bytes, ...], inodes: list[int]
    ) -> tuple[Tree, tuple[bytes, ...]] | None:
        """The tree of the name at *local* (whose directories are *inodes*) and its path
        from that tree's root; None where the tier has nothing to do: outside a tree,
        a tree's top levels, or a scratch name on the way."""
        tree = self.tree(local, inodes)
        if tree is None:
            return None
        path = local[tree.prefix :]
        if len(path) < 2 or any(layouts.is_scratch(part) for part in path):
            return None
        return tree, path

    def walk(self, directory: int) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
        """Everything below *directory* (temporary names skipped), parents first."""
        pending: list[tuple[tuple[bytes, ...], int]] = [((), directory)]
        seen = 0
        while pending:
            prefix, ino = pending.pop()
            after = 0
            while True:
                batch = self.index.readdir(ino, after, 256)
                for entry_id, name, node in batch:
                    after = entry_id
                    if layouts.is_scratch(name):
                        continue
                    seen += 1
                    if seen > _WALK_LIMIT:
                        return
                    yield (*prefix, name), node
                    if node.is_dir:
                        pending.append(((*prefix, name), node.id))
                if len(batch) < 256:
                    break
