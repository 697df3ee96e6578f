"""FIFOs, sockets and device nodes: metadata-only inodes, compared with ext4.

The differential tests run one scripted sequence of syscalls against a
native directory (ext4 on the test machine) and against the mount, as root
and as an unprivileged user (``mtp_a``, made with useradd and removed
afterwards) on an --allow-other mount, and compare every return value, errno
and stat field (type, mode, nlink, uid, gid, size, rdev, and times where the
sequence sets them).  The other tests show what these nodes are not: cache
content (private trees do not clone them, the shared tier never publishes
them, export leaves them out, eviction takes them with their directory).
Every mount is checked by fsck when the fixture unmounts it.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import socket
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mithrilfs.index import SCHEMA_VERSION
from mithrilfs.repository import INDEX_NAME
from tests.conftest import (
    MOUNT_DEADLINE,
    Mount,
    MountFactory,
    older_version_mount,
    run_cli,
    wait_for,
)
from tests.redis_server import RedisServer
from tests.test_remote import CLASS, entry_keys, manifest, wait_for_stats

USER = "mtp_a"
# The store format before special nodes (format 1): main before this change.
BEFORE_NODES = "b55426f"
COMMAND_TIMEOUT = 60

# One sequence of syscalls, run by a plain interpreter (any user can run it)
# in the directory given as argv[1]; prints one JSON line per step:
# [step, "ok", result] or [step, "err", errno name].
SCRIPT = r"""
import errno, json, os, socket, stat, sys

os.chdir(sys.argv[1])
os.umask(0o022)
root = os.geteuid() == 0
out = []

def st(path):
    s = os.lstat(path)
    fields = [stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_nlink, s.st_uid, s.st_gid]
    fields.append(None if stat.S_ISDIR(s.st_mode) else s.st_size)
    fields.append(s.st_rdev)
    return fields

# Runs *call*; then stats each of *shown* (the paths it concerns) as steps of their own.
def step(name, call, *shown):
    try:
        result = call()
    except OSError as exc:
        out.append([name, "err", errno.errorcode[exc.errno]])
    else:
        out.append([name, "ok", result])
    for path in shown:
        step("stat " + path, lambda: st(path))

def times(path):
    s = os.lstat(path)
    return [s.st_atime_ns, s.st_mtime_ns]

def bind(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    conn, _ = server.accept()
    client.sendall(b"ping")
    got = conn.recv(4)
    for s in (conn, client, server):
        s.close()
    return got.decode()

def fifo_roundtrip(path):
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"through the pipe")
    got = os.read(reader, 100)
    os.close(writer)
    os.close(reader)
    return got.decode()

def listing():
    return sorted(
        [e.name, e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False),
         e.is_symlink(), stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)]
        for e in os.scandir(".")
    )

step("mkfifo", lambda: os.mkfifo("fifo", 0o640))
step("stat fifo", lambda: st("fifo"))
step("mkfifo again", lambda: os.mkfifo("fifo", 0o600))
step("mknod sock", lambda: os.mknod("sock", stat.S_IFSOCK | 0o600))
step("stat sock", lambda: st("sock"))
step("mknod chr", lambda: os.mknod("chr", stat.S_IFCHR | 0o644, os.makedev(1, 3)))
step("stat chr", lambda: st("chr"))
step("mknod blk", lambda: os.mknod("blk", stat.S_IFBLK | 0o600, os.makedev(7, 0)))
step("stat blk", lambda: st("blk"))
step("mknod dir type", lambda: os.mknod("d", stat.S_IFDIR | 0o755))
step("mknod reg", lambda: os.mknod("reg", stat.S_IFREG | 0o600))
step("stat reg", lambda: st("reg"))
step("bind", lambda: bind("bound.sock"))
step("stat bound", lambda: st("bound.sock"))
step("bind again", lambda: bind("bound.sock"))
step("fifo roundtrip", lambda: fifo_roundtrip("fifo"))
step("fifo writer alone", lambda: os.open("fifo", os.O_WRONLY | os.O_NONBLOCK))
step("truncate fifo", lambda: os.truncate("fifo", 0))
step("chmod fifo", lambda: os.chmod("fifo", 0o604))
step("stat fifo", lambda: st("fifo"))
step("chmod sock", lambda: os.chmod("sock", 0o1755))
step("stat sock", lambda: st("sock"))
step("chown fifo own", lambda: os.chown("fifo", os.geteuid(), -1))
step("chown fifo root group", lambda: os.chown("fifo", -1, 0))
step("chown sock away", lambda: os.chown("sock", 4321, 8765))
step("stat fifo", lambda: st("fifo"))
step("stat sock", lambda: st("sock"))
FIFO_TIMES = (1_500_000_000_123_456_789, 1_400_000_000_000_000_001)
step("utime fifo", lambda: os.utime("fifo", ns=FIFO_TIMES))
step("times fifo", lambda: times("fifo"))
SOCK_TIMES = (1_300_000_000_000_000_002, 1_200_000_000_000_000_003)
step("utime sock", lambda: os.utime("sock", ns=SOCK_TIMES))
step("times sock", lambda: times("sock"))
step("mkdir", lambda: os.mkdir("dir", 0o755))
step("rename fifo", lambda: os.rename("fifo", "dir/fifo2"))
step("stat old name", lambda: st("fifo"))
step("stat fifo2", lambda: st("dir/fifo2"))
step("stat dir", lambda: st("dir"))
step("rename sock over dir", lambda: os.rename("sock", "dir"))
step("rename dir over sock", lambda: os.rename("dir", "sock"))
step("write file", lambda: open("file", "w").write("content"))
step("rename file over fifo", lambda: os.rename("file", "dir/fifo2"))
step("stat replaced", lambda: st("dir/fifo2"))
step("rename sock over file", lambda: os.rename("sock", "dir/fifo2"))
step("stat replaced again", lambda: st("dir/fifo2"))
step("rename chr over bound", lambda: os.rename("chr", "bound.sock"))
step("stat bound", lambda: st("bound.sock"))
step("listing", listing)
step("rmdir dir", lambda: os.rmdir("dir"))
step("unlink in dir", lambda: os.unlink("dir/fifo2"))
step("rmdir dir", lambda: os.rmdir("dir"))
step("rmdir fifo", lambda: os.mkfifo("f2") or os.rmdir("f2"))
step("unlink f2", lambda: os.unlink("f2"))
step("unlink blk", lambda: os.unlink("blk"))
step("unlink bound", lambda: os.unlink("bound.sock"))
step("unlink reg", lambda: os.unlink("reg"))
step("unlink missing", lambda: os.unlink("blk"))
step("listing", listing)

# Hard links.
def read(path):
    with open(path) as f:
        return f.read()

def open_unlinked():
    fd = os.open("held", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"held bytes")
    os.link("held", "held2")
    os.unlink("held")
    first = os.fstat(fd).st_nlink
    os.unlink("held2")
    s = os.fstat(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 100).decode()
    os.close(fd)
    return [first, s.st_nlink, data]

step("write a", lambda: open("a", "w").write("shared bytes"))
step("link a b", lambda: os.link("a", "b"), "a", "b")
step("mkdir d2", lambda: os.mkdir("d2"))
step("link a d2/c", lambda: os.link("a", "d2/c"), "d2/c", "d2")
step("link onto existing", lambda: os.link("a", "b"))
step("link a directory", lambda: os.link("d2", "d3"))
step("link missing", lambda: os.link("nothing", "n2"))
step("link into missing dir", lambda: os.link("a", "nodir/x"))
step("append via b", lambda: open("b", "a").write(" and more"))
step("read c", lambda: read("d2/c"))
step("chmod c", lambda: os.chmod("d2/c", 0o600), "a")
step("unlink b", lambda: os.unlink("b"), "a")
step("rename a over its own link", lambda: os.rename("a", "d2/c"), "a", "d2/c")
step("write other", lambda: open("other", "w").write("other"))
step("rename other over c", lambda: os.rename("other", "d2/c"), "a")
step("read a", lambda: read("a"))
step("mkfifo p", lambda: os.mkfifo("p"))
step("link p q", lambda: os.link("p", "q"), "q")
step("rename p to d2/p", lambda: os.rename("p", "d2/p"), "q")
step("unlink q", lambda: os.unlink("q"), "d2/p")
step("open, link, unlink both", open_unlinked)
step("listing", listing)
for name in ("a", "d2/c", "d2/p"):
    step("unlink " + name, lambda: os.unlink(name))
step("rmdir d2", lambda: os.rmdir("d2"))
print(json.dumps(out))
"""


# Extended attributes in the user. namespace, in the same form (and with the
# same helpers, defined again: each script runs alone).
XATTR_SCRIPT = (
    SCRIPT[: SCRIPT.index('step("mkfifo"')]
    + r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)

def small_buffer(call, *args):
    buf = ctypes.create_string_buffer(2)
    if call(*args, buf, 2) < 0:
        raise OSError(ctypes.get_errno(), "")
    return buf.raw

CREATE, REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
open("f", "w").close()
os.mkdir("d")
os.symlink("f", "l")
os.mkfifo("p")
step("set", lambda: os.setxattr("f", "user.a", b"one"))
step("get", lambda: os.getxattr("f", "user.a").decode())
step("set create existing", lambda: os.setxattr("f", "user.a", b"x", CREATE))
step("set replace missing", lambda: os.setxattr("f", "user.b", b"x", REPLACE))
step("set replace", lambda: os.setxattr("f", "user.a", b"two", REPLACE))
step("set create", lambda: os.setxattr("f", "user.b", b"", CREATE))
step("get empty", lambda: os.getxattr("f", "user.b").decode())
step("get missing", lambda: os.getxattr("f", "user.none"))
step("list", lambda: sorted(os.listxattr("f")))
step("get small buffer", lambda: small_buffer(libc.getxattr, b"f", b"user.a"))
step("list small buffer", lambda: small_buffer(libc.listxattr, b"f"))
step("value too big", lambda: os.setxattr("f", "user.big", b"v" * 65537))
step("name too long", lambda: os.setxattr("f", "user." + "n" * 251, b"v"))
step("empty user name", lambda: os.setxattr("f", "user.", b"v"))
step("dir", lambda: os.setxattr("d", "user.d", b"dir value"))
step("list dir", lambda: os.listxattr("d"))
step("symlink", lambda: os.setxattr("l", "user.x", b"v", follow_symlinks=False))
step("list symlink", lambda: os.listxattr("l", follow_symlinks=False))
step("fifo", lambda: os.setxattr("p", "user.x", b"v"))
step("get on fifo", lambda: os.getxattr("p", "user.x"))
step("remove", lambda: os.removexattr("f", "user.a"))
step("remove missing", lambda: os.removexattr("f", "user.a"))
step("list", lambda: sorted(os.listxattr("f")))
step("read-only file", lambda: os.chmod("f", 0o444) or os.setxattr("f", "user.c", b"v"))
step("list", lambda: sorted(os.listxattr("f")))
for name in ("f", "l", "p"):
    os.unlink(name)
os.rmdir("d")
print(json.dumps(out))
"""
)


def run_script(directory: Path, user: pwd.struct_passwd | None, script: str = SCRIPT) -> list[Any]:
    """The sequence's results in *directory*, run as root or as *user*."""
    result = as_user(user, "/usr/bin/python3", "-c", script, str(directory))
    assert result.returncode == 0, result.stderr
    steps: list[Any] = json.loads(result.stdout)
    return steps


def as_user(user: pwd.struct_passwd | None, *command: str) -> subprocess.CompletedProcess[str]:
    """Run *command* as *user* (None: as root), with a plain environment."""
    if user is not None:
        prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        command = (*prefix, "--", *command)
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        timeout=COMMAND_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def assert_same(native: list[Any], mounted: list[Any]) -> None:
    """Every step's outcome matches; the first difference is named."""
    assert len(native) == len(mounted)
    for ours, theirs in zip(mounted, native, strict=True):
        assert ours == theirs, f"step {theirs[0]!r}: ext4 {theirs[1:]}, mount {ours[1:]}"


@pytest.fixture
def mtp_user() -> Iterator[pwd.struct_passwd]:
    """An unprivileged user, removed afterwards even when the test fails."""
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], capture_output=True, check=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)


@pytest.fixture
def open_mount(public_dir: Path, make_mount):
    """make_mount, with the mountpoint where the test user can reach it."""

    def start(*extra_args: str, **options: Any) -> Mount:
        mount: Mount = make_mount(*extra_args, where=public_dir, **options)
        return mount

    return start


def test_node_types_as_root_behave_as_on_ext4(mount: Mount, tmp_path: Path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    mounted = mount / "triton" / "work"
    mounted.mkdir()
    expected = run_script(native, None)
    assert ["mknod chr", "ok", None] in expected  # root makes device nodes
    assert_same(expected, run_script(mounted, None))


def test_node_types_as_a_user_behave_as_on_ext4(
    open_mount, mtp_user: pwd.struct_passwd, public_dir: Path
) -> None:
    mount = open_mount("--allow-other")
    native = public_dir / "native"
    native.mkdir()
    os.chown(native, mtp_user.pw_uid, mtp_user.pw_gid)
    try:
        expected = run_script(native, mtp_user)
    finally:
        shutil.rmtree(native)
    assert ["mknod chr", "err", "EPERM"] in expected  # no CAP_MKNOD
    mounted = mount.mountpoint / "users" / USER / "triton" / "work"
    made = as_user(mtp_user, "mkdir", str(mounted))
    assert made.returncode == 0, made.stderr
    assert_same(expected, run_script(mounted, mtp_user))


def test_device_nodes_keep_rdev_and_are_never_devices(mount: Mount) -> None:
    directory = mount / "triton" / "dev"
    directory.mkdir()
    os.mknod(directory / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(directory / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 42))
    os.mkfifo(directory / "fifo")
    options = next(
        line.split()[3].split(",")
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(mount.mountpoint)
    )
    assert "nodev" in options
    # nodev: the kernel refuses to open a device node on this mount.
    with pytest.raises(PermissionError):
        os.open(directory / "null", os.O_RDONLY)
    mount.remount()
    assert os.lstat(directory / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(directory / "loop").st_mode)
    assert os.lstat(directory / "loop").st_rdev == os.makedev(7, 42)
    assert stat.S_ISFIFO(os.lstat(directory / "fifo").st_mode)
    assert os.lstat(directory / "fifo").st_rdev == 0
    mount.stop()
    db = sqlite3.connect(mount.store / INDEX_NAME)
    try:
        rows = db.execute(
            "SELECT object, entry FROM inodes WHERE (mode & 61440) IN (?, ?, ?)",
            (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO),
        ).fetchall()
    finally:
        db.close()
    assert rows == [(None, None)] * 3  # metadata only: no object, no cache entry


def test_private_trees_do_not_clone_special_nodes(open_mount, mtp_user) -> None:
    mount = open_mount("--allow-other")
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel")
    os.mkfifo(key / "fifo")
    os.mknod(key / "sock", stat.S_IFSOCK | 0o644)
    os.mkfifo(mount / "triton" / "loose-fifo")
    view = mount.mountpoint / "users" / USER / "triton"
    script = f"ls {view}; ls {view}/KEY; test -e {view}/loose-fifo && echo cloned"
    listed = as_user(mtp_user, "sh", "-c", script)
    assert listed.stdout.split() == ["KEY", "k.so"], listed.stderr


def test_export_leaves_special_nodes_out(make_mount, tmp_path: Path) -> None:
    mount = make_mount("--device-class", "cpu-nodes")
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel")
    os.mkfifo(key / "fifo")
    os.mknod(key / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    mount.stop()
    archive = tmp_path / "out.tar.zst"
    result = run_cli("export", "--device-class", "cpu-nodes", "-o", archive, "--store", mount.store)
    assert result.returncode == 0, result.stderr
    unpacked = subprocess.run(
        ["tar", "--zstd", "-tf", str(archive)], capture_output=True, text=True, check=True
    )
    names = unpacked.stdout.split()
    assert any(name.endswith("triton/KEY/k.so") for name in names), names
    assert not any(name.endswith(("fifo", "null")) for name in names), names


def test_eviction_takes_special_nodes_with_their_directory(mount: Mount) -> None:
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel")
    os.mkfifo(key / "fifo")
    os.mknod(key / "sock", stat.S_IFSOCK | 0o600)
    other = mount / "triton" / "OTHER"
    other.mkdir()
    os.mkfifo(other / "alone")  # no file: no cache entry, so nothing evicts it
    result = run_cli("evict", mount.mountpoint, "--path", "triton/*")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not key.exists(), MOUNT_DEADLINE, "the evicted entry to vanish")
    assert stat.S_ISFIFO(os.lstat(other / "alone").st_mode)
    assert sorted(os.listdir(mount / "triton")) == ["OTHER"]


def test_a_store_of_the_previous_format_takes_special_nodes(tmp_path: Path, make_mount) -> None:
    store = tmp_path / "m-store"
    with older_version_mount(BEFORE_NODES, store, tmp_path) as mountpoint:
        (mountpoint / "triton" / "KEY").mkdir()
        (mountpoint / "triton" / "KEY" / "k.so").write_bytes(b"old kernel")
        (mountpoint / "triton" / "link").symlink_to("KEY")
        with pytest.raises(PermissionError):
            os.mkfifo(mountpoint / "triton" / "fifo")  # format 1 refused them
    db = sqlite3.connect(store / INDEX_NAME)
    try:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (1,)
    finally:
        db.close()
    mount = make_mount(store=store)
    assert (mount / "triton" / "KEY" / "k.so").read_bytes() == b"old kernel"
    assert os.readlink(mount / "triton" / "link") == "KEY"
    assert os.lstat(mount / "triton" / "KEY" / "k.so").st_rdev == 0
    os.mknod(mount / "triton" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert os.lstat(mount / "triton" / "null").st_rdev == os.makedev(1, 3)
    mount.stop()  # the fixture's fsck checks the migrated store
    db = sqlite3.connect(store / INDEX_NAME)
    try:
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    finally:
        db.close()
    assert version == (SCHEMA_VERSION,)


def test_a_bound_socket_on_the_mount_serves(mount: Mount) -> None:
    """What a tool that keeps its socket beside its data does (bind, connect, unlink)."""
    directory = mount / "triton" / "run"
    directory.mkdir()
    os.chdir(directory)  # AF_UNIX paths are short; the mount's path may not be
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind("d.sock")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
                client.sendto(b"hello", "d.sock")
                assert server.recv(5) == b"hello"
        assert stat.S_ISSOCK(os.lstat("d.sock").st_mode)
        os.unlink("d.sock")
    finally:
        os.chdir("/")
    assert os.listdir(directory) == []


def test_the_shared_tier_never_publishes_special_nodes(tmp_path: Path, make_mount) -> None:
    """remote.py's manifests take regular files and directories only (and no symlinks)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        a = make_mount("--device-class", CLASS, "--remote", server.url, name="a")
        key = a / "triton" / "KEY"
        key.mkdir()
        os.mkfifo(key / "fifo")
        os.mknod(key / "sock", stat.S_IFSOCK | 0o644)
        (key / "k.so").write_bytes(b"kernel")
        (key / "__grp__k.json").write_bytes(b"{}")
        code = a / "inductor" / "xy"
        code.mkdir(parents=True)
        (code / "cxyz.so").write_bytes(b"library")
        os.mkfifo(code / "cxyz.fifo")  # same stem: would be in the stem entry
        os.mkfifo(a / "inductor" / "xy" / "lone.fifo")
        os.rename(a / "inductor" / "xy" / "lone.fifo", a / "inductor" / "xy" / "moved.fifo")
        wait_for_stats(a, lambda s: s["remote"]["published"] >= 2, "publishing")
        a.stop()
        client = server.client()
        assert entry_keys(client) == {"triton/KEY", "inductor/xy/cxyz"}
        assert sorted(f["path"] for f in manifest(client, "triton/KEY")["files"]) == [
            "__grp__k.json",
            "k.so",
        ]
        assert manifest(client, "triton/KEY")["dirs"] == []
        assert [f["path"] for f in manifest(client, "inductor/xy/cxyz")["files"]] == ["cxyz.so"]
        b = make_mount("--device-class", CLASS, "--remote", server.url, name="b")
        assert sorted(os.listdir(b / "triton" / "KEY")) == ["__grp__k.json", "k.so"]
    finally:
        server.kill()


# -- hard links -------------------------------------------------------------------------


def test_link_counts_names_and_changes_ctime(mount: Mount) -> None:
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel")
    os.utime(key / "k.so", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = os.lstat(key / "k.so")
    os.link(key / "k.so", mount / "triton" / "alias.so")
    after = os.lstat(key / "k.so")
    assert after.st_nlink == 2
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == before.st_mtime_ns  # a new name is no change of content
    assert os.lstat(mount / "triton" / "alias.so").st_ino == after.st_ino
    mount.remount()
    assert os.lstat(mount / "triton" / "alias.so").st_nlink == 2
    assert (mount / "triton" / "alias.so").read_bytes() == b"kernel"
    os.unlink(key / "k.so")
    assert os.lstat(mount / "triton" / "alias.so").st_nlink == 1


def test_links_across_trees_are_refused(open_mount, mtp_user: pwd.struct_passwd) -> None:
    mount = open_mount("--allow-other")
    shared = mount / "triton" / "shared.so"
    shared.write_bytes(b"trusted")
    private = mount.mountpoint / "users" / USER / "triton"
    made = as_user(
        mtp_user,
        "sh",
        "-c",
        f"echo mine > {private}/mine.so && ln {private}/mine.so {private}/again.so && "
        f"ln {private}/mine.so {mount.mountpoint}/triton/planted.so",
    )
    assert made.returncode != 0
    assert "Permission denied" in made.stderr  # an untrusted user writes no shared name
    assert os.lstat(private / "mine.so").st_nlink == 2
    exdev = rf"^\[Errno {errno.EXDEV}\] "
    with pytest.raises(OSError, match=exdev):
        os.link(shared, private / "from-shared.so")
    with pytest.raises(OSError, match=exdev):
        os.link(private / "mine.so", mount / "triton" / "from-private.so")
    assert not (mount / "triton" / "from-private.so").exists()
    assert os.lstat(shared).st_nlink == 1


def test_evicting_an_entry_removes_its_names_only(mount: Mount) -> None:
    """Whole-entry eviction takes the entry's names; another name keeps the inode and content."""
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel bytes")
    (key / "__grp__k.json").write_bytes(b"{}")
    elsewhere = mount / "inductor" / "kept.so"
    os.link(key / "k.so", elsewhere)
    os.link(key / "k.so", key / "k2.so")  # two names in the evicted entry
    result = run_cli("evict", mount.mountpoint, "--path", "triton/*")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not key.exists(), MOUNT_DEADLINE, "the evicted entry to vanish")
    assert elsewhere.read_bytes() == b"kernel bytes"
    assert os.lstat(elsewhere).st_nlink == 1
    # The surviving name is an entry of its own now: evicting it frees the content.
    mount.remount()
    result = run_cli("evict", mount.mountpoint, "--path", "inductor/kept.so")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not elsewhere.exists(), MOUNT_DEADLINE, "the last name to vanish")
    mount.stop()
    db = sqlite3.connect(mount.store / INDEX_NAME)
    try:
        objects = db.execute("SELECT count(*) FROM objects WHERE size > 0").fetchone()[0]
    finally:
        db.close()
    assert objects == 0  # the kernel went with its last name (the group file with KEY)


def test_fsck_counts_names_per_inode(mount: Mount) -> None:
    (mount / "triton" / "f").write_bytes(b"x")
    os.link(mount / "triton" / "f", mount / "triton" / "g")
    mount.stop()
    assert mount.check_store().clean
    db = sqlite3.connect(mount.store / INDEX_NAME)
    try:
        with db:
            db.execute("UPDATE inodes SET nlink=1 WHERE nlink=2 AND (mode & 61440) = 32768")
    finally:
        db.close()
    report = mount.check_store()
    assert [p.kind for p in report.problems] == ["nlink"]
    result = run_cli("fsck", "--store", mount.store, "--repair")
    assert result.returncode == 0, result.stderr
    assert mount.check_store().clean


def test_extended_attributes_are_off_by_default(mount: Mount) -> None:
    """Without --xattrs: EOPNOTSUPP, answered by the kernel after its first ask."""
    path = mount / "triton" / "f"
    path.write_bytes(b"x")
    not_supported = rf"^\[Errno {errno.EOPNOTSUPP}\] "
    for _ in range(2):
        with pytest.raises(OSError, match=not_supported):
            os.setxattr(path, "user.origin", b"cc")
        with pytest.raises(OSError, match=not_supported):
            os.getxattr(path, "user.origin")
        with pytest.raises(OSError, match=not_supported):
            os.listxattr(path)
    assert path.read_bytes() == b"x"


# -- extended attributes (--xattrs) ------------------------------------------------------


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "user"])
def test_user_xattrs_behave_as_on_ext4(
    open_mount, mtp_user: pwd.struct_passwd, public_dir: Path, as_root: bool
) -> None:
    user = None if as_root else mtp_user
    mount = open_mount("--allow-other", "--xattrs")
    native = public_dir / "native"
    native.mkdir()
    os.chown(native, mtp_user.pw_uid, mtp_user.pw_gid)
    try:
        expected = run_script(native, user, XATTR_SCRIPT)
    finally:
        shutil.rmtree(native)
    assert ["get", "ok", "one"] in expected
    mounted = mount.mountpoint / "users" / USER / "triton" / "work"
    made = as_user(mtp_user, "mkdir", str(mounted))
    assert made.returncode == 0, made.stderr
    assert_same(expected, run_script(mounted, user, XATTR_SCRIPT))


def test_xattrs_persist_and_other_namespaces_are_refused(mount_with_xattrs: Mount) -> None:
    mount = mount_with_xattrs
    path = mount / "triton" / "f"
    path.write_bytes(b"x")
    before = os.lstat(path).st_ctime_ns
    os.setxattr(path, "user.origin", b"cc")
    assert os.lstat(path).st_ctime_ns > before  # an attribute change is a change of the inode
    not_supported = rf"^\[Errno {errno.EOPNOTSUPP}\] "
    for name in ("trusted.x", "security.x", "system.x"):
        with pytest.raises(OSError, match=not_supported):
            os.setxattr(path, name, b"v")
        with pytest.raises(OSError, match=not_supported):
            os.getxattr(path, name)
    for acl in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError, match=not_supported):
            os.getxattr(path, acl)
    for n in range(16):  # 64 KiB of names and values per inode at most
        os.setxattr(path, f"user.{n:02}", b"v" * 4000)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] "):
        os.setxattr(path, "user.16", b"v" * 4000)
    mount.remount("--xattrs")
    assert os.getxattr(path, "user.origin") == b"cc"
    assert "user.origin" in os.listxattr(path)
    os.unlink(path)  # its attributes go with the inode: the fixture's fsck checks
    mount.stop()
    db = sqlite3.connect(mount.store / INDEX_NAME)
    try:
        assert db.execute("SELECT count(*) FROM xattrs").fetchone() == (0,)
    finally:
        db.close()


@pytest.fixture
def mount_with_xattrs(make_mount: MountFactory) -> Mount:
    return make_mount("--xattrs")


def test_clones_keep_links_within_an_entry_and_xattrs(open_mount, mtp_user) -> None:
    """A whole-entry clone keeps two names of one inode as one inode, and user. attributes.

    A name outside the entry is cloned at its own lookup: a file of its own.
    """
    mount = open_mount("--allow-other", "--xattrs")
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"kernel")
    os.setxattr(key / "k.so", "user.origin", b"triton")
    os.link(key / "k.so", key / "k2.so")
    os.link(key / "k.so", mount / "triton" / "alias.so")
    os.mkfifo(key / "fifo")
    view = mount.mountpoint / "users" / USER / "triton"
    script = (
        "import json, os, sys; v = sys.argv[1]; "
        "s = [os.lstat(f'{v}/{n}') for n in ('KEY/k.so', 'KEY/k2.so', 'alias.so')]; "
        "print(json.dumps([sorted(os.listdir(f'{v}/KEY')), [x.st_nlink for x in s], "
        "s[0].st_ino == s[1].st_ino, s[0].st_ino == s[2].st_ino, s[0].st_uid, "
        "os.getxattr(f'{v}/KEY/k2.so', 'user.origin').decode(), "
        "open(f'{v}/KEY/k2.so').read()]))"
    )
    seen = as_user(mtp_user, "/usr/bin/python3", "-c", script, str(view))
    assert seen.returncode == 0, seen.stderr
    assert json.loads(seen.stdout) == [
        ["k.so", "k2.so"],
        [2, 2, 1],
        True,
        False,
        mtp_user.pw_uid,
        "triton",
        "kernel",
    ]
    # The user's copies are the user's: unlinking one name leaves the other.
    os.unlink(view / "KEY" / "k.so")
    assert os.lstat(view / "KEY" / "k2.so").st_nlink == 1
    assert os.lstat(key / "k.so").st_nlink == 3  # the shared inode is untouched
