"""The store's invariant checker, and its repair.

Invariants (each problem found names the one it breaks):
  objects   every object row has a file of the right size whose blake3 is its name
  refcount  an object's refcount equals the number of inodes that refer to it
  dangling  every file inode refers to an object row; every entry to an inode
  orphan    every file under objects/ has a row
  staging   no staging file is left behind while no daemon runs
  unlinked  no inode with nlink 0 is left behind while no daemon runs
  nlink     a file (or special node) has one entry per link; a directory one
            entry and nlink 2 + its subdirectories
  size      a file's size equals its object's size
  tree      every entry's parent is a directory; every directory is reachable
  xattrs    every extended attribute belongs to an existing inode
  entries   every linked file belongs to a cache entry, and no cache entry is empty
  trees     users/ is root's and 0711 and holds only private roots; each private
            root is a 0700 directory owned by the user it is named after

Repair makes the store consistent again without guessing content: a file
whose object is missing or corrupt is removed together with the rest of its
cache entry, as eviction would (a compiler that finds part of an entry may
trust it; given a clean miss it rebuilds the entry), counts are recomputed,
and leftovers are deleted.  The empty object is the one content known
without its file, so it is recreated instead.

`check` only describes; `repair` applies.  The mount runs the quick form
(`verify_hashes=False`) after an unclean shutdown and repairs what it finds.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mithrilfs.index import SUPER_ROOT, Index, Inode
from mithrilfs.layouts import PRIVATE_ROOT_MODE, USERS_DIR, USERS_MODE
from mithrilfs.store import EMPTY_DIGEST, ContentStore
from mithrilfs.tenancy import tree_owner


@dataclass
class Problem:
    kind: str
    detail: str
    repair: Callable[[], None] | None = None
    repaired: bool = False


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    objects_checked: int = 0
    inodes_checked: int = 0
    repaired: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def check(
    index: Index,
    content: ContentStore,
    *,
    verify_hashes: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    report = Report()
    add = report.problems.append

    referenced = index.object_references()
    rows = index.object_rows()
    known = {digest for digest, _size, _refcount in rows}
    for done, (digest, size, refcount) in enumerate(rows, 1):
        report.objects_checked += 1
        if progress is not None:
            progress(done, len(rows))
        actual = referenced.get(digest, 0)
        if refcount != actual:
            add(
                Problem(
                    "refcount",
                    f"object {digest.hex()} has refcount {refcount}, referenced {actual} times",
                    _fix_refcount(index, content, digest, actual),
                )
            )
        if actual == 0 and digest != EMPTY_DIGEST:
            continue  # reported above; repair deletes the row
        if verify_hashes:
            damage = content.verify(digest, size)
        else:
            damage = None if content.has(digest) else "missing"
        if damage is not None:
            add(
                Problem(
                    "objects",
                    f"object {digest.hex()}: {damage}",
                    _recreate_empty(content)
                    if digest == EMPTY_DIGEST
                    else _drop_object(index, content, digest),
                )
            )

    for digest, count in referenced.items():
        if digest not in known:
            add(
                Problem(
                    "dangling",
                    f"files refer to object {digest.hex()}, which has no row",
                    _restore_empty_row(index, content, count)
                    if digest == EMPTY_DIGEST
                    else _drop_object(index, content, digest),
                )
            )

    for on_disk, path in content.iter_objects():
        if on_disk is None or on_disk not in known:
            add(Problem("orphan", f"object file {path} has no row", _unlink(path)))

    for path in content.staging_files():
        add(Problem("staging", f"leftover staging file {path}", _unlink(path)))

    for ino in index.unlinked_inodes():
        add(
            Problem(
                "unlinked",
                f"inode {ino} is unlinked but was never freed",
                _free(index, content, ino),
            )
        )

    _check_namespace(index, content, report)
    _check_cache_entries(index, report)
    _check_private_trees(index, report)
    return report


def _check_private_trees(index: Index, report: Report) -> None:
    """users/ and the private roots have the owners and modes tenancy rests on."""
    add = report.problems.append
    for class_name, class_root in index.class_roots():
        users = index.lookup(class_root, USERS_DIR)
        if users is None:
            continue  # a store from before private trees: the next mount adds users/
        where = f"{class_name.decode(errors='replace')}/users"
        if not users.is_dir:
            add(Problem("trees", f"{where} is not a directory"))
            continue
        if users.uid != 0 or stat.S_IMODE(users.mode) != USERS_MODE:
            add(
                Problem(
                    "trees",
                    f"{where}: owner {users.uid}, mode {stat.S_IMODE(users.mode):o} "
                    f"(expected root, {USERS_MODE:o})",
                    _set_owner_mode(index, users, 0, 0, USERS_MODE),
                )
            )
        for _id, name, node in index.readdir(users.id, -1, 1 << 62):
            _check_private_root(index, f"{where}/{name.decode(errors='replace')}", node, add)


def _check_private_root(
    index: Index, where: str, node: Inode, add: Callable[[Problem], None]
) -> None:
    if not node.is_dir:
        add(Problem("trees", f"{where} is not a directory"))
        return
    owner = tree_owner(where.rsplit("/", 1)[1])
    # A user deleted since keeps their tree under the old name until evicted.
    if owner is not None and node.uid != owner:
        add(Problem("trees", f"{where} is owned by uid {node.uid}, not by its user ({owner})"))
    if stat.S_IMODE(node.mode) != PRIVATE_ROOT_MODE:
        add(
            Problem(
                "trees",
                f"{where}: mode {stat.S_IMODE(node.mode):o} (expected {PRIVATE_ROOT_MODE:o})",
                _set_owner_mode(index, node, node.uid, node.gid, PRIVATE_ROOT_MODE),
            )
        )


def _check_cache_entries(index: Index, report: Report) -> None:
    """Every linked file belongs to an existing cache entry; no entry is empty."""
    add = report.problems.append
    for ino in index.unplaced_files():
        add(Problem("entries", f"file {ino} belongs to no cache entry", _place(index, ino)))
    for entry_id in index.empty_cache_entries():
        add(
            Problem(
                "entries",
                f"cache entry {entry_id} has no files",
                _drop_cache_entry(index, entry_id),
            )
        )


def _check_namespace(index: Index, content: ContentStore, report: Report) -> None:
    add = report.problems.append
    entry_counts = index.names_per_inode()
    subdirs = index.subdirs_per_dir()
    for ino, mode, nlink, size, digest in index.inode_summaries():
        report.inodes_checked += 1
        if ino == SUPER_ROOT or nlink == 0:
            continue
        entries = entry_counts.get(ino, 0)
        if stat.S_ISDIR(mode):
            expected = 2 + subdirs.get(ino, 0)
            if entries != 1 or nlink != expected:
                add(
                    Problem(
                        "nlink",
                        f"directory {ino}: nlink {nlink} (expected {expected}), {entries} entries",
                        _set_nlink(index, ino, expected),
                    )
                )
        else:
            # Hard links: one entry per name.
            if entries != nlink:
                add(
                    Problem(
                        "nlink",
                        f"inode {ino}: nlink {nlink}, {entries} entries",
                        _set_nlink(index, ino, entries) if entries else None,
                    )
                )
            if stat.S_ISREG(mode):
                object_size = index.object_size(digest) if digest is not None else None
                if digest is None:
                    add(
                        Problem(
                            "dangling",
                            f"file {ino} has no object",
                            _remove_inode(index, content, ino),
                        )
                    )
                elif object_size is not None and object_size != size:
                    add(
                        Problem(
                            "size",
                            f"file {ino}: size {size}, object size {object_size}",
                            _set_size(index, ino, object_size),
                        )
                    )

    for ino in index.xattr_owners_missing():
        add(
            Problem(
                "xattrs",
                f"extended attributes of inode {ino}, which does not exist",
                _drop_xattrs(index, ino),
            )
        )

    for entry_id, parent, child in index.dangling_names():
        add(
            Problem(
                "tree",
                f"entry {entry_id} (parent {parent}, inode {child}) is dangling",
                _drop_entry(index, entry_id),
            )
        )


# -- repairs: each returns a closure so that `check` only describes ------------


def _fix_refcount(
    index: Index, content: ContentStore, digest: bytes, actual: int
) -> Callable[[], None]:
    def repair() -> None:
        unused = actual == 0 and digest != EMPTY_DIGEST
        with index.transaction():
            if unused:
                index.delete_object_row(digest)
            else:
                index.set_refcount(digest, actual)
        if unused:
            content.delete(digest)  # after the commit: its row is gone, so is the file

    return repair


def _drop_object(index: Index, content: ContentStore, digest: bytes) -> Callable[[], None]:
    """A lost or corrupt object: remove every cache entry that has a file of it, whole."""

    def repair() -> None:
        unused: list[bytes] = []
        with index.transaction():
            for entry_id in index.entries_using(digest):
                unused += index.evict_entry(entry_id, lambda _ino: False).unused_objects
            # Files in no entry (or unlinked ones) go one by one.
            index.remove_object(digest)
        for other in unused:
            content.delete(other)
        content.delete(digest)

    return repair


def _recreate_empty(content: ContentStore) -> Callable[[], None]:
    def repair() -> None:
        content.delete(EMPTY_DIGEST)
        content.ensure_empty_object()

    return repair


def _restore_empty_row(index: Index, content: ContentStore, count: int) -> Callable[[], None]:
    def repair() -> None:
        content.ensure_empty_object()  # file first, then the row
        with index.transaction():
            index.restore_empty_object(count)

    return repair


def _remove_inode(index: Index, content: ContentStore, ino: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.unlink_everywhere(ino)
        unused = index.free_inode(ino)
        if unused is not None:
            content.delete(unused)

    return repair


def _free(index: Index, content: ContentStore, ino: int) -> Callable[[], None]:
    def repair() -> None:
        unused = index.free_inode(ino)
        if unused is not None:
            content.delete(unused)

    return repair


def _set_nlink(index: Index, ino: int, nlink: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.set_nlink(ino, nlink)

    return repair


def _set_owner_mode(index: Index, node: Inode, uid: int, gid: int, mode: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.set_attrs(node.id, uid=uid, gid=gid, mode=stat.S_IFMT(node.mode) | mode)

    return repair


def _set_size(index: Index, ino: int, size: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.set_attrs(ino, size=size)

    return repair


def _place(index: Index, ino: int) -> Callable[[], None]:
    def repair() -> None:
        link = index.link_of(ino)
        if link is not None:
            with index.transaction():
                index.place_in_entry(ino, *link)

    return repair


def _drop_cache_entry(index: Index, entry_id: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.drop_cache_entry(entry_id)

    return repair


def _drop_xattrs(index: Index, ino: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.drop_xattrs(ino)

    return repair


def _drop_entry(index: Index, entry_id: int) -> Callable[[], None]:
    def repair() -> None:
        with index.transaction():
            index.drop_name(entry_id)

    return repair


def _unlink(path: Path) -> Callable[[], None]:
    def repair() -> None:
        path.unlink(missing_ok=True)

    return repair


def repair(report: Report) -> int:
    """Apply every repair the check found; return how many were applied."""
    applied = 0
    # Dangling names first: removing a whole cache entry walks its tree.
    for problem in sorted(report.problems, key=lambda p: p.kind != "tree"):
        if problem.repair is not None:
            problem.repair()
            problem.repaired = True
            applied += 1
    report.repaired = applied
    return applied
