"""What each device-class tree in a store holds, and what one subtree of it holds."""

from __future__ import annotations

from dataclasses import dataclass

from mithrilfs.index import Index


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
    for name, root in index.class_roots():
        files, size, _entries = index.file_usage(root)
        usage.append(ClassUsage(name.decode(errors="replace"), files, size))
    return usage


def tree_usage(index: Index, directory: int) -> TreeUsage:
    """What the files below *directory* hold."""
    files, size, entries = index.file_usage(directory)
    objects, stored = index.object_usage(directory)
    return TreeUsage(files, size, stored, objects, entries)
