"""Who may see what: a private store, owners and modes from the caller, and
the kernel enforcing them (default_permissions) for a real second user."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

NOBODY = 65534


pytestmark = pytest.mark.usefixtures("traversable_tmp")


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run *command* as an unprivileged user (uid/gid 65534, no groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *command],
        capture_output=True,
        text=True,
        check=False,
    )


def test_store_is_private_to_the_daemon_user(mount) -> None:
    (mount / "triton" / "f").write_bytes(b"x" * 100)
    mount.stop()
    store = mount.store
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    for name in ("mithril.db", "lock", "mithrilfs.log"):
        path = store / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, name
    for dirpath, dirnames, filenames in os.walk(store / "objects"):
        for name in dirnames:
            assert stat.S_IMODE(Path(dirpath, name).stat().st_mode) == 0o700
        for name in filenames:
            assert stat.S_IMODE(Path(dirpath, name).stat().st_mode) & 0o077 == 0


def test_files_carry_the_creators_ids_and_mode(make_mount) -> None:
    """In a user's own tree files carry the creator's ids and mode; the shared
    tree refuses an untrusted user even where its mode would let them in."""
    mount = make_mount("--allow-other")
    own = mount / "users" / pwd.getpwuid(NOBODY).pw_name / "triton"
    result = as_nobody("sh", "-c", f"umask 027 && echo hi > {own}/mine && mkdir {own}/d")
    assert result.returncode == 0, result.stderr
    mine = (own / "mine").stat()
    assert (mine.st_uid, mine.st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(mine.st_mode) == 0o640
    assert stat.S_IMODE((own / "d").stat().st_mode) == 0o750
    shared = mount / "triton" / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    refused = as_nobody("sh", "-c", f"echo hi > {shared}/mine")
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    assert not (shared / "mine").exists()
    mount.remount()
    assert (own / "mine").stat().st_uid == NOBODY


def test_allow_other_still_enforces_modes(make_mount) -> None:
    mount = make_mount("--allow-other")
    secret = mount / "triton" / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    public = mount / "triton" / "public"
    public.write_bytes(b"anyone may read")
    public.chmod(0o644)

    assert as_nobody("cat", str(public)).stdout == "anyone may read"
    denied = as_nobody("cat", str(secret))
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    # Nor may it replace the file (the directory is root's, mode 0755) ...
    replace = as_nobody("mv", "-f", str(public), str(secret))
    assert replace.returncode != 0
    assert "Permission denied" in replace.stderr
    overwrite = as_nobody("sh", "-c", f"echo evil > {public}")
    assert overwrite.returncode != 0
    assert secret.read_bytes() == b"root only"
    assert public.read_bytes() == b"anyone may read"


def test_without_allow_other_other_users_see_nothing(mount) -> None:
    (mount / "triton" / "f").write_bytes(b"x")
    os.chmod(mount.mountpoint / "triton", 0o755)
    result = as_nobody("ls", str(mount / "triton"))
    assert result.returncode != 0
    assert "Permission denied" in result.stderr


@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_chmod_is_kept_and_enforced(make_mount, mode: int) -> None:
    mount = make_mount("--allow-other")
    directory = mount / "triton" / "d"
    directory.mkdir()
    (directory / "f").write_bytes(b"data")
    directory.chmod(mode)
    result = as_nobody("cat", str(directory / "f"))
    assert (result.returncode == 0) == bool(mode & 0o005)
