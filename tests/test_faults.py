"""Faults injected into a serving daemon, and the promises that must still hold.

- a busy index while the kernel forgets an inode: the mount keeps serving and
  the inode is freed later;
- a disk that fills up while a file is sealed at close: nothing of the file
  stays held (staging, the open inode, its bytes against the cap);
- fsync: once it returns, the index transaction is in the synced database
  file, not only in the WAL.

Every mount is unmounted by the fixture, which fails the test unless fsck
finds the store clean and the daemon logged no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.conftest import Mount, run_cli, wait_for

KiB = 1024
DEADLINE = 30.0
# Starts the CLI with a short busy timeout on the index, so that a held lock
# fails a statement at once instead of after ten seconds.
SHORT_BUSY_TIMEOUT = (
    "import sys; import mithrilfs.index; mithrilfs.index.BUSY_TIMEOUT = 0.2; "
    "from mithrilfs.cli import main; sys.exit(main())"
)


def inode_rows(store: Path, ino: int) -> int:
    db = sqlite3.connect(f"file:{store / 'mithril.db'}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM inodes WHERE id=?", (ino,)).fetchone()[0])
    finally:
        db.close()


@contextlib.contextmanager
def write_lock(store: Path) -> Iterator[None]:
    """Hold the index's write lock from another connection, as a stuck writer would."""
    db = sqlite3.connect(store / "mithril.db", isolation_level=None, timeout=10)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")
    finally:
        db.close()


def drop_kernel_caches() -> None:
    """Make the kernel forget the inodes nobody uses (FUSE FORGET)."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_a_forget_against_a_busy_index_never_stops_the_mount(make_mount) -> None:
    mount: Mount = make_mount(start=False)
    mount.launcher = [sys.executable, "-c", SHORT_BUSY_TIMEOUT]
    mount.start()
    keep = mount / "triton" / "keep"
    keep.write_bytes(b"still served")
    doomed = mount / "triton" / "doomed"
    doomed.write_bytes(b"x" * 5000)
    fd = os.open(doomed, os.O_RDONLY)
    ino = os.fstat(fd).st_ino
    doomed.unlink()
    with write_lock(mount.store):
        os.close(fd)  # the last reference: the kernel forgets the inode
        drop_kernel_caches()
        wait_for(
            lambda: f"freeing inode {ino} failed, will retry" in mount.log_text(),
            DEADLINE,
            "the daemon to fail freeing the forgotten inode",
            alive=lambda: mount.proc is not None and mount.proc.poll() is None,
        )
        # Still serving (reads need no write lock).
        assert keep.read_bytes() == b"still served"
        assert inode_rows(mount.store, ino) == 1
    # Housekeeping retries the free once the index is writable again.
    wait_for(lambda: inode_rows(mount.store, ino) == 0, DEADLINE, "the retried free")
    (mount / "triton" / "after").write_bytes(b"writes work again")
    assert (mount / "triton" / "after").read_bytes() == b"writes work again"
    assert keep.read_bytes() == b"still served"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs whose inode limit the test lowers to make the next mkdir fail."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,nr_inodes=4096", "tmpfs", str(disk)], check=True
    )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def set_inode_limit(disk: Path, limit: int) -> None:
    subprocess.run(["mount", "-o", f"remount,nr_inodes={limit}", str(disk)], check=True)


def used_by_statfs(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bavail) * st.f_frsize


def test_a_seal_that_hits_a_full_disk_at_close_releases_everything(
    tiny_disk: Path, make_mount
) -> None:
    # tiny_disk first: it must outlive the mount, which is unmounted first.
    mount: Mount = make_mount("--cap", "16M", store=tiny_disk / "store")
    mount.allow_log_errors = True  # a full disk may be logged along the way
    path = mount / "triton" / "victim"
    data = os.urandom(300 * KiB)  # hashed in a thread: sealing awaits
    baseline = used_by_statfs(mount.mountpoint)
    st = os.statvfs(tiny_disk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    # Room for the staging file, none for the shard directories of its object.
    set_inode_limit(tiny_disk, st.f_files - st.f_ffree + 1)
    try:
        os.write(fd, data)
        assert list((mount.store / "staging").iterdir()), "the write should be staged"
        with pytest.raises(OSError, match="No space left on device"):
            os.close(fd)
        # Nothing of the failed file is held: no staging file, no bytes
        # against the cap, and the file is not "being written".
        wait_for(
            lambda: not list((mount.store / "staging").iterdir()),
            DEADLINE,
            "the staging file of the failed seal to go",
        )
        assert used_by_statfs(mount.mountpoint) < baseline + len(data) // 2
        shards = [d for d in (mount.store / "objects").rglob("*") if d.is_dir()]
        assert all(any(d.iterdir()) for d in shards), "an empty shard directory was left"
        assert path.stat().st_size == 0  # its last sealed content: the empty file
    finally:
        set_inode_limit(tiny_disk, 4096)
    ino = path.stat().st_ino
    result = run_cli("evict", "--store", mount.store, "--path", "triton/victim", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["entries"] == 1, result.stdout
    wait_for(lambda: not path.exists(), DEADLINE, "the evicted name to vanish")
    # No handle holds the inode any more: once the kernel forgets it, it goes.
    drop_kernel_caches()
    wait_for(lambda: inode_rows(mount.store, ino) == 0, DEADLINE, "the evicted inode to be freed")
    # With room again, the same file seals.
    path.write_bytes(data)
    assert path.read_bytes() == data


def test_fsync_puts_the_transaction_into_the_synced_database_file(
    make_mount, tmp_path: Path
) -> None:
    mount: Mount = make_mount()
    path = mount / "triton" / "durable"
    data = os.urandom(64 * KiB)
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
        ino = os.fstat(out.fileno()).st_ino
        # What survives if the WAL is lost: the database file alone.
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copyfile(mount.store / "mithril.db", copy / "mithril.db")
    db = sqlite3.connect(copy / "mithril.db")
    try:
        row = db.execute("SELECT object, size FROM inodes WHERE id=?", (ino,)).fetchone()
    finally:
        db.close()
    assert row == (blake3.blake3(data).digest(), len(data))
    assert path.read_bytes() == data
