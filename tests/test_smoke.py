from __future__ import annotations

import os


def test_write_read_rename_persist(mount) -> None:
    path = mount / "triton" / "a.txt"
    path.write_bytes(b"hello")
    assert path.read_bytes() == b"hello"
    os.rename(path, mount / "triton" / "b.txt")
    mount.remount()
    assert (mount / "triton" / "b.txt").read_bytes() == b"hello"
    assert not (mount / "triton" / "a.txt").exists()
