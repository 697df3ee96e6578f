"""The cap bounds what the store takes on disk, measured the way operators do: `du`.

A Triton-shaped fill of ten times the cap (small artifacts written through
``tmp.pid_*`` directories by Triton's own cache manager) runs while a thread
samples ``du -s --block-size=1 STORE`` again and again; no sample may exceed
the cap by more than 5% + 1 MiB.  Afterwards `mithrilfs stats` and statfs
(df) must report what du reports.  The store is on tmp_path's filesystem
(ext4 here), where every directory and every small file takes whole blocks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs.index import SUPER_ROOT, Index
from mithrilfs.store import ContentStore
from tests.conftest import run_cli, wait_for
from tests.test_eviction import UsageMonitor

KiB = 1024
MiB = 1024 * KiB
CAP = 8 * MiB
SLACK = CAP * 5 // 100 + MiB
ARTIFACTS = ("cubin", "ptx", "ttir", "ttgir", "llir")
DEADLINE = 120.0


def du(store: Path) -> int:
    """`du -s --block-size=1 STORE`: files vanish under it while it walks, which it reports."""
    result = subprocess.run(
        ["du", "-s", "--block-size=1", os.fspath(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(result.stdout.split()[0])


def artifact(key: str, name: str) -> bytes:
    """4-40 KiB of content that follows from the key and file name."""
    seed = f"{key}/{name}".encode()
    size = 4 * KiB + int.from_bytes(blake3.blake3(seed).digest(length=4), "little") % (36 * KiB)
    return blake3.blake3(seed).digest(length=size)


def fill(triton_dir: Path, total: int) -> int:
    """Write Triton kernels (artifacts, then the group file) until *total* bytes went in."""
    from triton.runtime.cache import FileCacheManager

    os.environ["TRITON_CACHE_DIR"] = os.fspath(triton_dir)
    written = files = 0
    kernel = 0
    while written < total:
        key = blake3.blake3(b"kernel %d" % kernel).hexdigest()[:52]
        manager = FileCacheManager(key)
        group = {}
        for ext in ARTIFACTS:
            name = f"k{kernel}.{ext}"
            data = artifact(key, name)
            group[name] = manager.put(data, name)
            written += len(data)
            files += 1
        manager.put_group(f"k{kernel}.json", group)
        kernel += 1
    return files


def used_by_statfs(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bavail) * st.f_frsize


def stats_json(mountpoint: Path) -> dict[str, Any]:
    result = run_cli("stats", mountpoint, "--json")
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_du_of_the_store_stays_under_the_cap_through_a_fill_of_ten_times_it(
    make_mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    mount = make_mount("--cap", "8M")
    with UsageMonitor(mount.store, measure=du) as sampler:
        files = fill(mount / "triton", 10 * CAP)
    assert files > 2000
    assert len(sampler.samples) >= 20, "too few samples to say anything"
    peak = max(sampler.samples)
    assert peak <= CAP + SLACK, f"du reached {peak} bytes; cap {CAP}"

    # Settled (nothing left to evict, stats saved after that): everyone agrees with du.
    settled = du(mount.store)
    wait_for(
        lambda: (
            stats_json(mount.mountpoint)["saved_at"] is not None
            and abs(stats_json(mount.mountpoint)["store_bytes"] - du(mount.store)) <= settled * 0.03
        ),
        DEADLINE,
        "`mithrilfs stats` to report the usage du sees",
    )
    actual = du(mount.store)
    reported = stats_json(mount.mountpoint)["store_bytes"]
    by_statfs = used_by_statfs(mount.mountpoint)
    assert abs(reported - actual) <= actual * 0.03, (reported, actual)
    assert abs(by_statfs - actual) <= actual * 0.03, (by_statfs, actual)
    assert actual <= CAP


def test_a_shard_directory_goes_with_its_last_object(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "store")
    content.create_dirs()
    content.scan()
    staged, fd = content.new_staging(1)
    os.write(fd, b"only object in its shard")
    os.close(fd)
    digest = blake3.blake3(b"only object in its shard").digest()
    assert content.publish(staged, digest)
    assert content.shard_dirs == 2
    content.delete(digest)
    assert content.shard_dirs == 0
    assert list(content.objects_dir.iterdir()) == []


def test_empty_shard_directories_of_an_older_store_are_removed_on_open(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "store")
    content.create_dirs()
    for first in ("ab", "cd"):
        (content.objects_dir / first / "ef").mkdir(parents=True)
    (content.objects_dir / "cd" / "ef" / ("cdef" + "0" * 60)).write_bytes(b"")
    assert content.scan() == 2  # ab/ef and ab; cd/ef still holds a file
    assert content.shard_dirs == 2
    assert sorted(p.name for p in content.objects_dir.iterdir()) == ["cd"]


def test_totals_saved_by_an_older_version_or_for_other_blocks_are_recounted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mithril.db"
    index = Index.open(path, block_size=4096)
    with index.transaction():
        for i, size in enumerate((1, 4096, 5000)):
            node = index.make_node(SUPER_ROOT, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
            index.set_content(node.id, bytes([i + 1]) * 32, size, 0)
    assert index.allocated_bytes == 4096 + 4096 + 8192
    index.close()

    # Totals in the format of before allocated_bytes: recounted, not trusted.
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='9101,3,9101' WHERE key='totals'")
    db.commit()
    db.close()
    index = Index.open(path, block_size=4096)
    assert index.allocated_bytes == 16384
    index.close()  # saves them in the current format

    # Saved on a filesystem with 4 KiB blocks, opened where blocks are 64 KiB.
    reopened = Index.open(path, block_size=65536)
    assert reopened.allocated_bytes == 3 * 65536
    assert reopened.stored_bytes == 1 + 4096 + 5000
    reopened.close()
