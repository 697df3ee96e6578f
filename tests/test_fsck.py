"""fsck on real stores: each kind of damage is found, named, repaired; the store serves again.

The stores are made through a real mount and unmounted; the damage is done
behind the daemon's back, as a disk, a crash or an operator would do it.
Every case runs the CLI three times: `fsck` (exit 1, names the problem),
`fsck --repair` (exit 0), `fsck` (exit 0); then the store is mounted again
and must serve what survived byte for byte, and take back what was lost
(a compiler rebuilds it after a miss).  The mount fixture ends with a clean
fsck of its own.

Recovery at mount: a daemon killed with SIGKILL leaves the store marked
unclean; the next mount runs the quick check (no re-hashing) and repairs
what it finds, logging each problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mithrilfs.index import SUPER_ROOT
from mithrilfs.store import EMPTY_DIGEST, ContentStore
from tests.conftest import CLI_TIMEOUT, Mount, run_cli

DEVICE_CLASS = "cuda-sm90"

# The store every case starts from (paths from the mount root).  Cache entries:
# triton/KEY1 and triton/KEY2 (directories), inductor/ab/cabc.* (a stem),
# inductor/cd/cdef.py and the lock file (single files).  shared.bin is one
# object referred to twice.
SHARED = b"shared between two kernels\n" * 300
TREE: dict[str, bytes] = {
    "triton/KEY1/add.cubin": bytes(range(256)) * 80,
    "triton/KEY1/add.json": b'{"name": "add", "num_warps": 4}',
    "triton/KEY1/__grp__add.json": b'{"child_paths": {"add.cubin": "", "add.json": ""}}',
    "triton/KEY1/shared.bin": SHARED,
    "triton/KEY2/shared.bin": SHARED,
    "triton/KEY2/mul.ptx": b"// ptx for mul\n" * 100,
    "inductor/ab/cabc.py": b"# generated wrapper\n" * 50,
    "inductor/ab/cabc.so": b"\x7fELF" + bytes(5000),
    "inductor/cd/cdef.py": b"# a kernel of its own\n" * 20,
    "inductor/locks/cabc.lock": b"",
}


mithrilfs = run_cli


def write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for relative, content in tree.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TREE written through a real mount, unmounted and checked; tests damage copies."""
    base = tmp_path_factory.mktemp("template")
    (base / "mnt").mkdir()
    mount = Mount(base / "mnt", base / "store", base / "daemon.log")
    try:
        mount.start("--device-class", DEVICE_CLASS)
        write_tree(mount.mountpoint, TREE)
    finally:
        mount.stop()
    mount.assert_consistent()
    assert "Traceback" not in mount.log_text()
    return mount.store


@pytest.fixture
def store(template_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(template_store, copy)
    return copy


class StoreFiles:
    """Finds a mount path's rows and object file in an unmounted store."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.content = ContentStore(store)
        self.db = sqlite3.connect(store / "mithril.db", isolation_level=None)

    def close(self) -> None:
        self.db.close()

    def inode(self, relative: str) -> int:
        ino = SUPER_ROOT
        for name in [DEVICE_CLASS, *relative.split("/")]:
            row = self.db.execute(
                "SELECT inode FROM entries WHERE parent=? AND name=?", (ino, name.encode())
            ).fetchone()
            assert row is not None, f"{relative}: no entry {name}"
            ino = row[0]
        return ino

    def digest(self, relative: str) -> bytes:
        (digest,) = self.db.execute(
            "SELECT object FROM inodes WHERE id=?", (self.inode(relative),)
        ).fetchone()
        assert isinstance(digest, bytes)
        return digest

    def object_file(self, relative: str) -> Path:
        return self.content.object_path(self.digest(relative))

    def cache_entry(self, relative: str) -> int:
        (entry,) = self.db.execute(
            "SELECT entry FROM inodes WHERE id=?", (self.inode(relative),)
        ).fetchone()
        assert isinstance(entry, int)
        return entry


def flip_a_byte(path: Path) -> None:
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# -- damage: each returns the problem kinds fsck must name and what repair removes --


@dataclass(frozen=True)
class Damage:
    name: str
    inflict: Callable[[StoreFiles], None]
    kinds: frozenset[str]
    removed: tuple[str, ...] = ()  # path prefixes that repair removes (whole cache entries)


def _missing_object(files: StoreFiles) -> None:
    files.object_file("inductor/cd/cdef.py").unlink()


def _corrupt_object(files: StoreFiles) -> None:
    flip_a_byte(files.object_file("triton/KEY1/add.cubin"))


def _corrupt_shared_object(files: StoreFiles) -> None:
    flip_a_byte(files.object_file("triton/KEY1/shared.bin"))


def _orphan_objects(files: StoreFiles) -> None:
    hexname = "abcd" + "5a" * 30
    orphan = files.store / "objects" / "ab" / "cd" / hexname
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash between rename and commit")
    (files.store / "objects" / "zz").mkdir()
    (files.store / "objects" / "zz" / "not-a-digest").write_bytes(b"junk")


def _refcount_too_high(files: StoreFiles) -> None:
    files.db.execute(
        "UPDATE objects SET refcount=7 WHERE hash=?", (files.digest("triton/KEY1/shared.bin"),)
    )


def _refcount_too_low(files: StoreFiles) -> None:
    files.db.execute(
        "UPDATE objects SET refcount=1 WHERE hash=?", (files.digest("triton/KEY1/shared.bin"),)
    )


def _file_row_lost(files: StoreFiles) -> None:
    """The object of a file whose rows are gone: its count says 1, nothing refers to it."""
    ino = files.inode("triton/KEY2/mul.ptx")
    files.db.execute("DELETE FROM entries WHERE inode=?", (ino,))
    files.db.execute("DELETE FROM inodes WHERE id=?", (ino,))


def _object_row_lost(files: StoreFiles) -> None:
    files.db.execute("DELETE FROM objects WHERE hash=?", (files.digest("inductor/ab/cabc.so"),))


def _staging_leftover(files: StoreFiles) -> None:
    (files.store / "staging" / "42.999999.0").write_bytes(b"half a kernel")


def _dangling_entry(files: StoreFiles) -> None:
    files.db.execute(
        "INSERT INTO entries(parent, name, inode) VALUES (?, ?, ?)",
        (files.inode("triton"), b"ghost", 10**6),
    )


def _file_without_cache_entry(files: StoreFiles) -> None:
    files.db.execute(
        "DELETE FROM cache_entries WHERE id=?", (files.cache_entry("triton/KEY2/mul.ptx"),)
    )


def _empty_object_missing(files: StoreFiles) -> None:
    files.content.object_path(EMPTY_DIGEST).unlink()


DAMAGES = [
    Damage("missing-object", _missing_object, frozenset({"objects"}), ("inductor/cd/cdef.py",)),
    Damage("corrupt-object", _corrupt_object, frozenset({"objects"}), ("triton/KEY1/",)),
    Damage(
        "corrupt-shared-object",
        _corrupt_shared_object,
        frozenset({"objects"}),
        ("triton/KEY1/", "triton/KEY2/"),
    ),
    Damage("orphan-objects", _orphan_objects, frozenset({"orphan"})),
    Damage("refcount-too-high", _refcount_too_high, frozenset({"refcount"})),
    Damage("refcount-too-low", _refcount_too_low, frozenset({"refcount"})),
    Damage("file-row-lost", _file_row_lost, frozenset({"refcount"}), ("triton/KEY2/mul.ptx",)),
    Damage(
        "object-row-lost",
        _object_row_lost,
        frozenset({"dangling", "orphan"}),
        ("inductor/ab/cabc.",),
    ),
    Damage("staging-leftover", _staging_leftover, frozenset({"staging"})),
    Damage("dangling-entry", _dangling_entry, frozenset({"tree"})),
    Damage("file-without-cache-entry", _file_without_cache_entry, frozenset({"entries"})),
    Damage("empty-object-missing", _empty_object_missing, frozenset({"objects"})),
]


def problem_kinds(output: str) -> set[str]:
    """The kinds named on "kind: detail" lines of fsck's text output."""
    kinds = set()
    for line in output.splitlines():
        kind, sep, _detail = line.partition(": ")
        if sep and " " not in kind and not kind.startswith("/"):
            kinds.add(kind)
    return kinds


def inflict(store: Path, damage: Callable[[StoreFiles], None]) -> None:
    files = StoreFiles(store)
    try:
        damage(files)
    finally:
        files.close()


def assert_serves(mount: Mount, removed: tuple[str, ...]) -> None:
    """What repair kept is there byte for byte; what it removed is gone and can be rebuilt."""
    lost = {p: c for p, c in TREE.items() if any(p.startswith(r) for r in removed)}
    for relative, content in TREE.items():
        path = mount / relative
        if relative in lost:
            assert not path.exists(), f"{relative} should have been removed"
        else:
            assert path.read_bytes() == content, relative
    for prefix in removed:
        if prefix.endswith("/"):
            assert not (mount / prefix).exists(), f"{prefix} should be gone, whole"
    write_tree(mount.mountpoint, lost)  # the compiler rebuilds after its miss
    for relative, content in lost.items():
        assert (mount / relative).read_bytes() == content


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.name for d in DAMAGES])
def test_fsck_finds_names_and_repairs(damage: Damage, store: Path, make_mount) -> None:
    inflict(store, damage.inflict)

    found = mithrilfs("fsck", "--store", store)
    assert found.returncode == 1, found
    assert problem_kinds(found.stdout) == set(damage.kinds), found.stdout
    assert "problems" in found.stdout.splitlines()[-1]

    repaired = mithrilfs("fsck", "--store", store, "--repair")
    assert repaired.returncode == 0, repaired
    for kind in damage.kinds:
        assert f"repaired {kind}: " in repaired.stdout, repaired.stdout
    assert repaired.stdout.splitlines()[-1].startswith(f"{store}: clean"), repaired.stdout

    again = mithrilfs("fsck", "--store", store)
    assert again.returncode == 0, again
    assert again.stdout.splitlines() == [again.stdout.strip()], "a clean store prints one line"
    assert "clean" in again.stdout

    mount = make_mount("--device-class", DEVICE_CLASS, store=store)
    assert_serves(mount, damage.removed)
    # The mount fixture unmounts and requires a clean fsck.


def test_fsck_json(store: Path, make_mount) -> None:
    inflict(store, _staging_leftover)
    inflict(store, _refcount_too_high)

    found = mithrilfs("fsck", "--store", store, "--json")
    assert found.returncode == 1, found
    report = json.loads(found.stdout)
    assert report["store"] == str(store)
    assert report["clean"] is False
    assert report["found"] == 2
    assert sorted(p["kind"] for p in report["problems"]) == ["refcount", "staging"]
    assert all(p["detail"] for p in report["problems"])
    assert report["repaired"] == []
    assert report["objects_checked"] == 9  # 8 distinct contents and the empty object
    assert report["inodes_checked"] > len(TREE)

    fixed = json.loads(mithrilfs("fsck", "--store", store, "--json", "--repair").stdout)
    assert fixed["clean"] is True
    assert fixed["found"] == 2
    assert sorted(p["kind"] for p in fixed["repaired"]) == ["refcount", "staging"]
    assert fixed["problems"] == []

    clean = mithrilfs("fsck", "--store", store, "--json")
    assert clean.returncode == 0, clean
    assert json.loads(clean.stdout)["clean"] is True
    assert_serves(make_mount("--device-class", DEVICE_CLASS, store=store), ())


def test_quick_fsck_checks_presence_not_content(store: Path) -> None:
    inflict(store, _corrupt_object)
    assert mithrilfs("fsck", "--store", store, "--quick").returncode == 0
    assert mithrilfs("fsck", "--store", store).returncode == 1
    inflict(store, _missing_object)
    quick = mithrilfs("fsck", "--store", store, "--quick")
    assert quick.returncode == 1, quick
    assert problem_kinds(quick.stdout) == {"objects"}
    assert mithrilfs("fsck", "--store", store, "--repair").returncode == 0
    assert mithrilfs("fsck", "--store", store).returncode == 0


# -- progress ----------------------------------------------------------------------------


def run_with_tty_stderr(args: list[str]) -> tuple[int, str, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; return (status, stdout, terminal bytes)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mithrilfs", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    deadline = time.monotonic() + CLI_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        status = proc.wait(timeout=CLI_TIMEOUT)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return status, stdout, seen


def test_fsck_shows_progress_on_a_terminal_only(store: Path) -> None:
    status, stdout, terminal = run_with_tty_stderr(["fsck", "--store", os.fspath(store)])
    assert status == 0, (stdout, terminal)
    assert b"\r" in terminal
    assert b"fsck: checking objects 9/9 (100%)" in terminal, terminal
    assert "clean" in stdout
    assert "\r" not in stdout  # the report itself stays clean for scripts

    piped = mithrilfs("fsck", "--store", store)
    assert piped.returncode == 0
    assert piped.stderr == ""


# -- recovery at mount after an unclean shutdown -------------------------------------------


@pytest.fixture
def killed_mount(make_mount) -> Mount:
    """A mount with TREE in it whose daemon was SIGKILLed (store left marked unclean)."""
    mount: Mount = make_mount("--device-class", DEVICE_CLASS)
    write_tree(mount.mountpoint, TREE)
    # A writer still busy when the daemon dies: its bytes were never sealed.
    busy = open(mount / "triton" / "KEY3.tmp", "wb")  # noqa: SIM115
    busy.write(b"unsealed " * 1000)
    busy.flush()
    assert list((mount.store / "staging").iterdir()), "the busy file should be staged"
    mount.kill()
    with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
        busy.close()
    return mount


def recovery_lines(mount: Mount) -> list[str]:
    return [line for line in mount.log_text().splitlines() if "recover" in line]


def test_mount_after_sigkill_recovers_the_store(killed_mount: Mount) -> None:
    mount = killed_mount
    mount.start()
    log = mount.log_text()
    assert "was not shut down cleanly; checking it (no re-hashing)" in log, log
    lines = recovery_lines(mount)
    assert len(lines) == 1, lines
    assert " WARNING " in lines[0]
    assert "after an unclean shutdown: 1 unfinished writes dropped" in lines[0], lines
    assert "0 problems repaired" in lines[0], lines  # nothing was damaged
    assert not list((mount.store / "staging").iterdir())
    for relative, content in TREE.items():
        assert (mount / relative).read_bytes() == content, relative
    # Created before the kill, its content never sealed: an empty file.
    assert (mount / "triton" / "KEY3.tmp").read_bytes() == b""

    mount.remount()  # a clean shutdown: nothing to recover the next time
    assert recovery_lines(mount) == lines
    assert "not shut down cleanly" not in mount.log_text().split(lines[0])[1]
    mount.stop()
    mount.assert_consistent()


def test_mount_after_sigkill_repairs_damage(killed_mount: Mount) -> None:
    mount = killed_mount
    inflict(mount.store, _missing_object)
    inflict(mount.store, _orphan_objects)
    inflict(mount.store, _refcount_too_high)
    mount.start()
    warnings = [
        line.split(" recovery: ", 1)[1].split(":")[0]
        for line in mount.log_text().splitlines()
        if " WARNING mithrilfs.repository: recovery: " in line
    ]
    assert sorted(warnings) == ["objects", "orphan", "orphan", "refcount"], mount.log_text()
    (summary,) = [line for line in recovery_lines(mount) if "recovered store" in line]
    assert "2 orphan objects removed, 4 problems repaired" in summary, summary
    assert_serves(mount, ("inductor/cd/cdef.py",))
    mount.stop()
    mount.assert_consistent()
