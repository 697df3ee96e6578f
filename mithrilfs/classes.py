"""What each device-class tree in a store holds."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from mithrilfs.index import SUPER_ROOT, Index


@dataclass
class ClassUsage:
    name: str
    files: int
    bytes: int  # logical: the sum of file sizes in this class's tree


def class_usage(index: Index) -> list[ClassUsage]:
    usage = []
    roots = index.db.execute(
        "SELECT name, inode FROM entries WHERE parent=? ORDER BY name", (SUPER_ROOT,)
    ).fetchall()
    for name, root in roots:
        files, size = index.db.execute(
            "WITH RECURSIVE tree(id) AS (SELECT ? UNION ALL "
            "  SELECT e.inode FROM entries e JOIN tree t ON e.parent = t.id) "
            "SELECT count(*), coalesce(sum(i.size), 0) FROM tree JOIN inodes i ON i.id = tree.id "
            f"WHERE (i.mode & {0o170000}) = {stat.S_IFREG}",
            (root,),
        ).fetchone()
        usage.append(ClassUsage(name.decode(errors="replace"), files, size))
    return usage
