"""mithrilfs through mount(8), fstab and the systemd unit in docs/.

mount(8) runs ``mount.fuse3``, which runs ``/bin/sh -c 'mithrilfs STORE MP -o
OPTS'``.  util-linux removes PATH from a helper's environment, so the shell
searches its default path, not the caller's: the fixture below links this
checkout's ``mithrilfs`` into /usr/local/sbin (first on that path) for the
test and removes the link afterwards.  Each test unmounts with plain
umount(8), waits for the daemon to release the store, and requires a clean
fsck; whatever happens, nothing stays mounted and no daemon stays alive.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mithrilfs import doctor, fsck
from mithrilfs.index import SUPER_ROOT
from mithrilfs.mounts import FSTYPE, find_mount
from mithrilfs.repository import Repository, holder_pid, store_in_use
from tests.conftest import wait_for

VENV_BIN = Path(sys.executable).parent
HELPER_LINK = Path("/usr/local/sbin/mithrilfs")
UNIT = Path(__file__).parent.parent / "docs" / "mithrilfs.service"
OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"
RELEASE_DEADLINE = 30.0
CLASS = "cpu-test"


@pytest.fixture(scope="module")
def system_helper() -> Iterator[None]:
    """Make 'mithrilfs' on /bin/sh's default PATH this checkout's, for mount(8)."""
    ours = VENV_BIN / "mithrilfs"
    found = shutil.which("mithrilfs", path=doctor.HELPER_PATH)
    if found is not None and os.path.realpath(found) == os.path.realpath(ours):
        yield
        return
    if HELPER_LINK.exists() or HELPER_LINK.is_symlink():
        pytest.fail(f"{HELPER_LINK} exists and is not this checkout's mithrilfs")
    HELPER_LINK.symlink_to(ours)
    try:
        yield
    finally:
        HELPER_LINK.unlink()


def helper_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=helper_env(),
        check=False,
        timeout=120,
    )


def store_released(store: Path) -> bool:
    return not store_in_use(store)


def force_cleanup(mountpoint: Path, store: Path) -> None:
    """Detach the mount and kill its daemon: by the pid in the store's lock, and only
    if that process really is a mithrilfs daemon of this store."""
    if find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)
    pid = holder_pid(store)
    if pid is None:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if any(b"mithrilfs" in part for part in cmdline) and os.fsencode(store) in cmdline:
        os.kill(pid, signal.SIGKILL)


def assert_unmounted_cleanly(mountpoint: Path, store: Path) -> None:
    wait_for(lambda: store_released(store), RELEASE_DEADLINE, "the daemon to release the store")
    assert find_mount(mountpoint) is None
    repo = Repository.open(store, create=False)
    try:
        report = fsck.check(repo.index, repo.content)
        assert report.clean, [f"{p.kind}: {p.detail}" for p in report.problems]
        assert repo.index.get_meta("clean_shutdown") == 1, "the daemon did not close cleanly"
        # The mount served the class named in the options, and kept what was written.
        root = repo.index.lookup(SUPER_ROOT, CLASS.encode())
        assert root is not None
        triton = repo.index.lookup(root.id, b"triton")
        assert triton is not None
        written = repo.index.lookup(triton.id, b"probe.json")
        assert written is not None
        assert written.size == len(b'{"ok": true}')
    finally:
        repo.close()


def use_mount(mountpoint: Path, store: Path) -> None:
    """The helper returned: the mount must already serve requests (no waiting)."""
    entry = find_mount(mountpoint)
    assert entry is not None, "mount(8) returned before the mount was there"
    assert entry.fstype == FSTYPE
    assert entry.source == str(store)
    (mountpoint / "triton" / "probe.json").write_bytes(b'{"ok": true}')
    assert sorted(os.listdir(mountpoint)) == ["inductor", "triton", "users"]


def mount_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not in /proc/self/mounts")


def test_mount_t_fuse_mithrilfs_then_umount(tmp_path: Path, system_helper: None) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = run(
            "mount", "-t", "fuse.mithrilfs", store, mountpoint, "-o",
            f"allow_other,device_class={CLASS}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        use_mount(mountpoint, store)
        assert "allow_other" in mount_options(mountpoint)
        result = run("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert_unmounted_cleanly(mountpoint, store)
    finally:
        force_cleanup(mountpoint, store)


def test_fstab_line_then_umount(tmp_path: Path, system_helper: None) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a comment\n{documented_fstab_line(store, mountpoint)}\n")
    try:
        result = run("mount", "--fstab", fstab, mountpoint)
        assert result.returncode == 0, result.stderr
        use_mount(mountpoint, store)
        result = run("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert_unmounted_cleanly(mountpoint, store)
    finally:
        force_cleanup(mountpoint, store)


def documented_fstab_line(store: Path, mountpoint: Path) -> str:
    """The fstab line docs/operations.md recommends, with this test's paths and class."""
    prefix = "/var/lib/mithril  /var/cache/mithril  fuse.mithrilfs  "
    line = next(line for line in OPERATIONS.read_text().splitlines() if prefix in line).strip()
    assert "_netdev" in line
    assert "x-systemd." in line
    return (
        line.replace("/var/lib/mithril", str(store))
        .replace("/var/cache/mithril", str(mountpoint))
        .replace("device_class=auto", f"device_class={CLASS}")
    )


def test_unknown_mount_option_is_refused(tmp_path: Path, system_helper: None) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = run("mount", "-t", "fuse.mithrilfs", store, mountpoint, "-o", "bogus=1")
        assert result.returncode != 0
        assert "unknown or malformed mount option 'bogus=1'" in result.stderr
        assert find_mount(mountpoint) is None
    finally:
        force_cleanup(mountpoint, store)


# -- the systemd unit ------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def unit_command(line: str, replacements: dict[str, str]) -> list[str]:
    words = shlex.split(line)
    return [replacements.get(word, word) for word in words]


def test_systemd_unit_commands_work_as_forking_service(tmp_path: Path) -> None:
    service = unit()
    assert service["Service"]["Type"] == "forking"
    assert "Before" in service["Unit"]
    assert service["Install"]["WantedBy"] == "multi-user.target"
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    replacements = {
        "/usr/local/bin/mithrilfs": str(VENV_BIN / "mithrilfs"),
        "/var/cache/mithril": str(mountpoint),
        "/var/lib/mithril": str(store),
        "auto": CLASS,
    }
    if shutil.which("systemd-analyze"):
        # The unit as shipped, with its paths pointed at this checkout.
        text = UNIT.read_text()
        for old, new in replacements.items():
            text = text.replace(f"{old} ", f"{new} ").replace(f"{old}\n", f"{new}\n")
        local = tmp_path / "mithrilfs.service"
        local.write_text(text)
        verify = run("systemd-analyze", "verify", local)
        assert "mithrilfs.service" not in verify.stderr, verify.stderr
    try:
        # Type=forking: ExecStart returns only once the mount serves requests.
        start = run(*unit_command(service["Service"]["ExecStart"], replacements))
        assert start.returncode == 0, start.stderr
        use_mount(mountpoint, store)
        assert "allow_other" in mount_options(mountpoint)
        stop = run(*unit_command(service["Service"]["ExecStop"], replacements))
        assert stop.returncode == 0, stop.stderr
        assert_unmounted_cleanly(mountpoint, store)
    finally:
        force_cleanup(mountpoint, store)
