"""permissions.py's rules and index.clone's links and attributes, without a mount."""

from __future__ import annotations

import stat
from pathlib import Path

from mithrilfs.index import SUPER_ROOT, Index, Inode
from mithrilfs.permissions import inherit_from, without_privileges


def directory(mode: int, gid: int) -> Inode:
    return Inode(7, stat.S_IFDIR | mode, 1000, gid, 2, 0, 0, 0, 0, None, None)


def test_a_setgid_directory_passes_on_its_group_and_to_subdirectories_its_bit() -> None:
    parent = directory(0o2775, 50)
    assert inherit_from(parent, stat.S_IFREG | 0o644, 100) == (stat.S_IFREG | 0o644, 50)
    assert inherit_from(parent, stat.S_IFDIR | 0o755, 100) == (stat.S_IFDIR | 0o2755, 50)
    assert inherit_from(directory(0o775, 50), stat.S_IFDIR | 0o755, 100) == (
        stat.S_IFDIR | 0o755,
        100,
    )


def test_truncating_at_open_drops_setuid_and_executable_setgid_unless_root() -> None:
    assert without_privileges(stat.S_IFREG | 0o6755, 1000) == stat.S_IFREG | 0o755
    assert without_privileges(stat.S_IFREG | 0o6745, 1000) == stat.S_IFREG | 0o2745
    assert without_privileges(stat.S_IFREG | 0o6755, 0) == stat.S_IFREG | 0o6755
    assert without_privileges(stat.S_IFDIR | 0o2755, 1000) == stat.S_IFDIR | 0o2755


def test_a_clone_keeps_links_within_it_and_extended_attributes(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "index.db")
    with index.transaction():
        source = index.make_node(SUPER_ROOT, b"src", stat.S_IFDIR | 0o755, 0, 0)
        f = index.make_node(source.id, b"f", stat.S_IFREG | 0o664, 0, 0)
        index.set_xattr(f.id, b"user.origin", b"cc", 1 << 16)
    index.link(f.id, source.id, b"g")
    with index.transaction():
        copy = index.clone(
            SUPER_ROOT,
            b"copy",
            index.get(source.id),
            1000,
            1000,
            whole=True,
            skip=lambda node: False,
        )
    f2, g2 = index.lookup(copy.id, b"f"), index.lookup(copy.id, b"g")
    assert f2 is not None
    assert g2 is not None
    assert f2.id == g2.id != f.id
    assert (f2.nlink, f2.uid, stat.S_IMODE(f2.mode)) == (2, 1000, 0o644)
    assert index.get_xattr(f2.id, b"user.origin") == b"cc"
    assert index.get(f.id).nlink == 2
