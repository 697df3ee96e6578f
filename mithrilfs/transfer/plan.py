"""What an import will write: the nodes of the input tree, gathered before anything is written.

Pure data, shared by the readers (a directory, an archive) and the commit.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from enum import Enum

from mithrilfs.errors import UserError


class Kind(Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    SPECIAL = "special"  # a FIFO or a device node: its inode row alone
    HARDLINK = "hardlink"  # another name for the (non-directory) node at `link`


@dataclass(slots=True)
class Node:
    """One entry of the tree being imported, relative to the target directory."""

    parts: tuple[bytes, ...]
    kind: Kind
    mode: int  # permission bits only; a SPECIAL node's type is in `file_type`
    mtime_ns: int
    size: int = 0
    digest: bytes | None = None
    target: bytes | None = None
    file_type: int = 0  # SPECIAL: stat.S_IFIFO, S_IFCHR or S_IFBLK
    rdev: int = 0  # SPECIAL device nodes
    link: tuple[bytes, ...] | None = None  # HARDLINK: the name it is another name of
    xattrs: dict[bytes, bytes] = field(default_factory=dict)  # user.* only

    @property
    def is_device(self) -> bool:
        return self.kind is Kind.SPECIAL and self.file_type in (stat.S_IFCHR, stat.S_IFBLK)


@dataclass
class Plan:
    """Everything an import will write, gathered before anything is written."""

    nodes: dict[tuple[bytes, ...], Node] = field(default_factory=dict)
    skipped: list[bytes] = field(default_factory=list)  # sockets, fifos, devices

    def add(self, node: Node) -> None:
        self.nodes[node.parts] = node

    def count(self, kind: Kind) -> int:
        return sum(1 for node in self.nodes.values() if node.kind is kind)

    @property
    def file_bytes(self) -> int:
        return sum(node.size for node in self.nodes.values() if node.kind is Kind.FILE)

    def in_commit_order(self) -> list[Node]:
        """Parents before children; hard links last, once every name they point at exists."""
        nodes = sorted(self.nodes.values(), key=lambda node: node.parts)
        return [n for n in nodes if n.kind is not Kind.HARDLINK] + [
            n for n in nodes if n.kind is Kind.HARDLINK
        ]


def imported_mode(mode: int) -> int:
    """Permission bits, less set-user-ID and set-group-ID: an import installs
    files as the importer, and must not hand out their privileges."""
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def add_missing_parents(plan: Plan) -> None:
    """An archive may list a file without its directories; create them, and refuse files
    that an archive also uses as a directory."""
    for parts in list(plan.nodes):
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            parent = plan.nodes.get(prefix)
            if parent is None:
                plan.add(Node(prefix, Kind.DIR, 0o755, time.time_ns()))
            elif parent.kind is not Kind.DIR:
                raise UserError(
                    f"cannot import: {b'/'.join(prefix).decode(errors='replace')} is both a "
                    "file and a directory in the source",
                    2,
                )
