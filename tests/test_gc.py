"""`mithrilfs gc` and `mithrilfs evict`: offline, and against a running mount.

Offline the command holds the store lock itself; while a daemon serves the
store it asks the daemon through the mount's admin socket and prints the
daemon's answer.  Either way the same entries go, whole, and
on a mount their names vanish at once (the kernel is told).  Bad input is
one ``mithrilfs: ...`` line, exit 2, and nothing removed.  Every store is
checked with fsck by the fixture when the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mithrilfs.cli import main
from mithrilfs.index import WalCheckpointer
from mithrilfs.repository import INDEX_NAME, Repository
from tests.conftest import Mount, MountFactory, wait_for
from tests.test_eviction import (
    DEADLINE,
    Entry,
    counters,
    entry_state,
    make_entries,
    read_triton_group,
    tree,
    write_entry,
)

DAY = 86400
# Seconds added to the clock that recency and ages use, for the mounts below
# and for offline commands given --clock-offset-file (a test-only option).
CLOCK_OFFSET = "clock-offset"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out)
        return data


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run the command line in this process (it signals daemons and polls like the real one)."""

    def run(*args: str | os.PathLike[str]) -> Result:
        capsys.readouterr()
        code = main([os.fspath(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def cache(make_mount: MountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A factory for mounts with Triton's cache pointed at them, on the `clock` fixture's clock."""
    offset = os.fspath(tmp_path / CLOCK_OFFSET)

    def start(*extra: str, name: str = "m", store: Path | None = None) -> Mount:
        mount: Mount = make_mount(
            "--cap", "64M", "--clock-offset-file", offset, *extra, name=name, store=store
        )
        monkeypatch.setenv("TRITON_CACHE_DIR", os.fspath(mount / "triton"))
        return mount

    return start


@pytest.fixture
def clock(tmp_path: Path) -> Callable[[float], object]:
    """Move the clock that recency and expiry see (the `cache` mounts, and offline
    commands given ``--clock-offset-file`` with this file)."""
    offset = tmp_path / CLOCK_OFFSET
    offset.write_text("0")
    return lambda seconds: offset.write_text(str(seconds))


def populate(mount: Mount, prefix: str, count: int) -> list[Entry]:
    entries = make_entries(prefix, count)
    for entry in entries:
        write_entry(mount.mountpoint, entry)
    return entries


def read_entry(mount: Mount, entry: Entry) -> None:
    if entry.kind == "triton":
        assert read_triton_group(mount.mountpoint, entry.key) is not None
    else:
        for path in entry.files:
            assert (mount / path).read_bytes() == entry.content(path)


def entry_bytes(mount: Mount, entry: Entry) -> int:
    root = mount / entry.root
    if root.is_dir():
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return sum((mount / path).stat().st_size for path in entry.files)


def location(mount_class: str, entry: Entry) -> str:
    suffix = ".*" if entry.kind == "stem" else ""
    return f"{mount_class}/{entry.root}{suffix}"


def mount_class(mount: Mount) -> str:
    repo = Repository.open(mount.store, create=False)
    try:
        return os.fsdecode(repo.index.class_roots()[0][0])
    finally:
        repo.close()


def wait_gone(mount: Mount, entries: list[Entry]) -> None:
    """Names dropped by a daemon vanish without waiting for the kernel's hour-long timeouts."""
    wait_for(
        lambda: all(not (mount / e.files[0]).exists() for e in entries),
        10,
        "the evicted names to vanish from the mount",
    )


def settle_index(mount: Mount) -> None:
    """Copy the index's committed WAL into its file, as the daemon's checkpointer would."""
    checkpointer = WalCheckpointer(mount.store / INDEX_NAME)
    try:
        checkpointer.checkpoint()
    finally:
        checkpointer.close()


def usage(cli: Callable[..., Result], mount: Mount) -> int:
    """What the store takes on disk now, as gc measures it (a dry run)."""
    report = cli("gc", "--store", mount.store, "--to", "1", "--dry-run", "--json").report
    return int(report["usage_before"])


def assert_states(mount: Mount, gone: list[Entry], kept: list[Entry]) -> None:
    assert [entry_state(mount.mountpoint, e) for e in gone] == ["absent"] * len(gone)
    assert [entry_state(mount.mountpoint, e) for e in kept] == ["complete"] * len(kept)


# -- gc -----------------------------------------------------------------------------


def test_gc_offline_evicts_least_recently_read_down_to_the_size(cache, cli) -> None:
    mount = cache()
    entries = populate(mount, "gc", 6)
    read_entry(mount, entries[0])
    read_entry(mount, entries[1])  # least recently read now: 2, 3, 4, 5, 0, 1
    sizes = [entry_bytes(mount, e) for e in entries]
    mount.stop()

    # The size is what the store takes on disk (index, blocks, directories):
    # remove 2, 3 and 4, which take at least their sizes.
    target = usage(cli, mount) - sizes[2] - sizes[3] - sizes[4]
    result = cli("gc", "--store", mount.store, "--to", str(target), "--json")
    assert result.code == 0, result.err
    report = result.report
    assert (report["entries"], report["served_by"]) == (3, "offline")
    assert report["bytes_freed"] == sizes[2] + sizes[3] + sizes[4]
    assert report["usage_after"] <= target
    assert counters(mount, "evictions_total") == {"gc": 3}

    mount.start()
    assert_states(mount, gone=entries[2:5], kept=[entries[0], entries[1], entries[5]])


def test_gc_without_a_size_uses_the_last_mounts_cap(cache, cli, make_mount) -> None:
    mount = cache()
    entries = populate(mount, "gcdefault", 3)
    mount.stop()
    result = cli("gc", "--store", mount.store)
    assert result.code == 0, result.err
    assert "evicted 0 entries" in result.out
    assert "of a 64.0 MiB cap" in result.out
    assert counters(mount, "evictions_total") == {}
    mount.start()
    assert_states(mount, gone=[], kept=entries)

    never_mounted = make_mount(name="fresh", start=False)
    Repository.open(never_mounted.store).close()
    result = cli("gc", "--store", never_mounted.store)
    assert result.code == 2
    assert result.err.startswith("mithrilfs: no cap is on record")


def test_gc_against_a_running_mount_goes_through_its_daemon(cache, cli) -> None:
    mount = cache()
    entries = populate(mount, "gconline", 5)
    read_entry(mount, entries[0])
    sizes = [entry_bytes(mount, e) for e in entries]
    # The daemon's first WAL checkpoint grows the index file from one page to
    # the whole index (64 KiB here).  Should it fall between the dry run and
    # the gc, the gc would need a third entry; so checkpoint now, and allow
    # half an entry for what a checkpoint could still add, too little to
    # spare entry 2 or to take entry 3.
    settle_index(mount)
    slack = min(sizes[2], sizes[3]) // 2
    target = usage(cli, mount) - sizes[1] - sizes[2] + slack

    result = cli("gc", "--store", mount.store, "--to", str(target), "--json")
    assert result.code == 0, result.err
    assert result.report["entries"] == 2
    assert result.report["served_by"] == f"daemon pid {mount.proc.pid}"
    wait_gone(mount, entries[1:3])
    assert_states(mount, gone=entries[1:3], kept=[entries[0], *entries[3:]])
    mount.stop()
    assert counters(mount, "evictions_total") == {"gc": 2}


# -- evict: by age, by class, by path; dry runs ------------------------------------------


def test_evict_older_than_offline(cache, cli, clock) -> None:
    mount = cache()
    entries = populate(mount, "old", 4)
    clock(5 * DAY)
    read_entry(mount, entries[2])
    mount.stop()
    clock(8 * DAY)

    moved = ("--clock-offset-file", mount.store.parent / CLOCK_OFFSET)
    dry = cli("evict", "--store", mount.store, "--older-than", "7d", "--dry-run", *moved)
    assert dry.code == 0, dry.err
    place = mount_class(mount)
    listed = [line.split()[2] for line in dry.out.splitlines() if line.startswith("would evict ")]
    assert listed[:-1] == [location(place, e) for e in (entries[0], entries[1], entries[3])]
    assert "would evict 3 entries" in dry.out
    assert "8.0d ago" in dry.out

    result = cli("evict", "--store", mount.store, "--older-than", "7d", *moved)
    assert result.code == 0, result.err
    assert result.out.startswith("evicted 3 entries")
    assert counters(mount, "evictions_total") == {"evict": 3}
    mount.start()
    assert_states(mount, gone=[entries[0], entries[1], entries[3]], kept=[entries[2]])


def test_evict_older_than_through_the_daemon(cache, cli, clock) -> None:
    mount = cache()
    entries = populate(mount, "oldonline", 4)
    clock(5 * DAY)
    read_entry(mount, entries[1])
    clock(8 * DAY)
    result = cli("evict", "--store", mount.store, "--older-than", "7d", "--json")
    assert result.code == 0, result.err
    assert result.report["entries"] == 3
    gone = [entries[0], entries[2], entries[3]]
    wait_gone(mount, gone)
    assert_states(mount, gone=gone, kept=[entries[1]])
    mount.stop()
    assert counters(mount, "evictions_total") == {"evict": 3}


def test_evict_a_device_class_offline_and_through_the_daemon(cache, cli) -> None:
    hopper = cache("--device-class", "cuda-sm90")
    on_hopper = populate(hopper, "sm90", 3)
    hopper.stop()
    ampere = cache("--device-class", "cuda-sm80", name="a100", store=hopper.store)
    on_ampere = populate(ampere, "sm80", 3)
    ampere.stop()

    dry = cli(
        "evict", "--store", hopper.store, "--device-class", "cuda-sm90", "--dry-run", "--json"
    )
    assert sorted(loc for loc, _b, _t in dry.report["listed"]) == sorted(
        location("cuda-sm90", e) for e in on_hopper
    )
    result = cli("evict", "--store", hopper.store, "--device-class", "cuda-sm90")
    assert result.code == 0, result.err
    assert result.out.startswith("evicted 3 entries")

    ampere.start()
    assert_states(ampere, gone=[], kept=on_ampere)
    result = cli("evict", "--store", ampere.store, "--device-class", "cuda-sm80", "--json")
    assert result.code == 0, result.err
    assert result.report["entries"] == 3
    wait_gone(ampere, on_ampere)
    assert set(os.listdir(ampere.mountpoint)) >= {"triton", "inductor"}  # the tree stays
    ampere.stop()
    hopper.start("--device-class", "cuda-sm90")
    assert_states(hopper, gone=on_hopper, kept=[])


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_evict_by_path_after_a_triton_upgrade(cache, cli, online: bool) -> None:
    mount = cache()
    entries = populate(mount, "path", 8)
    triton = [e for e in entries if e.kind == "triton"]
    others = [e for e in entries if e.kind != "triton"]
    if not online:
        mount.stop()
    result = cli("evict", "--store", mount.store, "--path", "triton/*", "--json")
    assert result.code == 0, result.err
    assert result.report["entries"] == len(triton)
    if online:
        wait_gone(mount, triton)
    else:
        mount.start()
    assert_states(mount, gone=triton, kept=others)

    # A pattern may name files: the stems with a .so go, whole (.py, .cpp too).
    stems = [e for e in others if e.kind == "stem"]
    result = cli("evict", "--store", mount.store, "--path", "inductor/*/c*.so", "--json")
    assert result.report["entries"] == len(stems)
    wait_gone(mount, stems)
    assert_states(mount, gone=stems, kept=[e for e in others if e.kind == "fxgraph"])


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_dry_run_shows_entries_and_bytes_and_removes_nothing(cache, cli, online: bool) -> None:
    mount = cache("--device-class", "cuda-sm90")
    entries = populate(mount, "dry", 4)
    sizes = {e.key: entry_bytes(mount, e) for e in entries}
    before = tree(mount.mountpoint)
    if not online:
        mount.stop()
    result = cli("evict", "--store", mount.store, "--path", "*", "--dry-run", "--json")
    assert result.code == 0, result.err
    report = result.report
    assert report["dry_run"] is True
    expected = {location("cuda-sm90", e): sizes[e.key] for e in entries}
    assert {loc: freed for loc, freed, _t in report["listed"]} == expected
    assert report["bytes_freed"] == sum(sizes.values())
    text = cli("gc", "--store", mount.store, "--to", "1", "--dry-run")
    assert f"would evict {len(entries)} entries" in text.out
    if not online:
        mount.start()
    assert tree(mount.mountpoint) == before
    mount.stop()
    assert counters(mount, "evictions_total") == {}


def test_dry_run_counts_shared_content_once(cache, cli) -> None:
    mount = cache()
    shared = b"same bytes" * 1000
    for name in ("a", "b"):
        (mount / "triton" / name).mkdir()
        (mount / "triton" / name / "k.cubin").write_bytes(shared)
    (mount / "triton" / "a" / "own.ptx").write_bytes(b"only a" * 100)
    result = cli("evict", "--store", mount.store, "--path", "triton/*", "--dry-run", "--json")
    listed = {loc.rsplit("/", 1)[1]: freed for loc, freed, _t in result.report["listed"]}
    # Removing one leaves the other's copy: the shared object is freed by the second only.
    assert sum(listed.values()) == len(shared) + 600
    result = cli("evict", "--store", mount.store, "--path", "triton/a", "--json")
    assert (result.report["entries"], result.report["bytes_freed"]) == (1, 600)


# -- refusals ---------------------------------------------------------------------------


BAD_INPUT = [
    (["gc", "--to", "12Q"], "invalid size '12Q'"),
    (["gc", "--to", "0"], "invalid size '0'"),
    (["evict", "--older-than", "7x"], "invalid duration '7x'"),
    (["evict", "--path", "/triton/*"], "invalid path pattern '/triton/*'"),
    (["evict", "--path", "triton/[ab"], "unterminated '['"),
    (["evict", "--path", ""], "invalid path pattern ''"),
    (["evict", "--device-class", "rocm-gfx000"], "no device class 'rocm-gfx000'"),
    (["evict"], "choose the entries to evict"),
    (["evict", "--dry-run"], "choose the entries to evict"),
]


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_bad_input_is_one_line_exit_2_and_removes_nothing(cache, cli, online: bool) -> None:
    mount = cache()
    populate(mount, "bad", 3)
    before = tree(mount.mountpoint)
    if not online:
        mount.stop()
    for args, mention in BAD_INPUT:
        result = cli(*args, "--store", mount.store)
        assert result.code == 2, (args, result)
        lines = result.err.splitlines()
        assert len(lines) == 1, (args, result.err)
        assert lines[0].startswith("mithrilfs: "), lines
        assert mention in lines[0], (args, lines[0])
        assert result.out == ""
    if not online:
        mount.start()
    assert tree(mount.mountpoint) == before
    mount.stop()
    assert counters(mount, "evictions_total") == {}


def test_a_store_held_by_another_command_is_not_signalled(cache, tmp_path: Path) -> None:
    mount = cache()
    mount.stop()
    holder = Repository.open(mount.store)  # like a running fsck: the lock, no daemon
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mithrilfs", "gc", "--store", mount.store, "--to", "1"],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert result.stderr.startswith(f"mithrilfs: store {mount.store} is in use by mithrilfs pid")
    assert "takes no eviction requests" in result.stderr


def test_the_real_command_line_against_a_mount(cache) -> None:
    mount = cache()
    entries = populate(mount, "real", 4)
    result = subprocess.run(
        [sys.executable, "-m", "mithrilfs", "evict", "--store", mount.store, "--path", "triton/*"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("evicted 2 entries, freed ")
    triton = [e for e in entries if e.kind == "triton"]
    wait_gone(mount, triton)
