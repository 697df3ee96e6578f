"""Read-only mounts: serve hits, refuse every change with EROFS.

For untrusted jobs (CI, shared nodes) that may use a cache only trusted jobs
fill.  A miss on a bare read-only mount fails in both compilers (they must
write their output somewhere); the remedy shown here is an overlay with a
private upper directory, so hits come from mithrilfs and misses compile into
the job's own directory, never into the shared store.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_compilers import (
    TORCH_MLP,
    assert_cold,
    assert_warm,
    cache_env,
    compile_triton,
    run_workload,
)


def object_count(store: Path) -> int:
    return sum(len(files) for _dir, _dirs, files in os.walk(store / "objects"))


@pytest.fixture
def filled(make_mount):
    """A mount with one file and one directory, remounted read-only."""
    mount = make_mount()
    (mount / "triton" / "k").mkdir()
    (mount / "triton" / "k" / "a.cubin").write_bytes(b"cubin")
    mount.remount("--read-only")
    return mount


def write_existing(root: Path) -> None:
    fd = os.open(root / "triton" / "k" / "a.cubin", os.O_WRONLY)
    try:
        os.write(fd, b"y")
    finally:
        os.close(fd)


def open_truncating(root: Path) -> None:
    os.close(os.open(root / "triton" / "k" / "a.cubin", os.O_WRONLY | os.O_TRUNC))


WRITES: dict[str, Callable[[Path], object]] = {
    "create": lambda root: (root / "triton" / "new").write_bytes(b"x"),
    "mkdir": lambda root: (root / "triton" / "d").mkdir(),
    "write existing": write_existing,
    "open O_TRUNC": open_truncating,
    "truncate": lambda root: os.truncate(root / "triton" / "k" / "a.cubin", 0),
    "unlink": lambda root: os.unlink(root / "triton" / "k" / "a.cubin"),
    "rmdir": lambda root: os.rmdir(root / "triton" / "k"),
    "rename": lambda root: os.rename(root / "triton" / "k", root / "triton" / "k2"),
    "chmod": lambda root: os.chmod(root / "triton" / "k" / "a.cubin", 0o600),
    "utime": lambda root: os.utime(root / "triton" / "k" / "a.cubin", ns=(1, 1)),
    "symlink": lambda root: os.symlink("k", root / "triton" / "link"),
}


@pytest.mark.parametrize("operation", sorted(WRITES))
def test_every_change_is_erofs(filled, operation: str) -> None:
    before = object_count(filled.store)
    with pytest.raises(OSError, match="Read-only file system") as failure:
        WRITES[operation](filled.mountpoint)
    assert failure.value.errno == errno.EROFS
    assert (filled / "triton" / "k" / "a.cubin").read_bytes() == b"cubin"
    assert object_count(filled.store) == before


def test_existing_files_open_for_writing_without_writing(filled) -> None:
    """filelock opens existing lock files O_RDWR on every inductor hit."""
    from filelock import FileLock

    lock = filled / "triton" / "k" / "a.cubin"
    with FileLock(str(lock), timeout=5):
        assert lock.read_bytes() == b"cubin"


@pytest.mark.compilers
def test_torch_compile_hits_on_a_read_only_mount(mount) -> None:
    env = cache_env(mount.mountpoint)
    cold = run_workload(TORCH_MLP, env)
    assert_cold(cold, mount.mountpoint)
    mount.remount("--read-only")
    warm = run_workload(TORCH_MLP, env)
    assert_warm(warm, mount.mountpoint)
    assert warm["checksum"] == cold["checksum"]


@pytest.mark.compilers
def test_triton_hits_on_a_read_only_mount(mount) -> None:
    cold = compile_triton(mount.mountpoint, 90)
    assert cold["cache_hit"] is False, cold
    mount.remount("--read-only")
    warm = compile_triton(mount.mountpoint, 90)
    assert warm["cache_hit"] is True, warm
    assert warm["asm"] == cold["asm"]


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mount an overlay: the read-only mithrilfs mount below, a private dir on top."""
    mounted: list[Path] = []

    def make(lower: Path) -> Path:
        upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
        for directory in (upper, work, merged):
            directory.mkdir()
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={upper},workdir={work}",
                str(merged),
            ],
            check=True,
            capture_output=True,
        )
        mounted.append(merged)
        return merged

    yield make
    for merged in mounted:
        subprocess.run(["umount", "-l", str(merged)], check=False, capture_output=True)


@pytest.mark.compilers
def test_misses_compile_into_a_private_overlay(make_mount, overlay, tmp_path: Path) -> None:
    """Hits come from the shared store; misses land in the job's own directory."""
    mount = make_mount()
    shared = compile_triton(mount.mountpoint, 90)  # a trusted job fills the cache
    mount.remount("--read-only")
    before = object_count(mount.store)

    merged = overlay(mount.mountpoint)
    hit = compile_triton(merged, 90)
    assert hit["cache_hit"] is True
    assert hit["asm"] == shared["asm"]
    miss = compile_triton(merged, 80)  # not in the shared cache
    assert miss["cache_hit"] is False
    torch_run = run_workload(TORCH_MLP, cache_env(merged))
    assert torch_run["inductor"]["fxgraph_cache_miss"] > 0

    assert any((tmp_path / "upper" / "triton").iterdir())  # the private layer got them
    assert object_count(mount.store) == before  # the shared store did not
