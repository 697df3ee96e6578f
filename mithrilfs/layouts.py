"""What the compilers' cache trees look like, and which files form one cache entry.

The mount root always holds one directory per layout; `mithrilfs env` points
TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR at them.

Eviction removes whole cache entries, never half of one, because a compiler
that finds part of an entry may trust it.  The entries, as torch 2.13 and
Triton 3.9 lay them out (paths relative to the mount root):

    triton/<key>/...                        a Triton kernel: __grp__<name>.json and
                                            every artifact it names, in one directory
    inductor/triton/<device>/<key>/...      the same, when inductor picks the dir
    inductor/fxgraph/<xx>/<key>/...         an FX graph cache entry
    inductor/aotautograd/<key>/...          an AOTAutograd cache entry
    inductor/<xx>/<stem>.<ext>              code-cache files sharing one key stem
                                            (.py, .cpp, .so, .main.so, ...)
    inductor/<xx>/<dir>/...                 a code-cache directory

Any other file is an entry of its own.

The same layouts repeat inside every private tree, ``users/<name>/``
(docs/security.md): `split_tree` strips that prefix, so an entry in a
private tree is keyed and evicted exactly like its shared counterpart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

LAYOUT_ROOTS = ("triton", "inductor")
TRITON_ROOT = b"triton"
INDUCTOR_ROOT = b"inductor"
# Inductor's own Triton directory (inductor/triton/<device>/<key>/).
INDUCTOR_TRITON = (INDUCTOR_ROOT, b"triton")
# Triton publishes every file of a kernel through a ``tmp.pid_*`` directory
# inside the key directory, and writes the ``__grp__<name>.json`` group file
# last: an entry without it is unfinished.
TRITON_TMP_PREFIX = b"tmp."
TRITON_GROUP_PREFIX = b"__grp__"
OTHER_LAYOUT = "other"
# The directory below the mount root that holds one private tree per user.
USERS_DIR = b"users"
SHARED_TREE = "shared"
# The tree of the `users` directory itself: no tree, only the daemon writes there.
USERS_TREE = ""
# users/ is root's: anyone may pass through it, nobody but root may list it.
USERS_MODE = 0o711
# users/<name> is the user's and nobody else's.
PRIVATE_ROOT_MODE = 0o700


@dataclass(frozen=True)
class EntryRule:
    """Where a file's cache entry is rooted.

    ``depth``: the entry is the directory made of the first *depth* path
    components; ``stem``: the entry is the files in the same directory whose
    names start with ``stem.``; neither: the file is an entry by itself.
    """

    depth: int | None = None
    stem: bytes | None = None


SINGLE_FILE = EntryRule()


def layout_of(top: bytes) -> str:
    name = top.decode(errors="replace")
    return name if name in LAYOUT_ROOTS else OTHER_LAYOUT


def entry_rule(parts: list[bytes]) -> EntryRule:
    """The entry that the file at *parts* (components from the mount root) belongs to."""
    if len(parts) >= 3 and parts[0] == TRITON_ROOT:
        return EntryRule(depth=2)
    if len(parts) < 3 or parts[0] != INDUCTOR_ROOT:
        return SINGLE_FILE
    section = parts[1]
    if section == b"triton" and len(parts) >= 5:
        return EntryRule(depth=4)
    if section == b"fxgraph" and len(parts) >= 5:
        return EntryRule(depth=4)
    if section == b"aotautograd" and len(parts) >= 4:
        return EntryRule(depth=3)
    if len(section) == 2:
        if len(parts) >= 4:
            return EntryRule(depth=3)
        name = parts[2]
        stem = name.split(b".", 1)[0]
        # Temporary files (".pid.tid.tmp") are not part of any key until renamed.
        if stem and not name.startswith(b"."):
            return EntryRule(stem=stem)
    return SINGLE_FILE


def split_tree(parts: list[bytes]) -> tuple[int, str]:
    """(components to skip, tree) of a path from the mount root.

    ``users/<name>/...`` is in the private tree ``<name>`` (two components to
    skip before the layouts start); anything else is in the shared tree.
    """
    if parts and parts[0] == USERS_DIR:
        if len(parts) == 1:
            return 1, USERS_TREE
        return 2, parts[1].decode(errors="replace")
    return 0, SHARED_TREE


def is_transient(name: bytes) -> bool:
    """Names a compiler uses only while it assembles something (never cloned).

    Triton publishes each file through a ``tmp.pid_*`` directory; inductor
    writes ``*.tmp`` files (and dotfiles) and renames them into place.
    """
    return name.startswith((TRITON_TMP_PREFIX, b".")) or name.endswith(b".tmp")


def is_entry_root(parts: list[bytes]) -> bool:
    """Whether the directory at *parts* (from a tree's root) is one whole cache entry."""
    rule = entry_rule([*parts, b"x"])
    return rule.depth == len(parts)


def is_in_entry(parts: list[bytes]) -> bool:
    """Whether the directory at *parts* (from a tree's root) is an entry or inside one."""
    rule = entry_rule([*parts, b"x"])
    return rule.depth is not None and rule.depth <= len(parts)


def is_triton_entry(path: tuple[bytes, ...] | list[bytes]) -> bool:
    """Whether the entry directory at *path* (from a tree's root) is a Triton kernel."""
    return tuple(path[:1]) == (TRITON_ROOT,) or tuple(path[:2]) == INDUCTOR_TRITON


def is_group_file(name: bytes) -> bool:
    """Triton's ``__grp__<name>.json``, the last file of a kernel to appear."""
    return name.startswith(TRITON_GROUP_PREFIX)


EntryKind = Literal["dir", "stem", "file"]
_PREFIX_KIND: dict[bytes, EntryKind] = {b"d": "dir", b"s": "stem", b"f": "file"}
_KIND_PREFIX = {kind: prefix for prefix, kind in _PREFIX_KIND.items()}


@dataclass(frozen=True)
class EntryKey:
    """The name of one cache entry, as `cache_entries.key` stores it.

    ``dir``: the directory inode *root* and everything in it (``d<root>``);
    ``stem``: the files named ``<stem>.*`` in directory *root*
    (``s<root>/<stem>``); ``file``: the file inode *root* alone (``f<root>``).
    """

    kind: EntryKind
    root: int
    stem: bytes = b""

    def encode(self) -> bytes:
        text = _KIND_PREFIX[self.kind] + b"%d" % self.root
        return text + b"/" + self.stem if self.kind == "stem" else text

    @classmethod
    def decode(cls, key: bytes) -> EntryKey:
        """The key stored as *key*; ValueError for anything `encode` never wrote."""
        kind = _PREFIX_KIND.get(key[:1])
        number, slash, stem = key[1:].partition(b"/")
        if kind is None or not number.isdigit() or (kind == "stem") != bool(slash and stem):
            raise ValueError(f"not a cache entry key: {key!r}")
        return cls(kind, int(number), stem)

    @property
    def leaf(self) -> bytes:
        """What names the entry inside its directory: ``<stem>.*`` for a stem entry, else b""."""
        return self.stem + b".*" if self.kind == "stem" else b""

    def describe(self, directory: str) -> str:
        """The entry as people read it, given the path of its directory (or its file)."""
        if self.kind != "stem":
            return directory
        leaf = os.fsdecode(self.leaf)
        return f"{directory}/{leaf}" if directory else leaf


# -- what the shared tier needs to know (mithrilfs/remote/) ---------------------------


def is_scratch(name: bytes) -> bool:
    """Names compilers write under before renaming into place, and per-node lock files:
    never published to, nor fetched from, the shared tier."""
    return name.startswith((b".", b"tmp")) or name.endswith(b".lock")


def is_triton_complete(names: list[bytes]) -> bool:
    """Whether a Triton entry whose top-level file names are *names* has its group file."""
    return any(is_group_file(name) for name in names)


@dataclass(frozen=True)
class EntryMarker:
    """The file of a cache entry that a compiler reads when it finds the entry.

    A compiler that looks an entry up opens this file for reading once per
    lookup, and one that compiles writes it once, so its opens count the
    hits and its creations the misses (docs/performance.md, "Hit rate").
    ``read_back_by_creator``: the compiler that writes the entry reads the
    marker back at once (inductor imports the module it just wrote), so the
    first read after a creation belongs to that miss.
    """

    kind: str
    read_back_by_creator: bool = False


TRITON_KERNEL = EntryMarker("triton")
FX_GRAPH = EntryMarker("fxgraph")
AOT_AUTOGRAD = EntryMarker("aotautograd")
GENERATED_CODE = EntryMarker("code", read_back_by_creator=True)
MARKER_KINDS = tuple(m.kind for m in (TRITON_KERNEL, FX_GRAPH, AOT_AUTOGRAD, GENERATED_CODE))


def entry_marker(parts: list[bytes]) -> EntryMarker | None:
    """The marker that the file at *parts* (from a tree's root) is, if any.

    Triton's group file ``__grp__<name>.json`` names every artifact of a
    kernel and is what Triton reads first on a hit; an FX graph or
    AOTAutograd entry is one file in its key directory; a code-cache entry
    is marked by its ``.py`` module (the ``.so`` of a C++ entry is loaded
    only through it).
    """
    name = parts[-1] if parts else b""
    if is_transient(name) or len(parts) < 3:
        return None
    triton_key = (parts[0] == b"triton" and len(parts) == 3) or (
        parts[:2] == [b"inductor", b"triton"] and len(parts) == 5
    )
    if triton_key:
        return TRITON_KERNEL if name.startswith(b"__grp__") and name.endswith(b".json") else None
    if parts[0] != b"inductor":
        return None
    if parts[1] == b"fxgraph" and len(parts) == 5:
        return FX_GRAPH
    if parts[1] == b"aotautograd" and len(parts) == 4:
        return AOT_AUTOGRAD
    if len(parts[1]) == 2 and len(parts) == 3 and name.endswith(b".py"):
        return GENERATED_CODE
    return None
