"""Every errno case of the POSIX calls a conformance suite tries, compared with ext4.

chmod, chown, ftruncate, link, mkdir, mkfifo, mknod, open, rename, rmdir,
symlink, truncate, unlink and utimensat, with the kernel's ownership rules:
chown and chgrp (root anything; the owner to a group it is in), setuid and
setgid bits cleared by chown and by an unprivileged write or truncate,
setgid directories (children inherit the group, subdirectories the bit),
sticky directories, UTIME_NOW and UTIME_OMIT with their different
permission rules.

One sequence runs in one interpreter per user and directory: first a setup
as root (nodes owned by root, by the test user and by the test group), then
the calls as root or as the test user (``mtq_a``, a member of ``mtq_g``),
on a native directory (ext4 on the test machine) and on an --allow-other
mount: the shared tree for root, the user's private tree for the user.
Every return value, errno and stat field (type, mode, nlink, uid, gid, size,
rdev, and times that the sequence sets explicitly) must match.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mount
from tests.test_posix_nodes import SCRIPT as NODES_SCRIPT
from tests.test_posix_nodes import as_user, assert_same

USER = "mtq_a"
GROUP = "mtq_g"

# Run as root in argv[1] before the sequence: nodes the caller does not own.
# argv[2], argv[3]: the test user's uid and the test group's gid.
SETUP = r"""
import os, sys
os.chdir(sys.argv[1])
uid, group = int(sys.argv[2]), int(sys.argv[3])
os.umask(0)

def make(path, mode, owner, gid, kind="file"):
    if kind == "dir":
        os.mkdir(path)
    else:
        open(path, "w").close()
    os.chown(path, owner, gid)
    os.chmod(path, mode)

make("theirs", 0o644, 0, 0)
make("theirs_writable", 0o666, 0, 0)
make("their_group", 0o644, uid, 0)
make("their_setuid", 0o6777, 0, 0)
make("their_setuid2", 0o6777, 0, 0)
make("theirdir", 0o755, 0, 0, "dir")
make("closed", 0o700, 0, 0, "dir")
make("closed/f", 0o644, 0, 0)
make("sticky", 0o1777, 0, 0, "dir")
make("sticky/root_file", 0o666, 0, 0)
make("sticky/user_file", 0o644, uid, uid)
make("sticky/root_dir", 0o777, 0, 0, "dir")
make("sgid", 0o2775, uid, group, "dir")
make("foreign_sgid", 0o2777, 0, 0, "dir")
os.chown(".", uid, uid)
"""

# The helpers of test_posix_nodes' sequence (st, step, times), then the calls.
SEQUENCE = (
    NODES_SCRIPT[: NODES_SCRIPT.index('step("mkfifo"')]
    + r"""
import ctypes
uid, group = int(sys.argv[2]), int(sys.argv[3])
me = os.geteuid()
libc = ctypes.CDLL(None, use_errno=True)

def write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)

def make(path, mode, data=b"x"):
    write(path, data)
    os.chmod(path, mode)

def on_fd(path, flags, call):
    fd = os.open(path, flags)
    try:
        return call(fd)
    finally:
        os.close(fd)

NOW, OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100

class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

def utimensat(path, atime, mtime, flags=0):
    # (sec, nsec) or NOW/OMIT; None for the NULL argument (both now).
    def spec(t):
        return Timespec(0, t) if t in (NOW, OMIT) else Timespec(*t)
    arg = None if atime is None else (Timespec * 2)(spec(atime), spec(mtime))
    if libc.utimensat(AT_FDCWD, path.encode(), arg, flags) != 0:
        raise OSError(ctypes.get_errno(), path)

LONG = "n" * 256

# What every call that takes a path answers for a bad one.
def path_errors(name, call):
    for label, path in [("missing", "missing/x"), ("not a dir", "file/x"), ("long", LONG),
                        ("loop", "loop/x")]:
        step(f"{name} {label}", lambda: call(path))
os.symlink("loop", "loop")
os.symlink("file", "link")
make("file", 0o644, b"twelve bytes")
os.mkdir("dir")

# chmod
path_errors("chmod", lambda p: os.chmod(p, 0o644))
step("chmod", lambda: os.chmod("file", 0o640), "file")
step("chmod setuid", lambda: os.chmod("file", 0o4755), "file")
step("chmod sticky file", lambda: os.chmod("file", 0o1644), "file")
step("chmod theirs", lambda: os.chmod("theirs", 0o600), "theirs")
step("chmod unsearchable", lambda: os.chmod("closed/f", 0o600))
step("chmod setgid other group", lambda: os.chmod("their_group", 0o2755), "their_group")
step("chmod setgid own group", lambda: os.chmod("file", 0o2755), "file")
step("chmod through link", lambda: os.chmod("link", 0o600), "file", "link")
step("chmod dir", lambda: os.chmod("dir", 0o3711), "dir")
step("chmod dir back", lambda: os.chmod("dir", 0o755), "dir")

# chown and chgrp
path_errors("chown", lambda p: os.chown(p, me, -1))
make("owned", 0o6755)
step("chown same", lambda: os.chown("owned", me, -1), "owned")
make("owned", 0o6755)
step("chown nothing", lambda: os.chown("owned", -1, -1), "owned")
make("owned", 0o6755)
step("chgrp member", lambda: os.chown("owned", -1, group), "owned")
make("owned", 0o2745)
step("chgrp setgid no group exec", lambda: os.chown("owned", -1, group), "owned")
step("chgrp non-member", lambda: os.chown("owned", -1, 0), "owned")
step("chown other uid", lambda: os.chown("owned", uid + 1, -1), "owned")
step("chown theirs", lambda: os.chown("theirs", -1, group), "theirs")
step("chown unsearchable", lambda: os.chown("closed/f", me, -1))
step("lchown link", lambda: os.chown("link", -1, group, follow_symlinks=False), "link", "file")
os.mkdir("sdir", 0o2755)
step("chgrp setgid dir", lambda: os.chown("sdir", -1, group), "sdir")
step("chown dir to user", lambda: os.chown("sdir", uid, -1), "sdir")

# truncate and ftruncate
path_errors("truncate", lambda p: os.truncate(p, 0))
make("t", 0o6755, b"0123456789")
step("truncate shrink", lambda: os.truncate("t", 4), "t")
make("t", 0o6755, b"0123456789")
step("truncate grow", lambda: os.truncate("t", 40), "t")
step("truncate negative", lambda: os.truncate("t", -1))
step("truncate dir", lambda: os.truncate("dir", 0))
step("truncate theirs", lambda: os.truncate("theirs", 1), "theirs")
step("truncate unsearchable", lambda: os.truncate("closed/f", 0))
step("truncate through link", lambda: os.truncate("link", 3), "file")
make("t", 0o6755, b"0123456789")
step("ftruncate", lambda: on_fd("t", os.O_RDWR, lambda fd: os.ftruncate(fd, 2)), "t")
step("ftruncate read-only", lambda: on_fd("t", os.O_RDONLY, lambda fd: os.ftruncate(fd, 0)))
step("ftruncate negative", lambda: on_fd("t", os.O_RDWR, lambda fd: os.ftruncate(fd, -1)))
step("ftruncate dir", lambda: on_fd("dir", os.O_RDONLY, lambda fd: os.ftruncate(fd, 0)))
step("ftruncate closed", lambda: os.ftruncate(9999, 0))
make("t", 0o6755, b"0123456789")
step("write setuid", lambda: on_fd("t", os.O_WRONLY, lambda fd: os.write(fd, b"ab")), "t")
step("write their setuid",
     lambda: on_fd("their_setuid", os.O_WRONLY, lambda fd: os.write(fd, b"ab")), "their_setuid")
step("truncate their setuid", lambda: os.truncate("their_setuid2", 5), "their_setuid2")

# link
path_errors("link", lambda p: os.link(p, "x"))
path_errors("link to", lambda p: os.link("file", p))
for name, source, target, *shown in [
    ("link", "file", "hard", "file", "hard"),
    ("link existing", "file", "hard"),
    ("link dir", "dir", "dir2"),
    ("link into not a dir", "file", "file/x"),
    ("link into theirdir", "file", "theirdir/x"),
    ("link theirs", "theirs", "their_link"),
    ("link unsearchable", "closed/f", "x"),
    ("link symlink", "link", "link2", "link2"),
]:
    step(name, lambda: os.link(source, target), *shown)

# mkdir
path_errors("mkdir", os.mkdir)
step("mkdir", lambda: os.mkdir("m", 0o777), "m")
step("mkdir sticky", lambda: os.mkdir("m2", 0o1777), "m2")
step("mkdir existing", lambda: os.mkdir("m"))
step("mkdir over file", lambda: os.mkdir("file"))
step("mkdir in theirdir", lambda: os.mkdir("theirdir/m"))
step("mkdir in sgid", lambda: os.mkdir("sgid/m", 0o755), "sgid/m")
step("mkdir in sgid/m", lambda: os.mkdir("sgid/m/m"), "sgid/m/m")
step("mkdir in foreign sgid", lambda: os.mkdir("foreign_sgid/m", 0o755), "foreign_sgid/m")

# mkfifo and mknod
path_errors("mkfifo", os.mkfifo)
path_errors("mknod", lambda p: os.mknod(p, stat.S_IFSOCK | 0o600))
step("mkfifo", lambda: os.mkfifo("f", 0o666), "f")
step("mkfifo existing", lambda: os.mkfifo("f"))
step("mkfifo in theirdir", lambda: os.mkfifo("theirdir/f"))
step("mkfifo in sgid", lambda: os.mkfifo("sgid/f", 0o2775), "sgid/f")
step("mkfifo in foreign sgid", lambda: os.mkfifo("foreign_sgid/f", 0o2775), "foreign_sgid/f")
step("mknod fifo", lambda: os.mknod("nf", stat.S_IFIFO | 0o600), "nf")
step("mknod plain", lambda: os.mknod("nr", 0o600), "nr")
step("mknod chr", lambda: os.mknod("nc", stat.S_IFCHR | 0o600, os.makedev(1, 5)), "nc")
step("mknod sock in sgid", lambda: os.mknod("sgid/s", stat.S_IFSOCK | 0o600), "sgid/s")
step("mknod existing", lambda: os.mknod("nf", stat.S_IFIFO | 0o600))
step("mknod bad type", lambda: os.mknod("nb", 0o170000 | 0o600))
step("mknod in theirdir", lambda: os.mknod("theirdir/n", stat.S_IFIFO | 0o600))

def opened(path, flags, mode=0o644):
    fd = os.open(path, flags, mode)
    os.close(fd)

# open
path_errors("open", lambda p: opened(p, os.O_RDONLY))
path_errors("create", lambda p: opened(p, os.O_CREAT | os.O_WRONLY))
step("create", lambda: opened("o", os.O_CREAT | os.O_WRONLY, 0o4755), "o")
step("create exclusive existing", lambda: opened("o", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
step("open O_DIRECTORY file", lambda: opened("file", os.O_RDONLY | os.O_DIRECTORY))
step("open dir for writing", lambda: opened("dir", os.O_WRONLY))
step("open O_NOFOLLOW link", lambda: opened("link", os.O_RDONLY | os.O_NOFOLLOW))
step("open theirs for writing", lambda: opened("theirs", os.O_WRONLY))
step("open theirs O_TRUNC", lambda: opened("theirs", os.O_RDONLY | os.O_TRUNC), "theirs")
step("create in theirdir", lambda: opened("theirdir/x", os.O_CREAT | os.O_WRONLY))
step("open unsearchable", lambda: opened("closed/f", os.O_RDONLY))
step("create in sgid", lambda: opened("sgid/o", os.O_CREAT | os.O_WRONLY, 0o2755), "sgid/o")
step("create in foreign sgid", lambda: opened("foreign_sgid/o", os.O_CREAT | os.O_WRONLY, 0o2755),
     "foreign_sgid/o")
step("create over dangling", lambda: os.symlink("target", "dangling") or
     opened("dangling", os.O_CREAT | os.O_WRONLY), "target")
step("create exclusive dangling", lambda: opened("dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
step("open fifo writer alone", lambda: opened("f", os.O_WRONLY | os.O_NONBLOCK))
step("open O_TRUNC", lambda: opened("o", os.O_WRONLY | os.O_TRUNC), "o")

# rename
path_errors("rename", lambda p: os.rename(p, "x"))
path_errors("rename to", lambda p: os.rename("file", p))
os.makedirs("full/inner")
os.mkdir("empty")
for name, source, target, *shown in [
    ("rename", "o", "o2", "o2"),
    ("rename dir over file", "empty", "file"),
    ("rename file over dir", "file", "empty"),
    ("rename over non-empty", "empty", "full"),
    ("rename dir into itself", "full", "full/inner/x"),
    ("rename dot", ".", "x"),
    ("rename into theirdir", "o2", "theirdir/x"),
    ("rename sticky theirs", "sticky/root_file", "sticky/moved"),
    ("rename sticky own", "sticky/user_file", "sticky/moved", "sticky/moved"),
    ("rename over sticky theirs", "sticky/moved", "sticky/root_file"),
    ("rename dir over empty", "full/inner", "empty", "empty"),
    ("rename link", "link2", "link3", "link3"),
]:
    step(name, lambda: os.rename(source, target), *shown)

# rmdir
path_errors("rmdir", os.rmdir)
step("rmdir", lambda: os.rmdir("m2"))
step("rmdir non-empty", lambda: os.rmdir("sgid"))
step("rmdir file", lambda: os.rmdir("file"))
step("rmdir dot", lambda: os.rmdir("full/."))
step("rmdir dotdot", lambda: os.rmdir("full/.."))
step("rmdir sticky theirs", lambda: os.rmdir("sticky/root_dir"))
step("rmdir unsearchable", lambda: os.rmdir("closed/x"))
step("rmdir link", lambda: os.rmdir("link"))

# symlink
path_errors("symlink", lambda p: os.symlink("x", p))
step("symlink", lambda: os.symlink("some/where", "s"), "s")
step("symlink existing", lambda: os.symlink("x", "s"))
step("symlink long target", lambda: os.symlink("t" * 4096, "s2"))
step("symlink in theirdir", lambda: os.symlink("x", "theirdir/s"))
step("symlink in sgid", lambda: os.symlink("x", "sgid/l"), "sgid/l")

# unlink
path_errors("unlink", os.unlink)
step("unlink", lambda: os.unlink("hard"), "file")
step("unlink dir", lambda: os.unlink("dir"))
step("unlink theirdir", lambda: os.unlink("theirdir/x"))
step("unlink in theirdir", lambda: os.unlink("closed/f"))
step("unlink sticky theirs", lambda: os.unlink("sticky/root_file"))
step("unlink sticky own", lambda: os.unlink("sticky/moved"))
step("unlink fifo", lambda: os.unlink("f"))

# utimensat
path_errors("utimensat", lambda p: utimensat(p, (1, 0), (2, 0)))
T1, T2 = (1_500_000_000, 123_456_789), (1_400_000_000, 1)
step("utimensat", lambda: utimensat("file", T1, T2), "file")
step("times", lambda: times("file"))
step("utimensat omit atime", lambda: utimensat("file", OMIT, T1))
step("times", lambda: times("file"))
step("utimensat omit both", lambda: utimensat("file", OMIT, OMIT))
step("times", lambda: times("file"))
step("utimensat now, omit", lambda: utimensat("file", OMIT, NOW))
step("atime kept", lambda: times("file")[0])
step("utimensat theirs", lambda: utimensat("theirs", T1, T2))
step("utimensat theirs now", lambda: utimensat("theirs", NOW, NOW))
step("utimensat theirs null", lambda: utimensat("theirs", None, None))
step("utimensat theirs omit", lambda: utimensat("theirs", OMIT, OMIT))
step("utimensat writable now", lambda: utimensat("theirs_writable", NOW, NOW))
step("utimensat writable null", lambda: utimensat("theirs_writable", None, None))
step("utimensat writable one now", lambda: utimensat("theirs_writable", NOW, OMIT))
step("utimensat writable explicit", lambda: utimensat("theirs_writable", T1, T2))
step("utimensat symlink", lambda: utimensat("link3", T2, T1, AT_SYMLINK_NOFOLLOW))
step("times", lambda: times("link3"))
step("utimensat bad nsec", lambda: utimensat("file", (1, 1_000_000_000), T1))
step("utimensat dir", lambda: utimensat("dir", T2, T2), "dir")
step("times", lambda: times("dir"))
print(json.dumps(out))
"""
)


def run_sequence(directory: Path, user: pwd.struct_passwd | None, group: int) -> list[Any]:
    """Set *directory* up as root, then run the sequence there as *user* (None: root)."""
    uid = user.pw_uid if user is not None else 0
    ids = (str(uid), str(group))
    done = as_user(None, "/usr/bin/python3", "-c", SETUP, str(directory), *ids)
    assert done.returncode == 0, done.stderr
    result = as_user(user, "/usr/bin/python3", "-c", SEQUENCE, str(directory), *ids)
    assert result.returncode == 0, result.stderr
    steps: list[Any] = json.loads(result.stdout)
    return steps


@pytest.fixture
def mtq_user() -> Iterator[tuple[pwd.struct_passwd, int]]:
    """An unprivileged user in a supplementary group; both removed afterwards, even on failure."""
    _remove_user()
    try:
        subprocess.run(["groupadd", GROUP], capture_output=True, check=True)
        subprocess.run(
            ["useradd", "-m", "-s", "/bin/sh", "-G", GROUP, USER], capture_output=True, check=True
        )
        yield pwd.getpwnam(USER), grp.getgrnam(GROUP).gr_gid
    finally:
        _remove_user()


def _remove_user() -> None:
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)


@pytest.mark.parametrize("caller", ["root", "user", "user in group"])
def test_errno_cases_match_ext4(
    make_mount, public_dir: Path, mtq_user: tuple[pwd.struct_passwd, int], caller: str
) -> None:
    """As root, as the user, and as the user with the test group as its gid (``sg``)."""
    user, group = mtq_user
    as_root = caller == "root"
    runner = None if as_root else user
    if caller == "user in group":
        runner = pwd.struct_passwd((*user[:3], group, *user[4:]))
    native = public_dir / "native"
    native.mkdir()
    try:
        expected = run_sequence(native, runner, group)
    finally:
        shutil.rmtree(native)
    # The sequence reaches the rules it is about.
    assert ["chgrp member", "ok", None] in expected
    if not as_root:
        assert ["rename sticky theirs", "err", "EPERM"] in expected
    mount: Mount = make_mount("--allow-other", where=public_dir)
    if as_root:
        mounted = mount / "triton" / "work"
        mounted.mkdir()
    else:
        mounted = mount.mountpoint / "users" / USER / "triton" / "work"
        made = as_user(user, "mkdir", str(mounted))
        assert made.returncode == 0, made.stderr
    assert_same(expected, run_sequence(mounted, runner, group))


def test_attribute_changes_move_ctime(mount: Mount) -> None:
    """Each change of an inode's attributes or names sets its ctime to now, UTIME_OMIT none."""
    path = mount / "triton" / "f"
    path.write_bytes(b"content")
    changes = [
        ("chmod", lambda: os.chmod(path, 0o600)),
        ("chown", lambda: os.chown(path, 1234, 5678)),
        ("chown to the same", lambda: os.chown(path, -1, -1)),
        ("utime", lambda: os.utime(path, ns=(1, 2))),
        ("utime now", lambda: os.utime(path)),
        ("truncate", lambda: os.truncate(path, 3)),
        ("link", lambda: os.link(path, path.with_name("g"))),
        ("rename", lambda: os.rename(path.with_name("g"), path.with_name("h"))),
        ("unlink a link", lambda: os.unlink(path.with_name("h"))),
    ]
    for what, change in changes:
        before = os.lstat(path).st_ctime_ns
        change()
        assert os.lstat(path).st_ctime_ns > before, what
    times = os.lstat(path)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.lstat(path).st_mtime_ns == times.st_mtime_ns
