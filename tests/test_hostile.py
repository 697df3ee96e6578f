"""Bad input from every side: deep paths, a full backing disk, a read-only store.

(Name lengths, non-UTF-8 names, garbage indexes and CLI misuse are in
test_posix.py and test_cli.py; files larger than the cap in test_eviction.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from tests.conftest import as_nobody


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to hold a store, so the backing disk can really fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_deep_paths(mount) -> None:
    path = mount.mountpoint / "triton"
    for level in range(120):
        path = path / f"d{level:03d}"
    path.mkdir(parents=True)
    (path / "leaf").write_bytes(b"deep")
    assert (path / "leaf").read_bytes() == b"deep"
    mount.remount()
    assert (path / "leaf").read_bytes() == b"deep"
    too_deep = path
    while len(os.fsencode(too_deep)) < 4200:
        too_deep = too_deep / ("x" * 200)
    with pytest.raises(OSError, match="File name too long"):
        too_deep.mkdir(parents=True)


def test_full_backing_disk_gives_enospc_and_nothing_else_breaks(small_disk, make_mount) -> None:
    # small_disk first: it must outlive the mount, which is unmounted first.
    mount = make_mount("--cap", "100M", store=small_disk / "store")
    keep = mount / "triton" / "keep"
    keep.write_bytes(b"k" * 1000)
    big = mount / "triton" / "big"

    def fill() -> None:
        with big.open("wb") as out:
            for _ in range(16):
                out.write(os.urandom(512 * 1024))
                out.flush()

    with pytest.raises(OSError, match="No space left on device"):
        fill()
    # The mount still serves, the other file is intact, and once the writer's
    # file is gone there is room again.
    assert keep.read_bytes() == b"k" * 1000
    big.unlink()
    (mount / "triton" / "after").write_bytes(b"a" * 1000)
    assert (mount / "triton" / "after").read_bytes() == b"a" * 1000
    mount.allow_log_errors = True  # SQLite may log 'disk is full' along the way


def test_read_only_store_is_refused_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mithrilfs",
                "mount",
                str(mountpoint),
                "--store",
                str(store),
                "--foreground",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("mithrilfs: ")
    assert "not writable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(mountpoint)
    assert os.listdir(store) == []


def test_unwritable_mountpoint_is_refused_for_an_unprivileged_user(tmp_path: Path) -> None:
    """fusermount3 lets a user mount only on a directory the user may write.

    The mount is tried by nobody (uid 65534) in a forked child (`as_nobody`).
    """
    from mithrilfs import cli, daemon  # imported before dropping privileges: the

    del daemon  # interpreter's own files may not be readable by that user

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir(mode=0o755)  # root's, not writable by the user
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o777)
    for directory in (tmp_path, *tmp_path.parents):  # pytest's temp dirs are 0700
        if directory == Path("/tmp"):
            break
        directory.chmod(0o755)

    def mount_as_nobody(stderr: TextIO) -> int:
        sys.stderr = stderr  # pytest captured the original
        return cli.main(["mount", str(mountpoint), "--store", str(store)])

    code, message = as_nobody(mount_as_nobody)
    assert code == 2, message
    assert message.startswith("mithrilfs: ")
    assert "not writable" in message
    assert not os.path.ismount(mountpoint)
    assert os.listdir(store) == []
