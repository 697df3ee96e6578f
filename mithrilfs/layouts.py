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
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_ROOTS = ("triton", "inductor")
OTHER_LAYOUT = "other"


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
    if len(parts) >= 3 and parts[0] == b"triton":
        return EntryRule(depth=2)
    if len(parts) < 3 or parts[0] != b"inductor":
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
