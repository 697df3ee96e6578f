"""The size cap and least-recently-read eviction of whole entries, on real mounts.

The workload is shaped like the compilers' caches: Triton kernels written by
Triton's own `FileCacheManager` (each artifact into a ``tmp.pid_*`` directory
and `os.replace`d into the key directory, the ``__grp__`` file last), inductor
FX graph entries and code-cache stems (``c<key>.py/.cpp/.so``) written the
way torch's ``write_atomic`` does (``.pid.tid.tmp`` then rename), the ``.so``
in place like a linker.  Every file's bytes follow from its key and name, so
any reader can tell a right read from a wrong one.

Every mount is unmounted by the fixture, which fails the test unless fsck
finds the store clean and the daemon logged no traceback.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs.eviction import LOW_WATERMARK
from mithrilfs.repository import Repository
from mithrilfs.store import EMPTY_DIGEST
from tests.conftest import Mount, wait_for

KiB = 1024
MiB = 1024 * KiB
CAP = 4 * MiB
DEADLINE = 60.0
# Writers and readers race each other: forked, they start at once with the test's imports.
fork = multiprocessing.get_context("fork")

# Sizes by kind of file, in the ranges the compilers produce for small kernels.
SIZES = {
    "cubin": (48 * KiB, 160 * KiB),
    "ptx": (32 * KiB, 128 * KiB),
    "ttir": (8 * KiB, 32 * KiB),
    "ttgir": (8 * KiB, 32 * KiB),
    "llir": (16 * KiB, 64 * KiB),
    "json": (1 * KiB, 2 * KiB),
    "py": (4 * KiB, 32 * KiB),
    "cpp": (8 * KiB, 40 * KiB),
    "so": (48 * KiB, 160 * KiB),
    "fxgraph": (16 * KiB, 96 * KiB),
}
LARGEST_FILE = max(high for _low, high in SIZES.values())
TRITON_ARTIFACTS = ("cubin", "ptx", "ttir", "ttgir", "llir", "json")
STEM_SUFFIXES = ("py", "cpp", "so")


def payload(key: str, filename: str) -> bytes:
    """The one right content of *filename* in entry *key*: distinct, reproducible."""
    kind = filename.rsplit(".", 1)[-1] if "." in filename else "fxgraph"
    low, high = SIZES.get(kind, SIZES["fxgraph"])
    seed = f"{key}/{filename}".encode()
    size = low + int.from_bytes(blake3.blake3(seed).digest(length=4), "little") % (high - low)
    return blake3.blake3(seed + b"#content").digest(length=size)


@dataclass(frozen=True)
class Entry:
    """One compiler cache entry: a Triton kernel, an FX graph, or a code-cache stem."""

    kind: str  # triton | fxgraph | stem
    key: str

    @property
    def name(self) -> str:
        return f"kernel_{self.key[:6].lower()}"

    @property
    def shard(self) -> str:
        return self.key[1:3]

    @property
    def root(self) -> str:
        """Its directory (Triton, FX graph) or its stem path, from the mount root."""
        if self.kind == "triton":
            return f"triton/{self.key}"
        if self.kind == "fxgraph":
            return f"inductor/fxgraph/{self.shard}/{self.key}"
        return f"inductor/{self.shard}/{self.key}"

    @property
    def files(self) -> list[str]:
        """Its files (paths from the mount root), the Triton group file excluded."""
        if self.kind == "triton":
            return [f"{self.root}/{self.name}.{ext}" for ext in TRITON_ARTIFACTS]
        if self.kind == "fxgraph":
            return [f"{self.root}/{hashlib.sha256(self.key.encode()).hexdigest()[:40]}"]
        return [f"{self.root}.{suffix}" for suffix in STEM_SUFFIXES]

    def content(self, path: str) -> bytes:
        return payload(self.key, path.rsplit("/", 1)[-1])

    @property
    def size(self) -> int:
        return sum(len(self.content(path)) for path in self.files)


def numbered_entries(prefix: str) -> Iterator[Entry]:
    """Triton kernels, code-cache stems and FX graphs, in turn, with keys like the real ones."""
    kinds = ("triton", "stem", "fxgraph", "triton")
    for i in itertools.count():
        digest = hashlib.sha256(f"{prefix}-{i}".encode()).digest()
        b32 = base64.b32encode(digest).decode().rstrip("=")
        kind = kinds[i % len(kinds)]
        key = {"triton": b32, "stem": "c" + b32.lower()[:51], "fxgraph": "f" + b32.lower()[:51]}
        yield Entry(kind, key[kind])


def make_entries(prefix: str, count: int) -> list[Entry]:
    return list(itertools.islice(numbered_entries(prefix), count))


def entries_totalling(prefix: str, total: int) -> list[Entry]:
    entries: list[Entry] = []
    size = 0
    for entry in numbered_entries(prefix):
        if size >= total:
            break
        entries.append(entry)
        size += entry.size
    return entries


# -- writing the way the compilers do -------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """torch._inductor.codecache.write_atomic: a temporary next to the target, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.write_bytes(data)
    temporary.rename(path)


def write_in_place(path: Path, data: bytes, seed: int) -> None:
    """A linker's output: created in place, written out of order, made executable."""
    chunks = list(range(0, len(data), 16 * KiB))
    random.Random(seed).shuffle(chunks)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in chunks:
            os.pwrite(fd, data[offset : offset + 16 * KiB], offset)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def write_entry(mountpoint: Path, entry: Entry) -> None:
    """Write *entry* as its compiler would (TRITON_CACHE_DIR must point at mount/triton)."""
    if entry.kind == "triton":
        from triton.runtime.cache import FileCacheManager

        manager = FileCacheManager(entry.key)
        group = {}
        for path in entry.files:
            filename = path.rsplit("/", 1)[-1]
            group[filename] = manager.put(entry.content(path), filename)
        manager.put_group(f"{entry.name}.json", group)
    elif entry.kind == "fxgraph":
        (path,) = entry.files
        write_atomic(mountpoint / path, entry.content(path))
    else:
        (mountpoint / entry.root).parent.mkdir(parents=True, exist_ok=True)
        for path in entry.files:
            if path.endswith(".so"):
                write_in_place(mountpoint / path, entry.content(path), seed=len(path))
            else:
                write_atomic(mountpoint / path, entry.content(path))


def _write_all(mountpoint: str, entries: list[Entry], failures: Any) -> None:
    try:
        for entry in entries:
            write_entry(Path(mountpoint), entry)
    except BaseException as exc:
        failures.put(f"writer {os.getpid()}: {type(exc).__name__}: {exc}")
        raise


def write_concurrently(mount: Mount, shares: list[list[Entry]]) -> None:
    """One forked writer process per share; each must finish without an error."""
    failures = fork.Queue()
    writers = [
        fork.Process(target=_write_all, args=(os.fspath(mount.mountpoint), share, failures))
        for share in shares
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(DEADLINE)
        assert writer.exitcode is not None, "a writer hung"
    errors = [failures.get() for _ in range(failures.qsize())] if not failures.empty() else []
    assert all(w.exitcode == 0 for w in writers), errors


# -- reading and checking -------------------------------------------------------------


def read_triton_group(mountpoint: Path, key: str) -> dict[str, bytes] | None:
    """What a Triton cache hit reads: the group file, then every file it names.

    None when any of it is missing (evicted meanwhile: a miss, never an error).
    """
    directory = mountpoint / "triton" / key
    try:
        groups = [name for name in os.listdir(directory) if name.startswith("__grp__")]
        if not groups:
            return None
        child_paths = json.loads((directory / groups[0]).read_text())["child_paths"]
        return {name: Path(path).read_bytes() for name, path in child_paths.items()}
    except FileNotFoundError:
        return None


def _read_randomly(mountpoint: str, stop: Any, results: Any, seed: int) -> None:
    """A reader process: Triton hits on random keys until told to stop."""
    rng = random.Random(seed)
    hits = misses = 0
    wrong: list[str] = []
    root = Path(mountpoint)
    while not stop.is_set():
        try:
            keys = os.listdir(root / "triton")
        except FileNotFoundError:
            keys = []
        if not keys:
            stop.wait(0.01)
            continue
        key = rng.choice(keys)
        group = read_triton_group(root, key)
        if group is None:
            misses += 1
            continue
        hits += 1
        for filename, data in group.items():
            if data != payload(key, filename):
                wrong.append(f"{key}/{filename}: {len(data)} bytes, not the ones written")
    results.put((hits, misses, wrong))


def entry_state(mountpoint: Path, entry: Entry) -> str:
    """'complete', 'absent', or what is wrong: an entry is never seen in part."""
    present = {path: (mountpoint / path).exists() for path in entry.files}
    if entry.kind == "triton":
        from triton.runtime.cache import FileCacheManager

        directory = mountpoint / entry.root
        if not directory.exists():
            return "absent"
        # Triton's own check: the group file, and every file it names exists.
        group = FileCacheManager(entry.key).get_group(f"{entry.name}.json")
        if group is None:
            return f"partial: no complete group; present {present}"
        expected = {path.rsplit("/", 1)[-1] for path in entry.files}
        if set(group) != expected:
            return f"group names {sorted(group)}"
        listed = set(os.listdir(directory))
        if listed != expected | {f"__grp__{entry.name}.json"}:
            return f"directory holds {sorted(listed)}"
        paths = {f"{entry.root}/{name}": Path(path) for name, path in group.items()}
    else:
        if not any(present.values()):
            return "absent"
        if not all(present.values()):
            return f"partial: {present}"
        paths = {path: mountpoint / path for path in entry.files}
    for path, real in paths.items():
        if real.read_bytes() != entry.content(path):
            return f"wrong content in {path}"
    return "complete"


def states(mountpoint: Path, entries: Iterable[Entry]) -> list[str]:
    return [entry_state(mountpoint, entry) for entry in entries]


def store_disk_usage(store: Path) -> int:
    """Bytes of the files under objects/ and staging/, as the disk sees them."""
    total = 0
    for top in (store / "objects", store / "staging"):
        pending = [os.fspath(top)]
        while pending:
            try:
                listing = os.scandir(pending.pop())
            except FileNotFoundError:
                continue
            with listing:
                for item in listing:
                    try:
                        if item.is_dir(follow_symlinks=False):
                            pending.append(item.path)
                        else:
                            total += item.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass  # sealed into objects/ or evicted while we looked
    return total


class UsageMonitor(threading.Thread):
    """Samples the store's disk usage (by *measure*), again and again, until stopped."""

    def __init__(self, store: Path, measure: Callable[[Path], int] = store_disk_usage) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.measure = measure
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(self.measure(self.store))
            self.stopped.wait(0.002)

    def __enter__(self) -> UsageMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.join()


def used_bytes(mount: Mount) -> int:
    """What statfs says is used under the cap."""
    st = os.statvfs(mount.mountpoint)
    return (st.f_blocks - st.f_bavail) * st.f_frsize


def wait_until_settled(mount: Mount, cap: int) -> None:
    """Background eviction stops at the low watermark: wait for it before looking around."""
    wait_for(
        lambda: used_bytes(mount) <= cap * LOW_WATERMARK,
        DEADLINE,
        "eviction down to the low watermark",
    )


def counters(mount: Mount, name: str) -> dict[str, int]:
    """reason -> value of a counter, from the (unmounted) store."""
    repo = Repository.open(mount.store, create=False)
    try:
        rows = repo.index.load_counters()
    finally:
        repo.close()
    found: dict[str, int] = {}
    for counter, labels, value in rows:
        if counter == name:
            reason = json.loads(labels).get("reason", "")
            found[reason] = found.get(reason, 0) + value
    return found


def stored_digests(mount: Mount) -> set[bytes]:
    repo = Repository.open(mount.store, create=False)
    try:
        return {row[0] for row in repo.index.db.execute("SELECT hash FROM objects")}
    finally:
        repo.close()


def tree(root: Path) -> dict[str, bytes]:
    found = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        found[os.path.relpath(dirpath, root)] = b"<dir>"
        for name in filenames:
            path = Path(dirpath) / name
            found[os.path.relpath(path, root)] = path.read_bytes()
    return found


@pytest.fixture
def capped(make_mount, monkeypatch: pytest.MonkeyPatch):
    """A factory for mounts under a cap, with Triton's cache pointed at the mount."""

    def start(cap: str, *extra: str, name: str = "m") -> Mount:
        mount: Mount = make_mount("--cap", cap, *extra, name=name)
        monkeypatch.setenv("TRITON_CACHE_DIR", os.fspath(mount / "triton"))
        return mount

    return start


# -- the cap under a concurrent fill ----------------------------------------------------


def test_store_stays_under_the_cap_while_concurrent_writers_fill_it_ten_times(capped) -> None:
    mount = capped("4M")
    entries = entries_totalling("fill", 10 * CAP)
    shares = [entries[i::3] for i in range(3)]
    stop, results = fork.Event(), fork.Queue()
    readers = [
        fork.Process(target=_read_randomly, args=(os.fspath(mount.mountpoint), stop, results, i))
        for i in range(2)
    ]
    for reader in readers:
        reader.start()
    try:
        with UsageMonitor(mount.store) as monitor:
            write_concurrently(mount, shares)
    finally:
        stop.set()
        outcomes = [results.get(timeout=DEADLINE) for _ in readers]
        for reader in readers:
            reader.join(DEADLINE)

    assert len(monitor.samples) >= 50, "too few samples to say anything"
    peak = max(monitor.samples)
    assert peak <= CAP + LARGEST_FILE, f"store reached {peak} bytes, cap {CAP}"
    assert store_disk_usage(mount.store) <= CAP
    hits = sum(hit for hit, _miss, _wrong in outcomes)
    wrong = [w for _hit, _miss, ws in outcomes for w in ws]
    assert not wrong, wrong[:5]
    assert hits > 0, "the readers never found a complete entry"

    wait_until_settled(mount, CAP)
    found = states(mount.mountpoint, entries)
    assert set(found) <= {"complete", "absent"}, [s for s in found if s != "complete"][:5]
    kept = found.count("complete")
    assert 0 < kept < len(entries) // 4
    mount.stop()
    evictions = counters(mount, "evictions_total")
    assert evictions.get("cap", 0) >= len(entries) - kept
    assert set(evictions) == {"cap"}


def test_no_half_entries_when_writers_race_on_the_same_keys_during_eviction(capped) -> None:
    # Several ranks compile the same kernels at once while the cap evicts.
    mount = capped("2M")
    entries = entries_totalling("same", 6 * 2 * MiB)
    write_concurrently(mount, [entries, entries[::-1], entries[1::2]])
    wait_until_settled(mount, 2 * MiB)

    found = states(mount.mountpoint, entries)
    assert set(found) <= {"complete", "absent"}, [s for s in found if s != "complete"][:5]
    assert "complete" in found
    assert "absent" in found
    # Nothing of a Triton kernel is left outside a complete key directory.
    for key in os.listdir(mount / "triton"):
        assert read_triton_group(mount.mountpoint, key) is not None, key
        assert not [n for n in os.listdir(mount / "triton" / key) if n.startswith("tmp.pid_")]
    # Stems: every file of a stem or none (checked above); no stray temporaries.
    for shard in os.listdir(mount / "inductor"):
        if len(shard) == 2:
            assert not [n for n in os.listdir(mount / "inductor" / shard) if n.endswith(".tmp")]


def _read_repeatedly(mountpoint: Path, chosen: list[Entry], stop: threading.Event) -> None:
    while not stop.is_set():
        for entry in chosen:
            for path in entry.files:
                assert (mountpoint / path).read_bytes() == entry.content(path)
        stop.wait(0.02)


def test_recently_read_entries_survive_and_never_read_ones_go_first(capped) -> None:
    mount = capped("4M")
    chosen = make_entries("chosen", 4)
    for entry in chosen:
        write_entry(mount.mountpoint, entry)
    fill = entries_totalling("unread", 5 * CAP)
    stop = threading.Event()
    reader = threading.Thread(target=_read_repeatedly, args=(mount.mountpoint, chosen, stop))
    reader.start()
    try:
        write_concurrently(mount, [fill])  # one writer: the write order is the age order
    finally:
        stop.set()
        reader.join()
    wait_until_settled(mount, CAP)

    assert states(mount.mountpoint, chosen) == ["complete"] * len(chosen)
    found = states(mount.mountpoint, fill)
    assert set(found) <= {"complete", "absent"}
    kept = [i for i, state in enumerate(found) if state == "complete"]
    assert kept, "the fill's newest entries should be there"
    # Least recently read first: what is left of the never-read entries is the newest run.
    assert kept == list(range(kept[0], len(fill))), kept


def test_reads_just_before_unmount_still_count(capped) -> None:
    mount = capped("8M")
    first, second = Entry("fxgraph", "f" + "a" * 51), Entry("fxgraph", "f" + "b" * 51)
    big = 600 * KiB
    for entry in (first, second):
        write_atomic(mount / entry.files[0], bytes([ord(entry.key[1])]) * big)
    (mount / first.files[0]).read_bytes()  # now the most recently read: second is older
    # Room for one of them, with the index and the directories besides.
    mount.remount("--cap", "1200K")
    wait_for(
        lambda: used_bytes(mount) <= 1200 * KiB * LOW_WATERMARK,
        DEADLINE,
        "eviction down to the new cap",
    )
    assert (mount / first.files[0]).exists()
    assert not (mount / second.root).exists()


def test_lowering_the_cap_at_remount_evicts_oldest_first_and_whole(capped) -> None:
    mount = capped("16M")
    entries = entries_totalling("lower", 6 * MiB)
    write_concurrently(mount, [entries])
    assert states(mount.mountpoint, entries) == ["complete"] * len(entries)
    mount.remount("--cap", "2M")
    wait_until_settled(mount, 2 * MiB)
    found = states(mount.mountpoint, entries)
    assert set(found) <= {"complete", "absent"}
    kept = [i for i, state in enumerate(found) if state == "complete"]
    assert kept
    assert kept == list(range(kept[0], len(entries)))


# -- an open file, an open directory --------------------------------------------------------


def test_open_file_keeps_reading_its_content_after_its_entry_is_evicted(capped) -> None:
    mount = capped("1M")
    victim = make_entries("victim", 1)[0]
    write_entry(mount.mountpoint, victim)
    path = mount / victim.files[0]
    expected = victim.content(victim.files[0])
    fd = os.open(path, os.O_RDONLY)
    directory_fd = os.open(mount / victim.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.pread(fd, 4096, 0) == expected[:4096]
        for entry in make_entries("push", 40):
            write_entry(mount.mountpoint, entry)
            if victim.key not in os.listdir(mount / "triton"):
                break
        else:
            pytest.fail("the victim was never evicted")

        # The name is gone at once, although the kernel may keep names for an hour.
        wait_for(lambda: not path.exists(), 10, "the kernel to drop the evicted name")
        with pytest.raises(FileNotFoundError):
            os.open(path, os.O_RDONLY)
        # The open descriptor still reads every byte, from the daemon, not a cache.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(expected) + 1, 0) == expected
        assert os.fstat(fd).st_size == len(expected)
        # A process still inside the evicted directory cannot put names there.
        with pytest.raises(FileNotFoundError):
            os.open("late.cubin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=directory_fd)
        with pytest.raises(FileNotFoundError):
            os.mkdir("late", dir_fd=directory_fd)
    finally:
        os.close(fd)
        os.close(directory_fd)
    # A new entry under the same key is a clean miss, then a normal write.
    write_entry(mount.mountpoint, victim)
    assert entry_state(mount.mountpoint, victim) == "complete"


# -- files that can never fit, statfs ---------------------------------------------------


def test_a_file_that_can_never_fit_gets_efbig_and_the_store_is_unchanged(capped) -> None:
    mount = capped("4M")
    entries = entries_totalling("kept", 2 * MiB)
    write_concurrently(mount, [entries])
    before = tree(mount.mountpoint)
    huge = mount / "triton" / "HUGEKEY" / "huge.cubin"
    huge.parent.mkdir()

    too_big = rf"^\[Errno ({errno.EFBIG}|{errno.ENOSPC})\] "
    with pytest.raises(OSError, match=too_big):
        huge.write_bytes(random.Random(5).randbytes(5 * MiB))  # one write(2) of 5 MiB
    with pytest.raises(OSError, match=too_big):
        os.truncate(huge, 5 * MiB)
    assert os.stat(huge).st_size == 0, "no part of the refused file may be kept"

    huge.unlink()
    huge.parent.rmdir()
    assert tree(mount.mountpoint) == before
    assert states(mount.mountpoint, entries) == ["complete"] * len(entries)
    (mount / "triton" / "after").write_bytes(b"still serving")
    (mount / "triton" / "after").unlink()
    mount.stop()
    digests = {blake3.blake3(data).digest() for data in before.values() if data != b"<dir>"}
    assert stored_digests(mount) == digests | {EMPTY_DIGEST}


def test_statfs_reports_the_cap_as_the_size_and_the_room_under_it(capped) -> None:
    mount = capped("4M")
    st = os.statvfs(mount.mountpoint)
    assert st.f_blocks * st.f_frsize == 4 * MiB
    empty = used_bytes(mount)  # the index and the directories of an empty store
    assert 0 < empty < 512 * KiB
    data = random.Random(1).randbytes(1 * MiB)
    (mount / "triton" / "a.bin").write_bytes(data)
    (mount / "triton" / "copy.bin").write_bytes(data)  # dedup: stored once
    (mount / "triton" / "b.bin").write_bytes(random.Random(2).randbytes(256 * KiB))
    st = os.statvfs(mount.mountpoint)
    assert st.f_blocks * st.f_frsize == 4 * MiB
    assert st.f_bfree == st.f_bavail
    # The two objects, their shard directories and a little more index: not the copy.
    grown = used_bytes(mount) - empty
    assert 1280 * KiB <= grown <= 1280 * KiB + 256 * KiB, grown


# -- max_age ----------------------------------------------------------------------------


def test_max_age_drops_entries_not_read_within_it(
    make_mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = tmp_path / "clock-offset"
    clock.write_text("0")
    mount: Mount = make_mount(
        "-o",
        "cap=64M,max_age=7d",
        "--clock-offset-file",
        os.fspath(clock),
        "--expiry-interval",
        "0.05",
    )
    monkeypatch.setenv("TRITON_CACHE_DIR", os.fspath(mount / "triton"))
    stale, fresh = [e for e in make_entries("age", 4) if e.kind == "triton"]
    write_entry(mount.mountpoint, stale)
    write_entry(mount.mountpoint, fresh)

    clock.write_text(str(5 * 86400))  # five days on, the fresh one is read
    assert read_triton_group(mount.mountpoint, fresh.key) is not None
    clock.write_text(str(8 * 86400))  # eight days on: stale was not read for 8 days
    wait_for(lambda: not (mount / stale.root).exists(), DEADLINE, "expiry of the stale entry")
    assert entry_state(mount.mountpoint, fresh) == "complete"
    mount.stop()
    assert counters(mount, "evictions_total") == {"max_age": 1}
