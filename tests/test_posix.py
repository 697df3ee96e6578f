"""The POSIX behaviour the compilers depend on, each shown on a real mount.

Every test runs against a mount started through the CLI; the fixture
unmounts it afterwards and fails the test unless fsck finds the store clean
and the daemon logged no traceback.  Tests that provoke an error also check
that the mount still serves afterwards: an error must never kill it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs.repository import Repository
from mithrilfs.store import EMPTY_DIGEST
from tests.conftest import Mount

MiB = 1024 * 1024
# Processes that race each other are forked so that they start in
# microseconds and share the test's imports.
fork = multiprocessing.get_context("fork")


@contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """Expect an OSError with exactly errno *code*."""
    with pytest.raises(OSError, match=rf"^\[Errno {code}\] "):
        yield


def assert_serving(mount: Mount) -> None:
    """The mount still answers after an error was provoked."""
    root = os.stat(mount.mountpoint)
    assert stat.S_ISDIR(root.st_mode)
    assert {"triton", "inductor"} <= set(os.listdir(mount.mountpoint))


def pattern(size: int, seed: int = 0) -> bytes:
    """Reproducible non-repeating bytes (so a misplaced block is noticed)."""
    return random.Random(seed).randbytes(size)


def drop_page_cache(fd: int) -> None:
    """Make the next read of *fd* ask the daemon, not the kernel's cached pages."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def store_objects(mount: Mount) -> dict[bytes, tuple[int, int]]:
    """hash -> (size, refcount) of every object of the unmounted store."""
    repo = Repository.open(mount.store, create=False)
    try:
        rows = repo.index.db.execute("SELECT hash, size, refcount FROM objects").fetchall()
    finally:
        repo.close()
    return {digest: (size, refcount) for digest, size, refcount in rows}


# -- attributes: lookup, getattr, setattr -------------------------------------------


def test_chmod_keeps_mode_bits_and_file_type(mount: Mount) -> None:
    path = mount / "triton" / "kernel.so"
    path.write_bytes(b"\x7fELF")
    directory = mount / "triton" / "key"
    directory.mkdir()
    for mode in (0o755, 0o600, 0o4711, 0o000):
        os.chmod(path, mode)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == mode
        assert stat.S_ISREG(st.st_mode)
    os.chmod(directory, 0o1777)
    assert os.stat(directory).st_mode == stat.S_IFDIR | 0o1777
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)
    mount.remount()
    assert os.stat(path).st_mode == stat.S_IFREG | 0o750
    assert os.stat(directory).st_mode == stat.S_IFDIR | 0o1777
    assert path.read_bytes() == b"\x7fELF"


def test_truncate_by_path_grows_with_zeros_and_shrinks(mount: Mount) -> None:
    path = mount / "triton" / "f"
    data = pattern(10_000)
    path.write_bytes(data)
    os.truncate(path, 3 * MiB)
    assert os.stat(path).st_size == 3 * MiB
    assert path.read_bytes() == data + bytes(3 * MiB - len(data))
    os.truncate(path, 1234)
    assert os.stat(path).st_size == 1234
    assert path.read_bytes() == data[:1234]
    os.truncate(path, 0)
    assert path.read_bytes() == b""
    mount.remount()
    assert os.stat(path).st_size == 0


def test_ftruncate_on_an_open_fd(mount: Mount) -> None:
    path = mount / "triton" / "f"
    data = pattern(200_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 70_000)
        assert os.fstat(fd).st_size == 70_000
        assert os.pread(fd, 200_000, 0) == data[:70_000]
        os.ftruncate(fd, 100_000)
        assert os.pread(fd, 200_000, 0) == data[:70_000] + bytes(30_000)
        os.pwrite(fd, b"tail", 100_000)
        assert os.fstat(fd).st_size == 100_004
    finally:
        os.close(fd)
    expected = data[:70_000] + bytes(30_000) + b"tail"
    assert path.read_bytes() == expected
    mount.remount()
    assert path.read_bytes() == expected


def test_utime_ns_persists_after_remount(mount: Mount) -> None:
    file = mount / "triton" / "f"
    file.write_bytes(b"x")
    directory = mount / "triton" / "d"
    directory.mkdir()
    link = mount / "triton" / "l"
    link.symlink_to("f")
    times = {
        file: (1_600_000_000_123_456_789, 1_650_000_000_987_654_321),
        directory: (1_500_000_000_000_000_001, 1_500_000_000_000_000_002),
    }
    for path, ns in times.items():
        os.utime(path, ns=ns)
    link_times = (1_400_000_000_000_000_007, 1_400_000_000_000_000_008)
    os.utime(link, ns=link_times, follow_symlinks=False)
    mount.remount()
    for path, (atime, mtime) in times.items():
        st = os.stat(path)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    st = os.lstat(link)
    assert (st.st_atime_ns, st.st_mtime_ns) == link_times


def test_mtime_seen_during_write_is_the_one_kept(mount: Mount) -> None:
    # A stat between write and close is cached by the kernel; the mtime it
    # shows must be the one the file keeps once sealed.
    path = mount / "triton" / "f"
    with open(path, "wb") as f:
        f.write(b"abc")
        f.flush()
        during = os.stat(path).st_mtime_ns
    after_close = os.stat(path).st_mtime_ns
    mount.remount()
    assert os.stat(path).st_mtime_ns == during == after_close


# -- directories ---------------------------------------------------------------------


def test_mkdir_rmdir_and_nlink(mount: Mount) -> None:
    top = mount / "triton" / "top"
    top.mkdir()
    assert os.stat(top).st_nlink == 2
    for name in ("a", "b", "c"):
        (top / name).mkdir()
    (top / "file").write_bytes(b"x")
    assert os.stat(top).st_nlink == 5  # 2 + three subdirectories; files do not count
    assert os.stat(top / "file").st_nlink == 1
    os.rmdir(top / "b")
    assert os.stat(top).st_nlink == 4
    os.rename(top / "c", mount / "triton" / "c")
    assert os.stat(top).st_nlink == 3
    assert sorted(os.listdir(top)) == ["a", "file"]
    with raises_errno(errno.EEXIST):
        os.mkdir(top / "a")
    mount.remount()
    assert os.stat(top).st_nlink == 3
    assert os.stat(mount.mountpoint).st_nlink == 2 + 3  # triton, inductor and users
    assert os.stat(mount / "triton").st_nlink == 2 + 2  # top and c


def test_rmdir_of_non_empty_dir_is_enotempty(mount: Mount) -> None:
    d = mount / "triton" / "d"
    d.mkdir()
    (d / ".lock").write_bytes(b"")
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(d)
    assert os.listdir(d) == [".lock"]
    assert_serving(mount)


def test_rmdir_of_file_is_enotdir(mount: Mount) -> None:
    f = mount / "triton" / "f"
    f.write_bytes(b"x")
    with raises_errno(errno.ENOTDIR):
        os.rmdir(f)
    assert f.read_bytes() == b"x"
    assert_serving(mount)


# -- create, open, O_EXCL, O_TRUNC ----------------------------------------------------


def _create_exclusive(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        results.put(exc.errno)
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    results.put(0)


def test_o_excl_create_race_has_exactly_one_winner(mount: Mount) -> None:
    racers = 8
    for round_ in range(5):
        path = os.fspath(mount / "triton" / f"lock.{round_}")
        barrier = fork.Barrier(racers)
        results = fork.Queue()
        procs = [
            fork.Process(target=_create_exclusive, args=(path, barrier, results))
            for _ in range(racers)
        ]
        for proc in procs:
            proc.start()
        outcomes = sorted(results.get(timeout=30) for _ in procs)
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
        assert outcomes == [0] + [errno.EEXIST] * (racers - 1)
        winner = int(Path(path).read_bytes())
        assert winner in {proc.pid for proc in procs}
    assert_serving(mount)


def test_o_trunc_discards_existing_content(mount: Mount) -> None:
    path = mount / "triton" / "f"
    path.write_bytes(pattern(300_000))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    fd = os.open(path, os.O_RDONLY | os.O_TRUNC)  # O_TRUNC honoured even with O_RDONLY
    os.close(fd)
    assert path.read_bytes() == b""
    mount.remount()
    assert path.read_bytes() == b""


def test_o_trunc_is_seen_by_a_reader_that_has_the_file_open(mount: Mount) -> None:
    path = mount / "triton" / "f"
    old = pattern(500_000, seed=1)
    path.write_bytes(old)
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 100, 0) == old[:100]
        writer = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(reader).st_size == 0
            assert os.pread(reader, 100, 0) == b""
            os.write(writer, b"replacement")
        finally:
            os.close(writer)
        assert os.fstat(reader).st_size == len(b"replacement")
        assert os.pread(reader, 1000, 0) == b"replacement"
        drop_page_cache(reader)
        assert os.pread(reader, 1000, 0) == b"replacement"
    finally:
        os.close(reader)


# -- writing the way the linker does -----------------------------------------------


def test_writes_at_random_offsets_and_holes(mount: Mount) -> None:
    path = mount / "triton" / "kernel.so"
    rng = random.Random(7)
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(200):
            offset = rng.randrange(0, 2 * MiB)
            chunk = rng.randbytes(rng.randrange(1, 20_000))
            assert os.pwrite(fd, chunk, offset) == len(chunk)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(chunk)] = chunk
        # A hole well past EOF: the gap reads back as zeros.
        os.pwrite(fd, b"end", 5 * MiB)
        model.extend(bytes(5 * MiB - len(model)))
        model += b"end"
        assert os.fstat(fd).st_size == len(model)
        assert os.pread(fd, 10 * MiB, 0) == model
    finally:
        os.close(fd)
    assert path.read_bytes() == model
    mount.remount()
    assert path.read_bytes() == model


def test_pwrite_beyond_eof_reads_back_zeros(mount: Mount) -> None:
    path = mount / "triton" / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x", 1_000_000)
        assert os.fstat(fd).st_size == 1_000_001
        assert os.pread(fd, 2_000_000, 0) == bytes(1_000_000) + b"x"
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        assert os.pread(fd, 2_000_000, 0) == bytes(1_000_000) + b"x"
    finally:
        os.close(fd)


def test_read_back_before_close_on_same_and_other_fd(mount: Mount) -> None:
    path = mount / "triton" / "out.so"
    first = pattern(150_000, seed=2)
    writer = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o755)
    try:
        os.write(writer, first)
        assert os.pread(writer, len(first), 0) == first
        other = os.open(path, os.O_RDONLY)
        try:
            assert os.fstat(other).st_size == len(first)
            assert os.pread(other, MiB, 0) == first
            # Patch a header after the body, as ld does, and see it everywhere.
            os.pwrite(writer, b"HDR!", 16)
            patched = first[:16] + b"HDR!" + first[20:]
            assert os.pread(writer, MiB, 0) == patched
            assert os.pread(other, MiB, 0) == patched
            drop_page_cache(other)
            assert os.pread(other, MiB, 0) == patched
        finally:
            os.close(other)
    finally:
        os.close(writer)
    assert path.read_bytes() == patched


# -- flush, fsync, release -------------------------------------------------------------


def test_fsync_makes_content_durable_before_close(make_mount: Any) -> None:
    mount = make_mount()
    path = mount / "triton" / "f"
    data = pattern(400_000, seed=3)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.fdatasync(fd)
        # Killed with the file still open: only fsync can have saved it.
        mount.kill()
    finally:
        # The close reaches a dead connection; whatever it says, the fd is gone.
        with contextlib.suppress(OSError):
            os.close(fd)
    mount.start()
    assert path.read_bytes() == data


def test_close_seals_content_into_the_store(mount: Mount) -> None:
    data = pattern(300_000, seed=4)
    with open(mount / "triton" / "f", "wb") as f:
        f.write(data)
    assert (mount / "triton" / "f").read_bytes() == data
    mount.stop()
    objects = store_objects(mount)
    assert objects[blake3.blake3(data).digest()] == (len(data), 1)
    assert set(objects) == {blake3.blake3(data).digest(), EMPTY_DIGEST}


# -- unlink while open -----------------------------------------------------------------


def test_unlinked_file_stays_readable_while_open(mount: Mount) -> None:
    path = mount / "triton" / "f"
    data = pattern(3 * MiB, seed=5)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 0) == data[:10]
        os.unlink(path)
        assert not path.exists()
        drop_page_cache(fd)
        assert os.pread(fd, 4 * MiB, 0) == data
        assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)
    assert os.listdir(mount / "triton") == []


def test_unlinked_file_stays_writable_while_open(mount: Mount) -> None:
    path = mount / "triton" / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before")
        os.unlink(path)
        os.write(fd, b" after")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"before after"
    finally:
        os.close(fd)
    assert not path.exists()
    mount.stop()
    assert set(store_objects(mount)) <= {EMPTY_DIGEST}


# -- rename ------------------------------------------------------------------------------


def _read_slowly(path: str, ready: Any, go: Any, results: Any) -> None:
    fd = os.open(path, os.O_RDONLY)
    first = os.pread(fd, 4096, 0)
    ready.set()
    go.wait(30)
    drop_page_cache(fd)
    rest = os.pread(fd, 64 * MiB, 4096)
    os.close(fd)
    results.put(hashlib.sha256(first + rest).hexdigest())


def test_rename_replaces_a_file_another_process_is_reading(mount: Mount) -> None:
    target = mount / "triton" / "kernel.cubin"
    old, new = pattern(2 * MiB, seed=6), pattern(MiB + 5, seed=8)
    target.write_bytes(old)
    ready, go, results = fork.Event(), fork.Event(), fork.Queue()
    reader = fork.Process(target=_read_slowly, args=(os.fspath(target), ready, go, results))
    reader.start()
    try:
        assert ready.wait(30)
        staged = mount / "triton" / "kernel.cubin.tmp"
        staged.write_bytes(new)
        os.replace(staged, target)
        assert target.read_bytes() == new
        go.set()
        assert results.get(timeout=30) == hashlib.sha256(old).hexdigest()
    finally:
        go.set()
        reader.join(30)
    assert reader.exitcode == 0
    assert os.listdir(mount / "triton") == ["kernel.cubin"]
    assert target.read_bytes() == new


def test_rename_file_across_directories(mount: Mount) -> None:
    src_dir, dst_dir = mount / "triton" / "tmp.pid_1_2", mount / "inductor" / "ab"
    src_dir.mkdir()
    dst_dir.mkdir()
    (src_dir / "f").write_bytes(b"new")
    (dst_dir / "g").write_bytes(b"old")
    os.rename(src_dir / "f", dst_dir / "g")
    assert (dst_dir / "g").read_bytes() == b"new"
    assert os.listdir(src_dir) == []
    os.rename(dst_dir / "g", src_dir / "h")
    assert os.listdir(dst_dir) == []
    mount.remount()
    assert (src_dir / "h").read_bytes() == b"new"
    assert os.listdir(dst_dir) == []


@pytest.mark.parametrize("target_state", ["absent", "empty"])
def test_rename_dir_onto_absent_or_empty_dir(mount: Mount, target_state: str) -> None:
    src = mount / "triton" / "tmp.pid_1_2"
    src.mkdir()
    (src / "a.json").write_bytes(b"{}")
    dst = mount / "inductor" / "key"
    if target_state == "empty":
        dst.mkdir()
    os.rename(src, dst)
    assert not src.exists()
    assert os.listdir(dst) == ["a.json"]
    assert os.stat(mount / "triton").st_nlink == 2
    assert os.stat(mount / "inductor").st_nlink == 3
    mount.remount()
    assert (dst / "a.json").read_bytes() == b"{}"


def test_rename_dir_onto_non_empty_dir_is_enotempty(mount: Mount) -> None:
    src, dst = mount / "triton" / "a", mount / "triton" / "b"
    src.mkdir()
    dst.mkdir()
    (dst / "keep").write_bytes(b"x")
    with raises_errno(errno.ENOTEMPTY):
        os.rename(src, dst)
    assert src.is_dir()
    assert os.listdir(dst) == ["keep"]
    assert_serving(mount)


def test_rename_dir_into_its_own_subdir_is_einval(mount: Mount) -> None:
    top = mount / "triton" / "a"
    (top / "b" / "c").mkdir(parents=True)
    with raises_errno(errno.EINVAL):
        os.rename(top, top / "b" / "c" / "a")
    with raises_errno(errno.EINVAL):
        os.rename(top, top / "inside")
    assert (top / "b" / "c").is_dir()
    assert_serving(mount)


def test_rename_file_onto_dir_is_eisdir(mount: Mount) -> None:
    f, d = mount / "triton" / "f", mount / "triton" / "d"
    f.write_bytes(b"x")
    d.mkdir()
    with raises_errno(errno.EISDIR):
        os.rename(f, d)
    assert f.read_bytes() == b"x"
    assert d.is_dir()
    assert_serving(mount)


def test_rename_dir_onto_file_is_enotdir(mount: Mount) -> None:
    f, d = mount / "triton" / "f", mount / "triton" / "d"
    f.write_bytes(b"x")
    d.mkdir()
    with raises_errno(errno.ENOTDIR):
        os.rename(d, f)
    assert f.read_bytes() == b"x"
    assert d.is_dir()
    assert_serving(mount)


RENAME_NOREPLACE = 1
AT_FDCWD = -100


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(
        AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(old))


def test_renameat2_noreplace(mount: Mount) -> None:
    a, b, c = (mount / "triton" / name for name in "abc")
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    with raises_errno(errno.EEXIST):
        renameat2(a, b, RENAME_NOREPLACE)
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")
    renameat2(a, c, RENAME_NOREPLACE)
    assert sorted(os.listdir(mount / "triton")) == ["b", "c"]
    assert c.read_bytes() == b"a"
    assert_serving(mount)


# -- readdir -----------------------------------------------------------------------------


def test_readdir_is_stable_while_entries_come_and_go(mount: Mount) -> None:
    directory = mount / "triton"
    stable = {f"{i:040x}" for i in range(2000)}
    for name in stable:
        if name.endswith("0"):
            (directory / name).mkdir()
        else:
            (directory / name).write_bytes(b"")
    stop = threading.Event()
    churned = 0
    failure: list[BaseException] = []

    def churn() -> None:
        nonlocal churned
        try:
            while not stop.is_set():
                n = churned
                dotfile = directory / f".lock.{n}"
                tmpdir = directory / f"tmp.pid_{os.getpid()}_{n}"
                dotfile.write_bytes(b"")
                tmpdir.mkdir()
                (tmpdir / "x.json").write_bytes(b"{}")
                os.rename(tmpdir / "x.json", directory / f".x.{n}")
                os.rmdir(tmpdir)
                os.unlink(dotfile)
                os.unlink(directory / f".x.{n}")
                churned += 1
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        listings = 0
        deadline = time.monotonic() + 120  # a guard against a hang, not a timing check
        while listings < 15 or churned < 50:
            assert time.monotonic() < deadline, f"{listings} listings, {churned} changes"
            names = os.listdir(directory)
            assert len(names) == len(set(names)), "a listing repeated an entry"
            assert stable <= set(names), f"missing {sorted(stable - set(names))[:5]}"
            assert all(n in stable or n.startswith((".", "tmp.pid_")) for n in names)
            listings += 1
            assert not failure
            assert worker.is_alive()
    finally:
        stop.set()
        worker.join(30)
    assert not failure
    assert set(os.listdir(directory)) == stable


# -- the filesystem, symlinks, locks, names ----------------------------------------------


def test_statvfs(mount: Mount) -> None:
    st = os.statvfs(mount.mountpoint)
    assert st.f_namemax == 255
    assert st.f_bsize > 0
    assert 0 < st.f_bavail <= st.f_blocks


@pytest.mark.parametrize("target", ["../inductor/real", "ABSOLUTE"])
def test_symlink_and_readlink(mount: Mount, target: str) -> None:
    real = mount / "inductor" / "real"
    real.write_bytes(b"content")
    if target == "ABSOLUTE":
        target = os.fspath(real)
    link = mount / "triton" / "link"
    os.symlink(target, link)
    assert os.readlink(link) == target
    st = os.lstat(link)
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len(os.fsencode(target))
    assert link.read_bytes() == b"content"
    mount.remount()
    assert os.readlink(link) == target
    assert link.read_bytes() == b"content"


def _try_flock(path: str, results: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results.put(0)
    except OSError as exc:
        results.put(exc.errno)
    finally:
        os.close(fd)


def test_flock_is_exclusive_between_processes(mount: Mount) -> None:
    path = mount / "triton" / "a.lock"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        results = fork.Queue()
        other = fork.Process(target=_try_flock, args=(os.fspath(path), results))
        other.start()
        assert results.get(timeout=30) == errno.EWOULDBLOCK
        other.join(30)
        fcntl.flock(fd, fcntl.LOCK_UN)
        other = fork.Process(target=_try_flock, args=(os.fspath(path), results))
        other.start()
        assert results.get(timeout=30) == 0
        other.join(30)
    finally:
        os.close(fd)


def test_names_are_arbitrary_bytes(mount: Mount) -> None:
    directory = os.fsencode(mount / "triton")
    names = {b"caf\xe9", b"\xff\xfe\x80", b"tab\there", b"new\nline", b"\xe2\x98\x83", b" "}
    for name in names:
        fd = os.open(directory + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, name)
        os.close(fd)
    os.mkdir(directory + b"/dir\xc0")
    assert set(os.listdir(directory)) == names | {b"dir\xc0"}
    mount.remount()
    assert set(os.listdir(directory)) == names | {b"dir\xc0"}
    for name in names:
        with open(directory + b"/" + name, "rb") as f:
            assert f.read() == name


def test_name_of_255_bytes_works_and_256_is_enametoolong(mount: Mount) -> None:
    directory = mount / "triton"
    longest = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(os.fsencode(longest)) == 255
    (directory / longest).write_bytes(b"ok")
    (directory / ("d" * 255)).mkdir()
    assert sorted(os.listdir(directory)) == sorted([longest, "d" * 255])
    too_long = "y" * 256
    with raises_errno(errno.ENAMETOOLONG):
        os.open(directory / too_long, os.O_WRONLY | os.O_CREAT, 0o644)
    with raises_errno(errno.ENAMETOOLONG):
        os.mkdir(directory / too_long)
    with raises_errno(errno.ENAMETOOLONG):
        os.stat(directory / too_long)
    with raises_errno(errno.ENAMETOOLONG):
        os.rename(directory / longest, directory / too_long)
    with raises_errno(errno.ENAMETOOLONG):
        os.symlink("x", directory / too_long)
    assert (directory / longest).read_bytes() == b"ok"
    assert_serving(mount)


# -- loading code from the mount --------------------------------------------------------


def test_dlopen_of_library_linked_in_place(mount: Mount, tmp_path: Path) -> None:
    source = tmp_path / "answer.c"
    source.write_text('int answer(int x) { return 6 * x; }\nconst char tag[4096] = "mithril";\n')
    library = mount / "triton" / "key" / "answer.so"
    library.parent.mkdir()
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O1", "-o", os.fspath(library), os.fspath(source)],
        check=True,
        capture_output=True,
    )
    st = os.stat(library)
    assert stat.S_IMODE(st.st_mode) & 0o111, "the linker made the library executable"
    # A child process: dlopen'ed libraries cannot be unloaded from the test
    # process, and a loaded one would keep the mount busy at unmount.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); print(lib.answer(7))",
            os.fspath(library),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "42"


def test_mmap_private_with_prot_exec(mount: Mount) -> None:
    path = mount / "triton" / "blob"
    data = pattern(3 * mmap.PAGESIZE + 100, seed=9)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(
            fd, len(data), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC
        )
        try:
            assert mapped[:] == data
        finally:
            mapped.close()
    finally:
        os.close(fd)


# -- publishing and dedup -----------------------------------------------------------------


TRITON_ENTRY = {
    "add_kernel.cubin": pattern(200_000, seed=10),
    "add_kernel.json": b'{"name": "add_kernel", "num_warps": 4}',
    "add_kernel.ptx": pattern(50_000, seed=11),
    "__grp__add_kernel.json": b'{"child_paths": {}}',
}


def _publish_like_triton(key_dir: str, barrier: Any) -> None:
    # triton FileCacheManager.put: write into a private tmp dir, then
    # os.replace each file into the key directory.
    barrier.wait()
    temp_dir = os.path.join(key_dir, f"tmp.pid_{os.getpid()}_{random.getrandbits(32)}")
    os.makedirs(temp_dir, exist_ok=True)
    for name, data in TRITON_ENTRY.items():
        temp_path = os.path.join(temp_dir, name)
        with open(temp_path, "wb") as f:
            f.write(data)
        os.replace(temp_path, os.path.join(key_dir, name))
    os.removedirs(temp_dir)


def test_racing_triton_publishers_leave_one_object_per_content(mount: Mount) -> None:
    key_dir = mount / "triton" / "QWERTYUIOPASDFGHJKLZXCVBNM234567"
    key_dir.mkdir()
    barrier = fork.Barrier(8)
    procs = [
        fork.Process(target=_publish_like_triton, args=(os.fspath(key_dir), barrier))
        for _ in range(8)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * 8
    assert sorted(os.listdir(key_dir)) == sorted(TRITON_ENTRY)
    for name, data in TRITON_ENTRY.items():
        assert (key_dir / name).read_bytes() == data
    mount.stop()
    objects = store_objects(mount)
    objects.pop(EMPTY_DIGEST, None)
    assert objects == {
        blake3.blake3(data).digest(): (len(data), 1) for data in TRITON_ENTRY.values()
    }


def test_identical_files_share_one_object(mount: Mount) -> None:
    data = pattern(5000, seed=12)
    directory = mount / "inductor" / "fxgraph"
    directory.mkdir()
    for i in range(1000):
        (directory / f"entry{i}").write_bytes(data)
    assert (directory / "entry999").read_bytes() == data
    mount.stop()
    objects = store_objects(mount)
    assert objects == {blake3.blake3(data).digest(): (len(data), 1000), EMPTY_DIGEST: (0, 0)}
