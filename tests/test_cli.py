"""The command line refuses bad input clearly and without leaving anything half-done.

Every refusal is one line on stderr starting with ``mithrilfs:``, no
traceback, a non-zero exit status, and no store created or changed.  The
daemonized form of ``mount`` returns only once the mount serves, and
``umount`` returns only once the daemon has let go of the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mithrilfs import fsck
from mithrilfs.repository import LOCK_NAME, Repository, holder_pid, store_in_use
from tests.conftest import Mount, run_cli, wait_for

mithrilfs = run_cli


def assert_refused(
    result: subprocess.CompletedProcess[str], *mentions: str, exit_code: int | None = None
) -> str:
    """One clear line on stderr, no traceback, a failing exit status; returns the line."""
    assert result.returncode != 0, result
    if exit_code is not None:
        assert result.returncode == exit_code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mithrilfs: "), lines[0]
    for text in mentions:
        assert text in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Everything under *path* (files with their bytes) to compare before and after."""
    found = {}
    for dirpath, _dirnames, filenames in os.walk(path):
        found[dirpath] = b"<dir>"
        for name in filenames:
            found[os.path.join(dirpath, name)] = Path(dirpath, name).read_bytes()
    return found


def daemon_pid(store: Path) -> int | None:
    """The live mithrilfs daemon recorded in *store*'s lock, if any."""
    pid = holder_pid(store)
    if pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"mithrilfs" in cmdline else None


def process_gone(pid: int) -> bool:
    """True once *pid* has exited (a zombie nobody reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def cleanup(tmp_path: Path) -> Iterator[list[tuple[Path, Path | None]]]:
    """(mountpoint, store) pairs that a test may have mounted: never leave one behind.

    The store is None when its daemon belongs to a `mount` fixture.
    """
    pairs: list[tuple[Path, Path | None]] = []
    yield pairs
    for mountpoint, store in pairs:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", os.fspath(mountpoint)], check=False)
        pid = daemon_pid(store) if store is not None else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


FORMS = pytest.mark.parametrize("form", [["--foreground"], []], ids=["foreground", "daemon"])


def test_mountpoint_missing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = mithrilfs("mount", tmp_path / "nowhere", "--store", store, "--foreground")
    assert_refused(result, "does not exist", exit_code=2)
    assert not store.exists()


def test_mountpoint_is_a_file(tmp_path: Path) -> None:
    store, file = tmp_path / "store", tmp_path / "file"
    file.write_bytes(b"x")
    result = mithrilfs("mount", file, "--store", store)
    assert_refused(result, "not a directory", exit_code=2)
    assert not store.exists()
    assert file.read_bytes() == b"x"


@FORMS
@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_store_cannot_be_created(
    tmp_path: Path, cleanup: list[tuple[Path, Path | None]], form: list[str], where: str
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    if where == "proc":
        store = Path("/proc/version/store")
    else:
        (tmp_path / "file").write_bytes(b"x")
        store = tmp_path / "file" / "store"
    cleanup.append((mountpoint, store))
    result = mithrilfs("mount", mountpoint, "--store", store, *form)
    assert_refused(result, "cannot create store", os.fspath(store))
    assert not os.path.ismount(mountpoint)
    assert sorted(os.listdir(tmp_path)) == (["mnt"] if where == "proc" else ["file", "mnt"])


def test_mountpoint_already_mounted(
    mount: Mount, tmp_path: Path, cleanup: list[tuple[Path, Path | None]]
) -> None:
    other_store = tmp_path / "other-store"
    # Only a daemon the refused command may have started; the first mount is the fixture's.
    cleanup.append((tmp_path / "not-a-mountpoint", other_store))
    result = mithrilfs("mount", mount.mountpoint, "--store", other_store)
    assert_refused(result, "already a mount point", exit_code=1)
    assert not other_store.exists()
    assert os.listdir(mount.mountpoint)  # the first mount still serves
    assert mount.proc is not None
    assert mount.proc.poll() is None


@FORMS
def test_store_already_served_by_another_daemon(
    mount: Mount, tmp_path: Path, cleanup: list[tuple[Path, Path | None]], form: list[str]
) -> None:
    second = tmp_path / "second"
    second.mkdir()
    cleanup.append((second, None))
    (mount / "triton" / "f").write_bytes(b"x")
    lock_before = (mount.store / LOCK_NAME).read_bytes()
    result = mithrilfs(
        "mount", second, "--store", mount.store, "--log-file", tmp_path / "2.log", *form
    )
    assert mount.proc is not None
    assert_refused(result, "in use", f"pid {mount.proc.pid}", exit_code=1)
    assert not os.path.ismount(second)
    assert (mount.store / LOCK_NAME).read_bytes() == lock_before
    assert (mount / "triton" / "f").read_bytes() == b"x"


@pytest.mark.parametrize("option", ["bogus", "nosuch=3", "store=", "ro=1,allow_other"])
def test_unknown_mount_option(tmp_path: Path, option: str) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    result = mithrilfs("mount", mountpoint, "--store", store, "-o", option, "--foreground")
    assert_refused(result, "mount option", exit_code=2)
    assert not store.exists()
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("name", ["CUDA SM90", "../etc", "", "x" * 300])
def test_invalid_device_class(tmp_path: Path, name: str) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    result = mithrilfs("mount", mountpoint, "--store", store, "--device-class", name)
    assert_refused(result, "device class", exit_code=2)
    assert not store.exists()
    assert not os.path.ismount(mountpoint)


def test_umount_of_a_path_that_is_not_mounted(tmp_path: Path) -> None:
    assert_refused(mithrilfs("umount", tmp_path), "not mounted", exit_code=1)
    assert_refused(mithrilfs("umount", tmp_path / "missing"), "not mounted", exit_code=1)


def test_umount_of_a_foreign_mount() -> None:
    assert_refused(mithrilfs("umount", "/proc"), "not a mithrilfs mount", exit_code=1)
    assert os.path.ismount("/proc")


def test_fsck_of_a_missing_store(tmp_path: Path) -> None:
    store = tmp_path / "missing"
    assert_refused(mithrilfs("fsck", "--store", store), "does not exist", exit_code=2)
    assert not store.exists()


@FORMS
def test_garbage_index_is_refused_and_left_alone(
    tmp_path: Path, cleanup: list[tuple[Path, Path | None]], form: list[str]
) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    store.mkdir()
    mountpoint.mkdir()
    cleanup.append((mountpoint, store))
    garbage = os.urandom(64 * 1024)
    (store / "mithril.db").write_bytes(garbage)
    result = mithrilfs("mount", mountpoint, "--store", store, "--log-file", tmp_path / "log", *form)
    line = assert_refused(result, exit_code=3)
    assert "move" in line or "repair" in line
    assert not os.path.ismount(mountpoint)
    assert (store / "mithril.db").read_bytes() == garbage
    assert_refused(mithrilfs("fsck", "--store", store), exit_code=3)
    assert (store / "mithril.db").read_bytes() == garbage


def test_daemonized_mount_is_ready_on_return_and_umount_frees_the_store(
    tmp_path: Path, cleanup: list[tuple[Path, Path | None]]
) -> None:
    store, mountpoint, log = tmp_path / "store", tmp_path / "mnt", tmp_path / "daemon.log"
    mountpoint.mkdir()
    cleanup.append((mountpoint, store))
    result = mithrilfs("mount", mountpoint, "--store", store, "--log-file", log)
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)  # at once: no polling
    (mountpoint / "triton" / "f").write_bytes(b"served")
    pid = daemon_pid(store)
    assert pid is not None
    assert pid != os.getpid()

    result = mithrilfs("umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    # umount returned only after the daemon released the store lock.
    assert not store_in_use(store)
    wait_for(lambda: process_gone(pid), 30, f"daemon pid {pid} to exit")
    assert "Traceback" not in log.read_text()
    repo = Repository.open(store, create=False)
    try:
        assert fsck.check(repo.index, repo.content).clean
    finally:
        repo.close()
    assert mithrilfs("fsck", "--store", store).returncode == 0


def test_a_mistyped_command_is_not_taken_for_the_mount_helper_form(tmp_path: Path) -> None:
    """Only 'STORE-PATH MOUNTPOINT [-o ...]' is the form mount(8) uses."""
    result = mithrilfs("moutn", tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'moutn'" in result.stderr
    assert "Traceback" not in result.stderr
