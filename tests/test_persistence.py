"""A tree written through a mount comes back exactly after a remount, and another.

Exactly means every name (non-UTF-8 ones included), type, mode, size,
content hash, symlink target and mtime to the nanosecond.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

from tests.conftest import Mount

MiB = 1024 * 1024

Record = tuple[int, int, str | None, bytes | None, int]


def snapshot(root: Path) -> dict[bytes, Record]:
    """(mode, size, sha256, symlink target, mtime_ns) for everything under *root*, root included."""
    top = os.fsencode(root)
    found: dict[bytes, Record] = {}

    def visit(path: bytes, relative: bytes) -> None:
        st = os.lstat(path)
        digest = target = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
        found[relative] = (st.st_mode, st.st_size, digest, target, st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(path):
                visit(path + b"/" + name, relative + b"/" + name)

    visit(top, b".")
    return found


def build_tree(root: Path) -> None:
    rng = random.Random(1)
    top = os.fsencode(root)
    dirs = [b"triton/ABCDEF/deep/deeper/deepest", b"inductor/fx/\xff\xfe", b"inductor/empty"]
    for d in dirs:
        os.makedirs(top + b"/" + d)
    files: dict[bytes, tuple[int, int]] = {
        b"triton/ABCDEF/kernel.so": (3 * MiB + 17, 0o755),
        b"triton/ABCDEF/kernel.json": (321, 0o644),
        b"triton/ABCDEF/empty": (0, 0o600),
        b"triton/ABCDEF/deep/deeper/deepest/one-byte": (1, 0o444),
        b"inductor/fx/\xff\xfe/caf\xe9.bin": (MiB, 0o640),
        b"inductor/fx/\xff\xfe/block": (128 * 1024, 0o700),
        b"inductor/.lock": (0, 0o644),
        b"top-level \xe2\x98\x83": (4097, 0o604),
    }
    for name, (size, mode) in files.items():
        path = top + b"/" + name
        with open(path, "wb") as f:
            f.write(rng.randbytes(size))
        os.chmod(path, mode)
    os.symlink(b"kernel.so", top + b"/triton/ABCDEF/relative-link")
    os.symlink(top + b"/triton/ABCDEF/kernel.json", top + b"/inductor/absolute-link")
    os.symlink(b"../../dangling/\xfe", top + b"/inductor/fx/dangling")
    os.chmod(top + b"/inductor/empty", 0o700)
    os.chmod(top + b"/triton/ABCDEF/deep", 0o751)
    # Odd nanoseconds, set last so that nothing afterwards touches them.
    os.utime(top + b"/triton/ABCDEF/kernel.json", ns=(1_700_000_000_000_000_001, 1_234_567_891))
    os.utime(top + b"/inductor/absolute-link", ns=(5, 7), follow_symlinks=False)
    os.utime(top + b"/inductor/empty", ns=(1_000_000_000_999_999_999, 999_999_999))


def test_tree_survives_remounts_exactly(mount: Mount) -> None:
    build_tree(mount.mountpoint)
    before = snapshot(mount.mountpoint)
    assert len(before) == 22  # with users/, the private trees' directory
    assert before[b"./inductor/absolute-link"][4] == 7
    assert before[b"./triton/ABCDEF/kernel.so"][:2] == (stat.S_IFREG | 0o755, 3 * MiB + 17)
    mount.remount()
    assert snapshot(mount.mountpoint) == before
    mount.remount()
    assert snapshot(mount.mountpoint) == before


def test_content_written_through_many_handles_survives_remount(mount: Mount) -> None:
    # Several writers and truncates on one file before the last close.
    path = mount / "triton" / "f"
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(path, os.O_RDWR)
    try:
        os.pwrite(first, b"a" * 10_000, 0)
        os.pwrite(second, b"b" * 100, 5_000)
        os.ftruncate(first, 8_000)
        os.pwrite(second, b"c", 20_000)
    finally:
        os.close(first)
        os.close(second)
    expected = b"a" * 5_000 + b"b" * 100 + b"a" * 2_900 + bytes(12_000) + b"c"
    assert path.read_bytes() == expected
    before = snapshot(mount.mountpoint)
    mount.remount()
    assert path.read_bytes() == expected
    assert snapshot(mount.mountpoint) == before
