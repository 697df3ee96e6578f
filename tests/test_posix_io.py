"""Calls pyfuse3 3.5.0 has no handler for, and the copying tools that use them.

fallocate, copy_file_range and lseek's SEEK_DATA/SEEK_HOLE reach the daemon
as requests pyfuse3 answers with ENOSYS; these tests show what a caller gets
then (the kernel's or glibc's fallback, or EOPNOTSUPP), that ``cp`` in its
forms works on the mount, and that statx fills the fields the kernel asks
for.  rsync is not installed by the CI setup, so ``cp -a`` stands for it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mount

libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
STATX_BASIC_STATS = 0x07FF
STATX_BTIME = 0x0800
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
CONTENT = bytes(range(256)) * 64  # 16 KiB


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def statx(path: Path, mask: int) -> dict[str, int]:
    """The fields of statx(2) that a stat answer carries, and the mask the kernel filled."""
    buf = ctypes.create_string_buffer(256)
    if libc.statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, mask, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    raw = buf.raw
    nlink, uid, gid, mode = struct.unpack_from("<IIIH", raw, 16)
    ino, size, blocks = struct.unpack_from("<QQQ", raw, 32)
    mtime_sec, mtime_nsec = struct.unpack_from("<qI", raw, 112)
    return {
        "mask": struct.unpack_from("<I", raw, 0)[0],
        "blksize": struct.unpack_from("<I", raw, 4)[0],
        "nlink": nlink,
        "uid": uid,
        "gid": gid,
        "mode": mode,
        "ino": ino,
        "size": size,
        "blocks": blocks,
        "mtime_ns": mtime_sec * 1_000_000_000 + mtime_nsec,
    }


@pytest.fixture
def written(mount: Mount) -> Path:
    path = mount / "triton" / "data.bin"
    path.write_bytes(CONTENT)
    return path


def test_fallocate_modes_are_not_supported_and_posix_fallocate_emulates(mount: Mount) -> None:
    path = mount / "triton" / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            with pytest.raises(OSError, match=rf"^\[Errno {errno.EOPNOTSUPP}\] "):
                fallocate(fd, mode, 0, 8192)
        assert os.fstat(fd).st_size == 0
        # glibc answers EOPNOTSUPP by writing a zero into every block.
        os.posix_fallocate(fd, 0, 10_000)
        assert os.fstat(fd).st_size == 10_000
        os.write(fd, b"head")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + bytes(10_000 - 4)


def test_copy_file_range_falls_back_to_a_copy(written: Path) -> None:
    target = written.with_name("copy.bin")
    source_fd = os.open(written, os.O_RDONLY)
    target_fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        copied = 0
        while copied < len(CONTENT):
            done = os.copy_file_range(source_fd, target_fd, len(CONTENT) - copied)
            assert done > 0
            copied += done
    finally:
        os.close(target_fd)
        os.close(source_fd)
    assert target.read_bytes() == CONTENT


def test_seek_data_and_hole_see_one_extent(written: Path) -> None:
    """No FUSE_LSEEK: the kernel's generic answer, the whole file is data."""
    fd = os.open(written, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(CONTENT)
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            with pytest.raises(OSError, match=rf"^\[Errno {errno.ENXIO}\] "):
                os.lseek(fd, len(CONTENT) + 1, whence)
    finally:
        os.close(fd)


def test_statx_fills_the_basic_fields(written: Path) -> None:
    os.utime(written, ns=(1_600_000_000_000_000_001, 1_500_000_000_000_000_002))
    plain = os.lstat(written)
    got = statx(written, STATX_BASIC_STATS | STATX_BTIME)
    assert got["mask"] & STATX_BASIC_STATS == STATX_BASIC_STATS
    assert not got["mask"] & STATX_BTIME  # FUSE's getattr carries no birth time
    assert got["mode"] == plain.st_mode
    assert stat.S_ISREG(got["mode"])
    expected = {
        "nlink": plain.st_nlink,
        "uid": plain.st_uid,
        "gid": plain.st_gid,
        "ino": plain.st_ino,
        "size": len(CONTENT),
        "blocks": plain.st_blocks,
        "blksize": plain.st_blksize,
        "mtime_ns": 1_500_000_000_000_000_002,
    }
    assert {name: got[name] for name in expected} == expected


@pytest.mark.parametrize(
    "options", [[], ["--reflink=auto"], ["--sparse=always"]], ids=["plain", "reflink", "sparse"]
)
def test_cp_copies_into_and_within_the_mount(
    mount: Mount, written: Path, tmp_path: Path, options: list[str]
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(CONTENT[::-1])
    for source, target in ((written, written.with_name("cp.bin")), (outside, mount / "in.bin")):
        result = subprocess.run(
            ["cp", *options, str(source), str(target)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == source.read_bytes()


def test_cp_archive_keeps_links_modes_times_and_owners(mount: Mount, tmp_path: Path) -> None:
    """cp -a (what rsync -aH does here): a tree with a hard link, a symlink and a FIFO."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "k.so").write_bytes(b"kernel")
    os.chmod(tree / "sub" / "k.so", 0o751)
    os.chown(tree / "sub" / "k.so", 1234, 5678)
    os.link(tree / "sub" / "k.so", tree / "alias.so")
    os.symlink("sub/k.so", tree / "link")
    os.mkfifo(tree / "fifo", 0o640)
    os.utime(tree / "sub" / "k.so", ns=(1_400_000_000_000_000_000, 1_300_000_000_000_000_000))
    for source, target in (
        (tree, mount / "triton" / "tree"),
        (mount / "triton" / "tree", tmp_path / "back"),
    ):
        result = subprocess.run(
            ["cp", "-a", str(source), str(target)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        copied = os.lstat(target / "sub" / "k.so")
        assert (copied.st_nlink, stat.S_IMODE(copied.st_mode)) == (2, 0o751)
        assert (copied.st_uid, copied.st_gid) == (1234, 5678)
        assert copied.st_mtime_ns == 1_300_000_000_000_000_000
        assert os.lstat(target / "alias.so").st_ino == copied.st_ino
        assert os.readlink(target / "link") == "sub/k.so"
        assert stat.S_ISFIFO(os.lstat(target / "fifo").st_mode)
        assert (target / "alias.so").read_bytes() == b"kernel"
