"""Crash consistency: SIGKILL the daemon at random moments; nothing that was closed is lost.

The main test runs many kill cycles.  In each one, writer processes publish
Triton-style entries (files into a ``tmp.pid_*`` directory, ``os.replace``
into the key directory, the group file last), inductor-style files
(``.<pid>.<tid>.tmp`` then rename) and linker-style in-place files (random
writes, truncates, read-back, fsync, rename, unlink, open-unlinked), while
readers check what they read.  After a random delay the daemon gets SIGKILL
and nothing else: no fusermount, so the mountpoint is left stale
("Transport endpoint is not connected").  The next mount, alternately the
daemonizing CLI and the foreground form, must clear the stale mount and
recover on its own; then every name in the tree is checked against the
writers' journals, and after a clean unmount fsck must find nothing.

The journals live outside the mount.  Every operation is recorded before it
starts (its effects: which names take which content) and again when it
returns, each with a CLOCK_MONOTONIC timestamp (one clock for all
processes).  After a kill, a name may hold the value of any operation on it
unless a durable operation that returned definitely followed it (started
after it returned); an operation that never returned may or may not have
happened.  A truncation by O_TRUNC is durable only once its file is closed.
That rules out, for every name:
  - losing a file whose close() (or fsync(), or rename) returned, unless a
    later journaled rename or unlink replaced it;
  - bytes that no writer ever wrote under that name or renamed into it (a
    half-written file, another file's bytes, a mix), and a name nobody
    created.  A file that was created but never closed may be empty.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs.mounts import find_mount, is_stale
from mithrilfs.repository import holder_pid
from mithrilfs.store import ContentStore
from tests.conftest import Mount, run_cli, wait_for

fork = multiprocessing.get_context("fork")

CYCLES = int(os.environ.get("MITHRILFS_CRASH_CYCLES", "20"))
SEED = int(os.environ.get("MITHRILFS_CRASH_SEED", str(random.randrange(2**32))))
# How long after every worker has started the daemon is killed (seconds).
KILL_DELAY = (0.02, 0.8)
DEADLINE = 30.0

DIR = "dir"
ABSENT = None
Value = str | None  # a content digest, DIR, or ABSENT

TRITON_KEYS = [f"KEY{k}" for k in range(4)]
TRITON_FILES = ["k.source", "k.ttir", "k.cubin", "k.json"]
INDUCTOR_KEYS = [f"f{k}" for k in range(3)]
INDUCTOR_NAMES = ["graph", "graph.meta"]
OWN_NAMES = [f"f{n}" for n in range(4)]
# Sizes cover the empty file, small files, and files hashed off the trio
# thread (above 256 KiB), where a seal awaits.
PAYLOAD_SIZES = [0, 100, 3000, 40_000, 300_000, 900_000]
PAYLOAD_WEIGHTS = [2, 6, 6, 4, 2, 1]
IN_PLACE_LIMIT = 700_000


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


EMPTY = digest(b"")


def make_content(dst: str, wid: int, seq: int, size: int, rng: random.Random) -> bytes:
    """Bytes that say which name they were written for and carry their own checksum."""
    body = json.dumps({"dst": dst, "w": wid, "s": seq}).encode() + b"\n" + rng.randbytes(size)
    return body + digest(body).encode()


def content_problem(data: bytes, dst: str) -> str | None:
    """Why *data* is not a complete content written for *dst* (None when it is)."""
    body, tail = data[:-64], data[-64:]
    if len(data) < 64 or digest(body).encode() != tail:
        return f"{dst}: {len(data)} bytes that fail their own checksum (torn or mixed)"
    header = json.loads(body.split(b"\n", 1)[0])
    if header["dst"] != dst:
        return f"{dst}: holds the bytes written for {header['dst']}"
    return None


# -- the writer and reader processes -----------------------------------------------


class Journal:
    """Append-only record of operations, outside the mount, synced as it goes."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.next_id = 0

    def record(self, entry: dict[str, Any], sync: bool = False) -> None:
        os.write(self.fd, json.dumps(entry).encode() + b"\n")
        if sync:
            os.fdatasync(self.fd)

    def begin(self, what: str, *effects: tuple[str, Value], durable: bool = True) -> int:
        """Journal an operation and its effects before it starts; returns its id.

        A *durable* operation is one whose effects must survive a crash once it
        returns; the others (a truncation by O_TRUNC on an existing file) are
        durable only once the file is closed, and end() is called then.
        """
        self.next_id += 1
        entry = {"id": self.next_id, "what": what, "fx": effects, "t0": time.monotonic_ns()}
        if not durable:
            entry["weak"] = True
        self.record(entry)
        return self.next_id

    def end(self, op_id: int) -> None:
        self.record({"id": op_id, "t1": time.monotonic_ns()}, sync=True)

    @contextlib.contextmanager
    def op(self, what: str, *effects: tuple[str, Value]) -> Iterator[None]:
        """A durable operation; it counts as done only if the body returns."""
        op_id = self.begin(what, *effects)
        yield
        self.end(op_id)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Worker:
    def __init__(self, kind: str, wid: int, seed: int, root: Path, journal: Path) -> None:
        self.kind = kind
        self.wid = wid
        self.rng = random.Random(seed)
        self.root = root
        self.journal = Journal(journal)
        self.op = self.journal.op
        self.seq = 0
        self.counts: Counter[str] = Counter()
        self.own_dir = f"inductor/own{wid}"
        self.own: dict[str, bytes] = {}  # the in-place writer's view of its own files

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def payload(self, dst: str) -> bytes:
        self.seq += 1
        size = self.rng.choices(PAYLOAD_SIZES, PAYLOAD_WEIGHTS)[0]
        return make_content(dst, self.wid, self.seq, size, self.rng)

    def open_new(self, relative: str, flags: int) -> tuple[int, int | None]:
        """Open *relative* with O_CREAT and *flags*, journaling what that does to its content.

        Creating the file is durable at once.  Truncating an existing one
        (O_TRUNC) is a change like a write: durable when the file is closed, so
        its op is returned, to be ended then.
        """
        existed = os.path.lexists(self.path(relative))
        truncating = existed and flags & os.O_TRUNC
        op_id = None
        if truncating:
            op_id = self.journal.begin("open", (relative, EMPTY), durable=False)
        elif not existed:
            op_id = self.journal.begin("create", (relative, EMPTY))
        fd = os.open(self.path(relative), os.O_CREAT | flags, 0o644)
        if op_id is not None and not truncating:
            self.journal.end(op_id)
            op_id = None
        return fd, op_id

    def close(self, fd: int, relative: str, content: bytes, truncation: int | None) -> None:
        with self.op("close", (relative, digest(content))):
            os.close(fd)
        if truncation is not None:
            self.journal.end(truncation)
        self.counts["closes"] += 1

    def write_file(self, relative: str, data: bytes, flags: int) -> None:
        """Create (or truncate) *relative* and write *data*; sealed when close() returns."""
        fd, truncation = self.open_new(relative, os.O_WRONLY | flags)
        try:
            write_all(fd, data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self.close(fd, relative, data, truncation)

    # Triton: FileCacheManager.put for every file of a key, the group file last.
    def triton_step(self) -> None:
        key_dir = f"triton/{self.rng.choice(TRITON_KEYS)}"
        with self.op("makedirs", (key_dir, DIR)):
            os.makedirs(self.path(key_dir), exist_ok=True)
        children = {}
        for name in TRITON_FILES:
            self.triton_put(key_dir, name, self.payload(f"{key_dir}/{name}"))
            children[name] = self.path(f"{key_dir}/{name}")
        self.seq += 1
        pad = "x" * self.rng.randrange(300)
        group = json.dumps({"child_paths": children, "w": self.wid, "s": self.seq, "pad": pad})
        self.triton_put(key_dir, "__grp__k.json", group.encode())
        self.counts["triton_groups"] += 1

    def triton_put(self, key_dir: str, name: str, data: bytes) -> None:
        tmp_dir = f"{key_dir}/tmp.pid_{os.getpid()}_{uuid.uuid4()}"
        tmp, dst = f"{tmp_dir}/{name}", f"{key_dir}/{name}"
        with self.op("mkdir", (tmp_dir, DIR)):
            os.mkdir(self.path(tmp_dir))
        self.write_file(tmp, data, os.O_EXCL)
        with self.op("replace", (tmp, ABSENT), (dst, digest(data))):
            os.replace(self.path(tmp), self.path(dst))
        with self.op("rmdir", (tmp_dir, ABSENT)):
            os.rmdir(self.path(tmp_dir))
        self.counts["renames"] += 1

    # Inductor: write_atomic writes ".<pid>.<tid>.tmp" beside the target, then renames.
    def inductor_step(self) -> None:
        key_dir = f"inductor/fx/{self.rng.choice(INDUCTOR_KEYS)}"
        with self.op("makedirs", ("inductor/fx", DIR), (key_dir, DIR)):
            os.makedirs(self.path(key_dir), exist_ok=True)
        dst = f"{key_dir}/{self.rng.choice(INDUCTOR_NAMES)}"
        if self.rng.random() < 0.1:
            with self.op("unlink", (dst, ABSENT)), contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(dst))
            self.counts["unlinks"] += 1
            return
        tmp = f"{key_dir}/.{os.getpid()}.{threading.get_ident()}.tmp"
        data = self.payload(dst)
        self.write_file(tmp, data, os.O_TRUNC)
        with self.op("rename", (tmp, ABSENT), (dst, digest(data))):
            os.rename(self.path(tmp), self.path(dst))
        self.counts["renames"] += 1

    # The linker: a file written in place, by offsets, read back before close.
    def in_place_start(self) -> None:
        with self.op("makedirs", (self.own_dir, DIR)):
            os.makedirs(self.path(self.own_dir), exist_ok=True)
        for name in OWN_NAMES:
            relative = f"{self.own_dir}/{name}"
            with contextlib.suppress(FileNotFoundError):
                self.own[relative] = Path(self.path(relative)).read_bytes()

    def in_place_step(self) -> None:
        relative = f"{self.own_dir}/{self.rng.choice(OWN_NAMES)}"
        choice = self.rng.random()
        if choice < 0.6:
            self.in_place_session(relative)
        elif choice < 0.75 and relative in self.own:
            target = f"{self.own_dir}/{self.rng.choice(OWN_NAMES)}"
            if target != relative:
                with self.op("rename", (relative, ABSENT), (target, digest(self.own[relative]))):
                    os.rename(self.path(relative), self.path(target))
                self.own[target] = self.own.pop(relative)
                self.counts["renames"] += 1
        elif choice < 0.85 and relative in self.own:
            with self.op("unlink", (relative, ABSENT)):
                os.unlink(self.path(relative))
            del self.own[relative]
            self.counts["unlinks"] += 1
        elif choice < 0.95:
            self.unlinked_while_open()
        elif relative in self.own:
            os.chmod(self.path(relative), self.rng.choice([0o644, 0o755, 0o600]))

    def in_place_session(self, relative: str) -> None:
        old = self.own.get(relative)
        truncate = self.rng.random() < 0.3
        fd, truncation = self.open_new(relative, os.O_RDWR | (os.O_TRUNC if truncate else 0))
        content = bytearray(b"" if old is None or truncate else old)
        try:
            for _ in range(self.rng.randint(1, 6)):
                choice = self.rng.random()
                if choice < 0.65:
                    data = self.rng.randbytes(self.rng.choice([1, 100, 4096, 70_000, 300_000]))
                    offset = self.rng.randrange(len(content) + 4096)
                    if offset + len(data) > IN_PLACE_LIMIT:
                        offset = 0
                    os.pwrite(fd, data, offset)
                    if offset > len(content):
                        content.extend(bytes(offset - len(content)))
                    content[offset : offset + len(data)] = data
                elif choice < 0.8:
                    size = self.rng.randrange(len(content) + 5000)
                    os.ftruncate(fd, size)
                    del content[size:]
                    content.extend(bytes(size - len(content)))
                elif choice < 0.9:
                    with self.op("fsync", (relative, digest(bytes(content)))):
                        os.fsync(fd)
                    self.counts["fsyncs"] += 1
                else:
                    self.check_read_back(fd, content, relative)
            self.check_read_back(fd, content, relative)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self.close(fd, relative, bytes(content), truncation)
        self.own[relative] = bytes(content)

    def unlinked_while_open(self) -> None:
        relative = f"{self.own_dir}/scratch"
        # A scratch file left by an earlier crash keeps its bytes until this
        # truncation is closed, and this one is never closed under its name.
        fd, _truncation = self.open_new(relative, os.O_RDWR | os.O_TRUNC)
        try:
            with self.op("unlink", (relative, ABSENT)):
                os.unlink(self.path(relative))
            data = self.rng.randbytes(self.rng.choice([10_000, 400_000]))
            os.pwrite(fd, data, 0)
            if self.rng.random() < 0.5:
                os.fsync(fd)
            self.check_read_back(fd, data, relative)
        finally:
            os.close(fd)
        self.counts["unlinked_open"] += 1

    def check_read_back(self, fd: int, expected: bytes | bytearray, relative: str) -> None:
        got = read_all(fd)
        if got != expected:
            raise AssertionError(
                f"{relative}: read back {len(got)} bytes, not the {len(expected)} written"
            )
        self.counts["read_backs"] += 1

    # Readers: what Triton and inductor do on a hit.
    def reader_step(self) -> None:
        triton = self.path("triton")
        for key in os.listdir(triton):
            group_path = os.path.join(triton, key, "__grp__k.json")
            try:
                with open(group_path, "rb") as f:
                    group = json.loads(f.read())
            except FileNotFoundError:
                continue
            for name, child in group["child_paths"].items():
                # Children are published before their group and never removed.
                with open(child, "rb") as f:
                    problem = content_problem(f.read(), f"triton/{key}/{name}")
                if problem:
                    raise AssertionError(f"reader: {problem}")
                self.counts["reads"] += 1
        for key in INDUCTOR_KEYS:
            for name in INDUCTOR_NAMES:
                relative = f"inductor/fx/{key}/{name}"
                try:
                    data = Path(self.path(relative)).read_bytes()
                except FileNotFoundError:
                    continue  # unlinked by a writer, or not yet written
                problem = content_problem(data, relative)
                if problem:
                    raise AssertionError(f"reader: {problem}")
                self.counts["reads"] += 1
        for dirpath, _dirs, files in os.walk(self.path("inductor")):
            for name in files:
                # In-place files change under the reader: only the read itself is checked.
                with contextlib.suppress(FileNotFoundError):
                    Path(dirpath, name).read_bytes()
                    self.counts["reads"] += 1

    def run(self, deadline: float) -> None:
        if self.kind == "in_place":
            self.in_place_start()
        step = getattr(self, f"{self.kind}_step")
        self.journal.record({"started": self.kind}, sync=True)
        while time.monotonic() < deadline:
            step()


def daemon_gone(root: Path) -> bool:
    try:
        os.statvfs(root)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def worker_main(kind: str, wid: int, seed: int, root: Path, journal: Path) -> None:
    """A forked writer or reader: runs until the daemon dies under it."""
    code = 0
    worker = None
    try:
        worker = Worker(kind, wid, seed, root, journal)
        worker.run(time.monotonic() + DEADLINE)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED) and not daemon_gone(root):
            code = 1
            if worker is not None:
                worker.journal.record({"error": f"{kind} {wid}: {traceback.format_exc()}"}, True)
    except BaseException:
        code = 1
        if worker is not None:
            worker.journal.record({"error": f"{kind} {wid}: {traceback.format_exc()}"}, True)
    finally:
        if worker is not None:
            worker.journal.record({"counts": dict(worker.counts)}, sync=True)
        os._exit(code)


WORKERS = [("triton", 3), ("inductor", 2), ("in_place", 2), ("reader", 2)]


# -- the daemon, started both ways and killed like a crash -----------------------


mithrilfs = run_cli


def process_gone(pid: int) -> bool:
    """True once *pid* has exited (an unreaped zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def serving(mountpoint: Path) -> bool:
    try:
        os.statvfs(mountpoint)
    except OSError:
        return False
    return os.path.ismount(mountpoint)


def clear_leftover_mount(mountpoint: Path) -> None:
    """Teardown: detach whatever is still mounted at *mountpoint*, stale or not."""
    if find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-uz", os.fspath(mountpoint)], check=False)


def kill_pid(pid: int | None) -> None:
    if pid is None or process_gone(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def restart(mount: Mount) -> None:
    """Mount.start(), then wait until the new daemon really serves.

    After a crash, Mount.start() alone returns at once: os.path.ismount() is
    True on the stale mount, since lstat of its root is answered from the
    kernel's attribute cache.  statvfs always reaches the daemon.
    """
    mount.start()
    proc = mount.proc
    assert proc is not None
    wait_for(
        lambda: serving(mount.mountpoint),
        DEADLINE,
        f"{mount.mountpoint} to serve",
        alive=lambda: proc.poll() is None,
    )


def crash(mount: Mount) -> None:
    """SIGKILL the daemon and nothing else (no fusermount): its mount is left stale."""
    proc, mount.proc = mount.proc, None
    assert proc is not None
    proc.kill()
    proc.wait()
    assert find_mount(mount.mountpoint) is not None
    assert is_stale(mount.mountpoint)


@pytest.fixture
def crashable(make_mount, tmp_path: Path) -> Iterator[Any]:
    """make_mount, plus a teardown that clears the stale mounts a failed test may leave."""
    yield make_mount
    for mountpoint in tmp_path.glob("*-mnt"):
        if find_mount(mountpoint) is not None and is_stale(mountpoint):
            clear_leftover_mount(mountpoint)


class Daemon:
    """One store at one mountpoint, mounted in the foreground (Mount) or by the daemonizing CLI."""

    def __init__(self, tmp_path: Path) -> None:
        self.mount = Mount(tmp_path / "mnt", tmp_path / "store", tmp_path / "daemon.log")
        self.mount.mountpoint.mkdir()
        self.root = self.mount.mountpoint
        self.pid: int | None = None
        self.stale_cleared = 0

    def start(self, daemonized: bool) -> None:
        was_stale = find_mount(self.root) is not None and is_stale(self.root)
        if daemonized:
            result = mithrilfs(
                "mount", self.root, "--store", self.mount.store, "--log-file", self.mount.log
            )
            assert result.returncode == 0, result.stderr
            assert os.path.ismount(self.root)  # ready when the command returns
            self.pid = holder_pid(self.mount.store)
            assert self.pid is not None
            wait_for(lambda: serving(self.root), DEADLINE, f"{self.root} to serve")
        else:
            restart(self.mount)
            assert self.mount.proc is not None
            self.pid = self.mount.proc.pid
        # The stale mount was detached, not hidden under the new one.
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        assert len([line for line in mountinfo if f" {self.root} " in line]) == 1
        self.stale_cleared += was_stale

    def kill(self) -> None:
        """SIGKILL and nothing else: the mount is left stale, as after an OOM kill."""
        pid, self.pid = self.pid, None
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        proc, self.mount.proc = self.mount.proc, None
        if proc is not None:
            proc.wait()
        wait_for(lambda: process_gone(pid), DEADLINE, f"killed daemon {pid} to exit")
        # The leader can be a zombie while its other threads still exit and
        # hold /dev/fuse open; the connection drops when the last one is gone.
        wait_for(lambda: is_stale(self.root), DEADLINE, "the killed daemon's mount to be stale")
        assert find_mount(self.root) is not None

    def stop(self) -> None:
        """Unmount cleanly and wait for the daemon to close the store."""
        if self.mount.proc is not None:
            self.mount.stop()
        else:
            pid = self.pid
            result = mithrilfs("umount", self.root)
            assert result.returncode == 0, result.stderr
            if pid is not None:
                wait_for(lambda: process_gone(pid), DEADLINE, f"daemon {pid} to exit")
        self.pid = None

    def cleanup(self) -> None:
        kill_pid(self.pid)
        if self.mount.proc is not None:
            self.mount.proc.kill()
            self.mount.proc.wait()
            self.mount.proc = None
        clear_leftover_mount(self.root)


# -- checking a tree against the journals ----------------------------------------


@dataclass
class Op:
    what: str
    effects: list[tuple[str, Value]]
    t0: int
    t1: int | None = None  # None: never returned (in flight at the kill)
    durable: bool = True  # False: its effects could still be undone when it returned


@dataclass
class CycleJournal:
    ops: list[Op] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    started: int = 0


def read_journals(paths: list[Path]) -> CycleJournal:
    result = CycleJournal()
    for path in paths:
        ops: dict[int, Op] = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "t0" in entry:
                ops[entry["id"]] = Op(
                    entry["what"],
                    [tuple(fx) for fx in entry["fx"]],
                    entry["t0"],
                    durable=not entry.get("weak"),
                )
            elif "t1" in entry:
                ops[entry["id"]].t1 = entry["t1"]
            elif "error" in entry:
                result.errors.append(entry["error"])
            elif "counts" in entry:
                result.counts.update(entry["counts"])
            elif "started" in entry:
                result.started += 1
        result.ops.extend(ops.values())
    return result


def observe(root: Path) -> dict[str, Value]:
    """Every name under *root*: DIR, or the digest of the file's bytes."""
    found: dict[str, Value] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = DIR
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = digest(f.read())
    return found


Timed = tuple[int, int | None, Value, bool]  # t0, t1, value, durable


def possible_values(before: Value, ops: list[Timed]) -> set[Value]:
    """What a name may hold after a crash, given its value before and the ops on it.

    An op's value is possible unless some durable op that returned started
    after it returned (that one definitely came later, and must survive);
    an op still in flight at the kill may have taken effect at any point.
    """
    candidates: list[Timed] = [(-1, -1, before, True), *ops]
    last_durable_start = max(
        (t0 for t0, t1, _v, durable in candidates if t1 is not None and durable), default=-1
    )
    return {v for _t0, t1, v, _d in candidates if t1 is None or t1 >= last_durable_start}


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    names: int = 0
    files: int = 0
    determined: int = 0  # names whose content only one value could be


def check_tree(before: dict[str, Value], journal: CycleJournal, after: dict[str, Value]) -> Verdict:
    per_name: dict[str, list[Timed]] = defaultdict(list)
    described: dict[str, list[str]] = defaultdict(list)
    for op in journal.ops:
        for name, value in op.effects:
            per_name[name].append((op.t0, op.t1, value, op.durable))
            state = "returned" if op.t1 is not None else "IN FLIGHT"
            state += "" if op.durable else ", not durable before close"
            described[name].append(f"  {op.what} -> {value} at {op.t0} ({state})")
    verdict = Verdict()
    for name in sorted(set(before) | set(per_name) | set(after), key=str):
        possible = possible_values(before.get(name), per_name.get(name, []))
        found = after.get(name)
        verdict.names += 1
        verdict.files += found not in (DIR, ABSENT)
        verdict.determined += len(possible) == 1
        if found not in possible:
            verdict.problems.append(
                f"{name}: holds {found}, possible {sorted(map(str, possible))}; "
                f"before the cycle {before.get(name)}; ops:\n" + "\n".join(described[name])
            )
    return verdict


def check_groups(root: Path, after: dict[str, Value]) -> list[str]:
    """A Triton group file that survived names only files that survived too."""
    problems = []
    for name in after:
        if not name.endswith("/__grp__k.json") or "/tmp.pid_" in name:
            continue
        group = json.loads((root / name).read_bytes())
        for child in group["child_paths"].values():
            relative = os.path.relpath(child, root)
            if after.get(relative) in (DIR, ABSENT):
                problems.append(f"{name} names {relative}, which is missing after the crash")
    return problems


RECOVERY = re.compile(
    r"(\d+) unfinished writes dropped, (\d+) unlinked files freed, (\d+) orphan objects removed"
)


def recovery_totals(log: str) -> tuple[int, int, int, int]:
    """(recoveries, staging files dropped, unlinked inodes freed, orphans swept) from the log."""
    found = [tuple(map(int, m.groups())) for m in RECOVERY.finditer(log)]
    staging, unlinked, orphans = (sum(column) for column in zip(*found, strict=True))
    return len(found), staging, unlinked, orphans


def spawn_workers(
    root: Path, journals: Path, cycle: int, rng: random.Random
) -> tuple[list[BaseProcess], list[Path]]:
    procs: list[BaseProcess] = []
    paths: list[Path] = []
    wid = 0
    for kind, count in WORKERS:
        for _ in range(count):
            journal = journals / f"cycle{cycle:03}-{kind}-{wid}.jsonl"
            paths.append(journal)
            proc = fork.Process(
                target=worker_main, args=(kind, wid, rng.randrange(2**32), root, journal)
            )
            proc.start()
            procs.append(proc)
            wid += 1
    return procs, paths


def journal_started(path: Path) -> bool:
    try:
        return b'"started"' in path.read_bytes() or b'"error"' in path.read_bytes()
    except FileNotFoundError:
        return False


def test_sigkill_at_random_moments_loses_nothing_closed(tmp_path: Path) -> None:
    print(f"\ncrash test seed {SEED} (MITHRILFS_CRASH_SEED to repeat), {CYCLES} kill cycles")
    rng = random.Random(SEED)
    daemon = Daemon(tmp_path)
    journals = tmp_path / "journals"
    journals.mkdir()
    root = daemon.root
    procs: list[BaseProcess] = []
    totals: Counter[str] = Counter()
    try:
        daemon.start(daemonized=False)
        state = observe(root)
        daemon.stop()
        daemon.mount.assert_consistent()
        for cycle in range(CYCLES):
            context = f"seed {SEED}, cycle {cycle}"
            # Alternate: kill a foreground daemon and recover with the daemonizing
            # CLI, then the other way round.
            daemonized = cycle % 2 == 1
            daemon.start(daemonized)
            procs, paths = spawn_workers(root, journals, cycle, rng)
            wait_for(
                lambda paths=paths: all(map(journal_started, paths)),
                DEADLINE,
                "the workers to start",
            )
            time.sleep(rng.uniform(*KILL_DELAY))  # the random moment of the crash
            daemon.kill()
            for proc in procs:
                proc.join(DEADLINE)
                assert proc.exitcode is not None, f"{context}: worker stuck after the kill"
            procs = []
            journal = read_journals(paths)
            assert journal.started == len(paths), context
            assert not journal.errors, f"{context}:\n" + "\n".join(journal.errors)

            # The next mount must clear the stale mountpoint and recover by itself.
            daemon.start(not daemonized)
            after = observe(root)
            verdict = check_tree(state, journal, after)
            problems = verdict.problems + check_groups(root, after)
            assert not problems, f"{context}:\n" + "\n".join(problems)
            daemon.stop()
            daemon.mount.assert_consistent()
            state = after

            totals["cycles"] += 1
            totals["names checked"] += verdict.names
            totals["files checked"] += verdict.files
            totals["names exactly determined"] += verdict.determined
            totals["ops journaled"] += len(journal.ops)
            totals["ops in flight at a kill"] += sum(op.t1 is None for op in journal.ops)
            totals.update(journal.counts)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        daemon.cleanup()
    log = daemon.mount.log_text()
    recoveries, staging, unlinked, orphans = recovery_totals(log)
    assert "Traceback" not in log, log
    # Recovery checks the index after an unclean stop and repairs what it
    # finds.  A crash may leave orphan object files; anything else it had to
    # repair would mean a crash broke an invariant.
    repaired = [line for line in log.splitlines() if " recovery: " in line]
    assert all(" recovery: orphan: " in line for line in repaired), "\n".join(repaired)
    assert " ERROR " not in log, log
    assert daemon.stale_cleared == CYCLES
    assert recoveries >= CYCLES
    summary = ", ".join(f"{value} {name}" for name, value in sorted(totals.items()))
    print(
        f"crash test: {summary}; recovery: {recoveries} unclean starts, {staging} staging files "
        f"dropped, {unlinked} unlinked inodes freed, {orphans} orphan objects swept; "
        f"{daemon.stale_cleared} stale mounts cleared"
    )


# -- each crash state on its own ----------------------------------------------------


def recovery_line(mount: Mount) -> tuple[int, int, int]:
    found = RECOVERY.findall(mount.log_text())
    assert found, mount.log_text()
    staging, unlinked, orphans = map(int, found[-1])
    return staging, unlinked, orphans


def test_kill_during_writes_keeps_last_sealed_content_and_frees_unlinked_files(
    crashable: Any,
) -> None:
    mount = crashable()
    triton = mount / "triton"
    (triton / "sealed").write_bytes(b"version 1")
    rewriting = os.open(triton / "sealed", os.O_WRONLY | os.O_TRUNC)
    fresh = os.open(triton / "fresh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    unlinked = os.open(triton / "scratch", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(rewriting, b"version 2, never closed " * 1000)
        os.write(fresh, b"never closed")
        os.unlink(triton / "scratch")
        os.write(unlinked, os.urandom(300_000))
        crash(mount)
    finally:
        for fd in (rewriting, fresh, unlinked):
            with contextlib.suppress(OSError):
                os.close(fd)
    restart(mount)
    assert (triton / "sealed").read_bytes() == b"version 1"
    assert (triton / "fresh").read_bytes() == b""  # created (durable), never closed
    assert sorted(os.listdir(triton)) == ["fresh", "sealed"]
    staging, unlinked_freed, _orphans = recovery_line(mount)
    assert staging == 3
    assert unlinked_freed == 1
    # The fixture unmounts and requires fsck to find the store clean.


def test_orphan_objects_a_crash_leaves_are_swept(crashable: Any) -> None:
    """An object file with no row: a crash between publishing an object and the
    index commit, or between the commit and deleting the object it replaced."""
    mount = crashable()
    (mount / "triton" / "kept").write_bytes(b"kept")
    crash(mount)
    content = ContentStore(mount.store)
    orphans = [b"published, never committed", b"replaced, never deleted" * 1000]
    for data in orphans:
        path = content.object_path(blake3.blake3(data).digest())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o400)
    restart(mount)
    assert (mount / "triton" / "kept").read_bytes() == b"kept"
    _staging, _unlinked, swept = recovery_line(mount)
    assert swept == len(orphans)
    for data in orphans:
        assert not content.object_path(blake3.blake3(data).digest()).exists()


def test_cli_mount_clears_the_stale_mount_a_killed_daemon_left(tmp_path: Path) -> None:
    mountpoint, store, log = tmp_path / "mnt", tmp_path / "store", tmp_path / "daemon.log"
    mountpoint.mkdir()
    pids: list[int] = []
    try:
        result = mithrilfs("mount", mountpoint, "--store", store, "--log-file", log)
        assert result.returncode == 0, result.stderr
        pid = holder_pid(store)
        assert pid is not None
        pids.append(pid)
        (mountpoint / "triton" / "k.cubin").write_bytes(b"cubin")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), DEADLINE, f"daemon {pid} to exit")
        with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOTCONN}\] "):
            os.listdir(mountpoint)
        assert find_mount(mountpoint) is not None  # stale, still in the mount table

        result = mithrilfs("mount", mountpoint, "--store", store, "--log-file", log)
        assert result.returncode == 0, result.stderr
        assert "stale" in result.stderr
        pid = holder_pid(store)
        assert pid is not None
        pids.append(pid)
        assert (mountpoint / "triton" / "k.cubin").read_bytes() == b"cubin"
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        assert len([line for line in mountinfo if f" {mountpoint} " in line]) == 1
        result = mithrilfs("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert find_mount(mountpoint) is None
        result = mithrilfs("fsck", "--store", store)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in log.read_text()
    finally:
        for pid in pids:
            kill_pid(pid)
        clear_leftover_mount(mountpoint)


@pytest.mark.parametrize("new", [b"new bytes, closed", b""], ids=["write", "truncate-only"])
def test_close_with_another_writable_handle_open_survives_kill(crashable: Any, new: bytes) -> None:
    """close() returned, so the bytes must survive, even while another process
    still holds the file open for writing (as filelock holds its lock files).
    An O_TRUNC open closed without a write is a change like any other."""
    mount = crashable()
    path = mount / "triton" / "f"
    path.write_bytes(b"old bytes that must not come back")
    holder = os.open(path, os.O_RDWR)  # open for writing, never writes
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        if new:
            os.write(fd, new)
        os.close(fd)  # returned: the writer is done
        crash(mount)
    finally:
        with contextlib.suppress(OSError):
            os.close(holder)
    restart(mount)
    assert path.read_bytes() == new
