"""What each device-class tree in a store holds, and what one subtree of it holds."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from mithrilfs.index import SUPER_ROOT, Index

# Every name below a directory (a name linked twice counted once).
_BELOW = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION "
    "  SELECT e.inode FROM entries e JOIN tree t ON e.parent = t.id) "
)
_FILES = f"FROM tree JOIN inodes i ON i.id = tree.id WHERE (i.mode & {0o170000}) = {stat.S_IFREG}"


@dataclass
class ClassUsage:
    name: str
    files: int
    bytes: int  # logical: the sum of file sizes in this class's tree


@dataclass
class TreeUsage:
    files: int = 0
    logical_bytes: int = 0  # the sum of the files' sizes
    stored_bytes: int = 0  # the distinct objects they use (shared ones too)
    objects: int = 0
    entries: int = 0  # cache entries with a file in the tree


def class_usage(index: Index) -> list[ClassUsage]:
    usage = []
    roots = index.db.execute(
        "SELECT name, inode FROM entries WHERE parent=? ORDER BY name", (SUPER_ROOT,)
    ).fetchall()
    for name, root in roots:
        files, size = index.db.execute(
            f"{_BELOW} SELECT count(*), coalesce(sum(i.size), 0) {_FILES}", (root,)
        ).fetchone()
        usage.append(ClassUsage(name.decode(errors="replace"), files, size))
    return usage


def tree_usage(index: Index, directory: int) -> TreeUsage:
    """What the files below *directory* hold."""
    files, size, entries = index.db.execute(
        f"{_BELOW} SELECT count(*), coalesce(sum(i.size), 0), count(DISTINCT i.entry) {_FILES}",
        (directory,),
    ).fetchone()
    objects, stored = index.db.execute(
        f"{_BELOW} SELECT count(*), coalesce(sum(o.size), 0) FROM objects o "
        f"WHERE o.hash IN (SELECT i.object {_FILES})",
        (directory,),
    ).fetchone()
    return TreeUsage(files, size, stored, objects, entries)
