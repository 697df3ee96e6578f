"""Model-based test: random operation sequences give the same results on a mount as on ext4.

A hypothesis state machine applies each operation to a directory in the mount
and to a native directory side by side, and requires the same outcome from
both: the same return value (bytes read, bytes written) or the same errno.
After every step the two trees must agree on every name, type, permission
bits, link count, size, content, symlink target and user. extended
attribute.  A handful of names is reused on purpose, so that creates
collide, renames replace files and directories, hard links tie names
together (and across cache entries), FIFOs take names files and
directories wanted, and operations hit paths that are missing or of the
wrong type.  Every open is O_NONBLOCK (nothing for a file, and a FIFO then
never waits for its other end); the mount runs with --xattrs.

Each example works in a fresh directory under one of the layouts (a Triton
key, an inductor code-cache section, an FX graph entry, the mount root), so
that renames move files between cache entries.  One mount serves the whole
run; at the end it is remounted, every tree is compared again, and fsck must
find the store clean.

Runs are derandomized (the same examples each time); set
MITHRILFS_MODEL_RANDOM=1 to explore new ones (hypothesis then prints a
reproduction blob for a failure).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import stat
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mithrilfs.mounts import find_mount
from tests.conftest import Mount

RANDOM = os.environ.get("MITHRILFS_MODEL_RANDOM") == "1"
SETTINGS = settings(
    max_examples=int(os.environ.get("MITHRILFS_MODEL_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("MITHRILFS_MODEL_STEPS", "50")),
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# A few names at two levels: collisions are the point.  Stems shared by
# ".py" and ".so" make inductor code-cache entries of several files.
PATHS = ["a", "b.py", "b.so", "d", "e", "d/a", "d/b.so", "d/e", "e/a", "d/e/a"]
paths = st.sampled_from(PATHS)
FILE_MODES = st.sampled_from([0o644, 0o600, 0o755, 0o400, 0o700])
DIR_MODES = st.sampled_from([0o755, 0o700, 0o500, 0o775])
SYMLINK_TARGETS = st.sampled_from(["a", "d", "../a", "e/a", "missing"])
OPEN_FLAGS = st.sampled_from(
    [
        os.O_RDONLY,
        os.O_RDWR,
        os.O_WRONLY,
        os.O_RDWR | os.O_CREAT,
        os.O_RDWR | os.O_TRUNC,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        os.O_RDWR | os.O_CREAT | os.O_EXCL,
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        os.O_RDWR | os.O_APPEND,
    ]
)
OFFSETS = st.one_of(st.integers(0, 300), st.integers(0, 200_000))
SIZES = st.one_of(st.integers(0, 300), st.integers(0, 400_000))
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MAX_HANDLES = 3
XATTR_NAMES = st.sampled_from(["user.a", "user.b"])
XATTR_FLAGS = st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])

# The layouts an example's directory may sit in ({n}: the example number).
LAYOUTS = ["triton/model{n}", "inductor/{n:02x}", "inductor/fxgraph/model{n}", "model{n}"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src)


def data_for(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


Outcome = tuple[str, Any]


def outcome(action: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", action())
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno))


def snapshot(root: str) -> dict[str, tuple[Any, ...]]:
    """Every name under *root*: type, permission bits, link count, size, content or target."""
    found: dict[str, tuple[Any, ...]] = {}

    def visit(directory: str, prefix: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            relative = prefix + name
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            if stat.S_ISDIR(st_.st_mode):
                found[relative] = ("dir", stat.S_IMODE(st_.st_mode), st_.st_nlink)
                visit(path, relative + "/")
            elif stat.S_ISLNK(st_.st_mode):
                found[relative] = ("symlink", st_.st_size, os.readlink(path))
            else:
                content = b"" if stat.S_ISFIFO(st_.st_mode) else Path(path).read_bytes()
                found[relative] = (
                    kind,
                    stat.S_IMODE(st_.st_mode),
                    st_.st_nlink,
                    st_.st_size,
                    len(content),
                    content,
                    user_xattrs(path),
                )

    visit(root, "")
    return found


def user_xattrs(path: str) -> list[tuple[str, bytes]]:
    # Only user.: a native directory may carry security. names of its own.
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def _short(record: tuple[Any, ...] | None) -> object:
    if record is None:
        return None
    return tuple(f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 32 else v for v in record)


def describe_difference(native: dict[str, Any], mounted: dict[str, Any]) -> str:
    return "\n".join(
        f"{name}: native {_short(native.get(name))}, mount {_short(mounted.get(name))}"
        for name in sorted(native.keys() | mounted.keys())
        if native.get(name) != mounted.get(name)
    )


class FilesystemModel(RuleBasedStateMachine):
    """The native directory is the model; the mount must behave the same."""

    mount_root: Path
    native_root: Path
    examples = 0
    outcomes: Counter[tuple[str, str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.roots: tuple[str, str] = ("", "")
        # slot -> (native fd, mount fd, path, flags)
        self.handles: dict[int, tuple[int, int, str, int]] = {}
        self.next_slot = 0
        self.steps: list[str] = []

    # -- running one operation on both sides ------------------------------------

    def both(self, what: str, action: Callable[[str], Any]) -> Outcome:
        """Run *action* with each root; the outcomes must match."""
        self.steps.append(what)
        native = outcome(lambda: action(self.roots[0]))
        mounted = outcome(lambda: action(self.roots[1]))
        assert mounted == native, f"{what}: native {native}, mount {mounted}"
        self.count(what, native)
        return native

    @classmethod
    def count(cls, what: str, result: Outcome) -> None:
        cls.outcomes[what.split()[0], "ok" if result[0] == "ok" else str(result[1])] += 1

    def on_handle(self, what: str, index: int, action: Callable[[int], Any]) -> Outcome:
        slot = sorted(self.handles)[index % len(self.handles)]
        native_fd, mount_fd, path, _flags = self.handles[slot]
        what = f"{what} on handle {slot} ({path})"
        self.steps.append(what)
        native = outcome(lambda: action(native_fd))
        mounted = outcome(lambda: action(mount_fd))
        assert mounted == native, f"{what}: native {native}, mount {mounted}"
        self.count(what, native)
        return native

    # -- setup ----------------------------------------------------------------

    @initialize(layout=st.sampled_from(LAYOUTS))
    def choose_directory(self, layout: str) -> None:
        FilesystemModel.examples += 1
        relative = layout.format(n=FilesystemModel.examples)
        self.roots = (str(self.native_root / relative), str(self.mount_root / relative))
        for root in self.roots:
            os.makedirs(root)
        # Start from a populated tree, so that most operations meet something.
        for directory in ("d", "e", "d/e"):
            self.both(f"mkdir {directory}", lambda root, d=directory: os.mkdir(Path(root, d)))  # type: ignore[misc]
        for seed, name in enumerate(("a", "b.py", "d/a", "e/a")):
            data = data_for(seed * 1000, seed)
            self.both(f"write {name}", lambda root, n=name, b=data: Path(root, n).write_bytes(b))  # type: ignore[misc]

    def teardown(self) -> None:
        for native_fd, mount_fd, _path, _flags in self.handles.values():
            os.close(native_fd)
            os.close(mount_fd)
        self.handles.clear()

    # -- names ------------------------------------------------------------------

    @rule(path=paths, mode=FILE_MODES)
    def create(self, path: str, mode: int) -> None:
        def create(root: str) -> None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK
            os.close(os.open(os.path.join(root, path), flags, mode))

        self.both(f"create {path} {mode:o}", create)

    @rule(path=paths, mode=DIR_MODES)
    def mkdir(self, path: str, mode: int) -> None:
        self.both(f"mkdir {path} {mode:o}", lambda root: os.mkdir(os.path.join(root, path), mode))

    @rule(path=paths, mode=FILE_MODES)
    def mkfifo(self, path: str, mode: int) -> None:
        self.both(f"mkfifo {path} {mode:o}", lambda root: os.mkfifo(os.path.join(root, path), mode))

    @rule(path=paths, name=XATTR_NAMES, seed=st.integers(0, 2**16), flags=XATTR_FLAGS)
    def setxattr(self, path: str, name: str, seed: int, flags: int) -> None:
        value = data_for(seed % 64, seed)
        self.both(
            f"setxattr {path} {name} flags={flags}",
            lambda root: os.setxattr(os.path.join(root, path), name, value, flags),
        )

    @rule(path=paths, name=XATTR_NAMES)
    def removexattr(self, path: str, name: str) -> None:
        self.both(
            f"removexattr {path} {name}",
            lambda root: os.removexattr(os.path.join(root, path), name),
        )

    @rule(path=paths, name=XATTR_NAMES, seed=st.integers(0, 2**16))
    def set_then_remove_xattr(self, path: str, name: str, seed: int) -> None:
        # Random paths and names rarely meet an attribute that is there: this
        # gives removexattr its successful case whenever the set succeeds.
        self.setxattr(path, name, seed, 0)
        self.removexattr(path, name)

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(f"rmdir {path}", lambda root: os.rmdir(os.path.join(root, path)))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(f"unlink {path}", lambda root: os.unlink(os.path.join(root, path)))

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: str, dst: str, flags: int) -> None:
        def rename(root: str) -> None:
            renameat2(os.path.join(root, src), os.path.join(root, dst), flags)

        self.both(f"rename {src} {dst} flags={flags}", rename)

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(
            f"link {src} {dst}",
            lambda root: os.link(os.path.join(root, src), os.path.join(root, dst)),
        )

    @rule(path=paths, link_target=SYMLINK_TARGETS)
    def symlink(self, path: str, link_target: str) -> None:
        self.both(
            f"symlink {path} -> {link_target}",
            lambda root: os.symlink(link_target, os.path.join(root, path)),
        )

    @rule(path=paths, mode=st.one_of(FILE_MODES, DIR_MODES))
    def chmod(self, path: str, mode: int) -> None:
        self.both(f"chmod {path} {mode:o}", lambda root: os.chmod(os.path.join(root, path), mode))

    @rule(path=paths, size=SIZES)
    def truncate(self, path: str, size: int) -> None:
        self.both(
            f"truncate {path} {size}", lambda root: os.truncate(os.path.join(root, path), size)
        )

    @rule(path=paths, offset=OFFSETS, size=SIZES, seed=st.integers(0, 2**16))
    def write_by_path(self, path: str, offset: int, size: int, seed: int) -> None:
        """Open (no create), write at an offset, close."""
        data = data_for(size, seed)

        def write(root: str) -> int:
            fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_NONBLOCK)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self.both(f"write {path} @{offset} {size} bytes", write)

    @rule(path=paths)
    def read_by_path(self, path: str) -> None:
        def read(root: str) -> bytes:
            fd = os.open(os.path.join(root, path), os.O_RDONLY | os.O_NONBLOCK)
            try:
                return b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            finally:
                os.close(fd)

        self.both(f"read {path}", read)

    @rule(path=paths)
    def list_directory(self, path: str) -> None:
        self.both(f"listdir {path}", lambda root: sorted(os.listdir(os.path.join(root, path))))

    # -- open handles -------------------------------------------------------------

    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(path=paths, flags=OPEN_FLAGS, mode=FILE_MODES)
    def open(self, path: str, flags: int, mode: int) -> None:
        self.open_handle(path, flags, mode)

    @precondition(lambda self: len(self.handles) < MAX_HANDLES)
    @rule(path=st.sampled_from(["a", "b.so", "d/b.so"]), truncate=st.booleans())
    def open_for_writing(self, path: str, truncate: bool) -> None:
        """What the linker does: a read-write handle on a file it will write in place."""
        self.open_handle(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o755)

    def open_handle(self, path: str, flags: int, mode: int) -> None:
        fds: list[int] = []

        def open_(root: str) -> None:
            fds.append(os.open(os.path.join(root, path), flags | os.O_NONBLOCK, mode))

        result = self.both(f"open {path} flags={flags:o}", open_)
        if result[0] == "ok":
            self.handles[self.next_slot] = (fds[0], fds[1], path, flags)
            self.next_slot += 1
        else:
            for fd in fds:
                os.close(fd)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES), offset=OFFSETS, size=SIZES, seed=st.integers(0, 2**16))
    def write(self, index: int, offset: int, size: int, seed: int) -> None:
        data = data_for(size, seed)
        self.on_handle(
            f"pwrite @{offset} {size} bytes", index, lambda fd: os.pwrite(fd, data, offset)
        )

    @precondition(lambda self: self.handles)
    @rule(
        index=st.integers(0, MAX_HANDLES),
        position=st.integers(0, 200_000),
        size=st.integers(1, 70_000),
        seed=st.integers(0, 2**16),
    )
    def write_through_mmap(self, index: int, position: int, size: int, seed: int) -> None:
        """A shared writable mapping, as some linkers write their output."""
        data = data_for(size, seed)

        def write(fd: int) -> object:
            length = os.fstat(fd).st_size
            if length == 0:
                return "empty file"
            with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                start = position % length
                chunk = data[: length - start]
                m[start : start + len(chunk)] = chunk
                return len(chunk)

        self.on_handle(f"mmap-write @{position} {size} bytes", index, write)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES), size=SIZES, seed=st.integers(0, 2**16))
    def write_sequentially(self, index: int, size: int, seed: int) -> None:
        """write(2) at the handle's position (the end, with O_APPEND)."""
        data = data_for(size, seed)
        self.on_handle(f"write {size} bytes", index, lambda fd: os.write(fd, data))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES), offset=OFFSETS, size=st.integers(0, 500_000))
    def read(self, index: int, offset: int, size: int) -> None:
        def pread(fd: int) -> bytes:
            # The kernel splits big reads; read to the end of the asked range.
            chunks, position = [], offset
            while position < offset + size:
                chunk = os.pread(fd, offset + size - position, position)
                if not chunk:
                    break
                chunks.append(chunk)
                position += len(chunk)
            return b"".join(chunks)

        self.on_handle(f"pread @{offset} {size}", index, pread)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES), size=SIZES)
    def ftruncate(self, index: int, size: int) -> None:
        self.on_handle(f"ftruncate {size}", index, lambda fd: os.ftruncate(fd, size))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES))
    def fsync(self, index: int) -> None:
        self.on_handle("fsync", index, os.fsync)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES))
    def fstat_size(self, index: int) -> None:
        self.on_handle("fstat", index, lambda fd: os.fstat(fd).st_size)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES))
    def close(self, index: int) -> None:
        slot = sorted(self.handles)[index % len(self.handles)]
        native_fd, mount_fd, path, _flags = self.handles.pop(slot)
        self.steps.append(f"close handle {slot} ({path})")
        native = outcome(lambda: os.close(native_fd))
        mounted = outcome(lambda: os.close(mount_fd))
        assert mounted == native, f"close {path}: native {native}, mount {mounted}"

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, MAX_HANDLES), truncate=st.booleans())
    def reopen(self, index: int, truncate: bool) -> None:
        """Close a handle and open its path again, with or without O_TRUNC."""
        slot = sorted(self.handles)[index % len(self.handles)]
        native_fd, mount_fd, path, flags = self.handles.pop(slot)
        flags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | (os.O_TRUNC if truncate else 0)
        os.close(native_fd)
        os.close(mount_fd)
        fds: list[int] = []

        def open_(root: str) -> None:
            fds.append(os.open(os.path.join(root, path), flags | os.O_NONBLOCK))

        result = self.both(f"reopen {path} flags={flags:o}", open_)
        if result[0] == "ok":
            self.handles[slot] = (fds[0], fds[1], path, flags)
        else:
            for fd in fds:
                os.close(fd)

    # -- after every step -----------------------------------------------------------

    @invariant()
    def trees_agree(self) -> None:
        if not self.roots[0]:
            return
        native, mounted = snapshot(self.roots[0]), snapshot(self.roots[1])
        assert mounted == native, (
            "trees differ after: "
            + "; ".join(self.steps[-5:])
            + "\n"
            + describe_difference(native, mounted)
        )


def test_mount_behaves_like_a_native_directory(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "mnt", tmp_path / "store", tmp_path / "daemon.log")
    mount.mountpoint.mkdir()
    native = tmp_path / "native"
    for layout in ("triton", "inductor/fxgraph"):
        (native / layout).mkdir(parents=True)
    old_umask = os.umask(0o022)
    try:
        mount.start("--xattrs")
        (mount / "inductor" / "fxgraph").mkdir()
        FilesystemModel.mount_root = mount.mountpoint
        FilesystemModel.native_root = native
        FilesystemModel.examples = 0
        FilesystemModel.outcomes.clear()
        run_state_machine_as_test(FilesystemModel, settings=SETTINGS)
        outcomes = FilesystemModel.outcomes
        print(
            f"\nmodel: {FilesystemModel.examples} examples, {sum(outcomes.values())} operations "
            f"compared ({sum(n for (_op, r), n in outcomes.items() if r == 'ok')} succeeded): "
            + ", ".join(f"{op} {r} {n}" for (op, r), n in sorted(outcomes.items()))
        )
        for made in ("link", "mkfifo", "setxattr", "removexattr"):
            assert outcomes[made, "ok"] > 0, f"no {made} succeeded: the rule tests nothing"
        # Everything every example left behind survives a remount exactly.
        before = snapshot(str(native))
        mount.remount("--xattrs")
        after = snapshot(str(mount.mountpoint))
        del after["inductor/fxgraph"], after["inductor"], after["triton"]
        del after["users"]  # the private trees' directory (docs/security.md)
        for layout in ("inductor/fxgraph", "inductor", "triton"):
            del before[layout]
        assert after == before, describe_difference(before, after)
    finally:
        os.umask(old_umask)
        try:
            mount.stop()
        finally:
            if find_mount(mount.mountpoint) is not None:
                subprocess.run(["fusermount3", "-uz", str(mount.mountpoint)], check=False)
    mount.assert_consistent()
    assert "Traceback" not in mount.log_text(), mount.log_text()
