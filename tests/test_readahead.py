"""The mount's readahead window (`--readahead`, fstab `readahead=`).

A root daemon sets it once it serves, so that a big artifact (an AOTInductor
package, a large .so) reaches the daemon in few large READ requests instead
of one per 128 KiB.  The effect is counted at the daemon: the mount runs
under scripts/bench_workloads/counting_daemon.py, which wraps the unmodified
handlers with counters.  A bad value is one line and exit 2; a daemon that
may not set the window says so and serves anyway.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

import pytest
import trio

from mithrilfs.daemon import DEFAULT_READAHEAD, widen_readahead
from mithrilfs.mounts import readahead
from tests.conftest import REPO, Mount, MountFactory, as_nobody, run_cli, wait_for

COUNTING_DAEMON = REPO / "scripts" / "bench_workloads" / "counting_daemon.py"
KiB = 1024
MiB = 1024 * KiB
# The kernel's own window for a FUSE mount, and the largest READ libfuse 3
# negotiates (max_pages 256).
KERNEL_DEFAULT = 128 * KiB
LARGEST_READ = 1 * MiB
ARTIFACT = 16 * MiB


def wait_for_window(mount: Mount, size: int) -> None:
    """The daemon sets the window just after it answered the kernel's INIT."""
    wait_for(
        lambda: readahead(mount.mountpoint) == size,
        10,
        f"a readahead window of {size} bytes",
        alive=lambda: mount.proc is not None and mount.proc.poll() is None,
    )


def test_a_root_daemon_sets_the_default_window(mount: Mount) -> None:
    assert DEFAULT_READAHEAD > KERNEL_DEFAULT
    wait_for_window(mount, DEFAULT_READAHEAD)
    assert "readahead window left" not in mount.log_text()


@pytest.mark.parametrize(
    ("options", "window"),
    [
        (["--readahead", "1M"], 1 * MiB),
        (["-o", "readahead=512K"], 512 * KiB),
        (["--readahead", "6000"], 4 * KiB),  # whole pages
    ],
)
def test_the_window_is_what_the_option_says(
    make_mount: MountFactory, options: list[str], window: int
) -> None:
    mount = make_mount(*options)
    wait_for_window(mount, window)
    mount.remount()  # a new mount has a window of its own: set again
    wait_for_window(mount, window)


def counted_reads(mount: Mount, counts: Path) -> int:
    """READ requests since the last call (the counting daemon then starts from zero)."""
    counts.unlink(missing_ok=True)
    assert mount.proc is not None
    mount.proc.send_signal(signal.SIGUSR2)
    wait_for(counts.exists, 10, "the counting daemon's counts")
    answered: dict[str, list[int]] = json.loads(counts.read_text())
    return answered.get("read", [0])[0]


def read_through(path: Path) -> bytes:
    """Read *path* start to end in 1 MiB reads, as a loader or torch.load would."""
    chunks = []
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(LARGEST_READ):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("options", "window", "most", "fewest"),
    [
        # The kernel's own window: one READ per 128 KiB.
        (
            ["--readahead", "128K"],
            KERNEL_DEFAULT,
            ARTIFACT // KERNEL_DEFAULT,
            ARTIFACT // KERNEL_DEFAULT,
        ),
        # The default: READs as large as libfuse lets them be.
        ([], DEFAULT_READAHEAD, ARTIFACT // LARGEST_READ + 1, ARTIFACT // LARGEST_READ),
    ],
)
def test_a_big_artifact_is_read_in_requests_as_large_as_the_window(
    make_mount: MountFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    window: int,
    most: int,
    fewest: int,
) -> None:
    counts = tmp_path / "counts.json"
    monkeypatch.setenv("MITHRILFS_COUNTS", os.fspath(counts))
    monkeypatch.setenv("PYTHONPATH", os.fspath(REPO))
    mount = make_mount(start=False)
    mount.launcher = [sys.executable, os.fspath(COUNTING_DAEMON)]
    mount.start(*options)
    artifact = mount / "inductor" / "ab" / "model.so"
    artifact.parent.mkdir(parents=True)
    content = os.urandom(ARTIFACT)
    artifact.write_bytes(content)
    # A new mount: nothing of the file in the kernel's page cache.
    mount.remount()
    wait_for_window(mount, window)
    counted_reads(mount, counts)

    assert read_through(artifact) == content
    reads = counted_reads(mount, counts)
    assert fewest <= reads <= most, reads


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--readahead", "0"], "invalid size '0'"),
        (["--readahead", "1K"], "invalid readahead '1K': must be between 4K and 256M"),
        (["--readahead", "1G"], "invalid readahead '1G': must be between 4K and 256M"),
        (["-o", "readahead=wide"], "invalid size 'wide'"),
    ],
)
def test_bad_readahead_is_refused_before_anything_is_touched(
    tmp_path: Path, options: list[str], message: str
) -> None:
    store = tmp_path / "store"
    (tmp_path / "mnt").mkdir()
    result = run_cli("mount", tmp_path / "mnt", "--store", store, *options)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"mithrilfs: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not store.exists()


def test_a_daemon_that_may_not_set_the_window_says_so(
    make_mount: MountFactory, traversable_tmp: None
) -> None:
    """Only root may write the window; an unprivileged daemon logs that and goes on.

    nobody (uid 65534, in a forked child: `as_nobody`) does on the mount what
    a daemon of that user does on its own.
    """
    mount = make_mount("--allow-other", "--readahead", "256K")
    wait_for_window(mount, 256 * KiB)

    def widen_as_nobody(out: TextIO) -> int:
        logger = logging.getLogger("mithrilfs")
        logger.addHandler(logging.StreamHandler(out))
        logger.setLevel(logging.INFO)
        trio.run(widen_readahead, mount.mountpoint, 8 * MiB)
        return 0

    code, message = as_nobody(widen_as_nobody)
    assert code == 0, message
    assert message.strip() == (
        "readahead window left at the kernel's default: only root may set it"
    )
    assert readahead(mount.mountpoint) == 256 * KiB
    assert (mount / "triton").is_dir()  # the mount serves on


def test_a_path_that_no_longer_leads_to_the_mount_is_not_followed(
    mount: Mount, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A root daemon writes the window of the mount it made, never of another
    filesystem that its mountpoint's path leads to after a swap."""
    wait_for_window(mount, DEFAULT_READAHEAD)
    via = tmp_path / "via"
    via.symlink_to(mount.mountpoint.parent)
    assert readahead(via / mount.mountpoint.name) == DEFAULT_READAHEAD  # the mount, so far
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / mount.mountpoint.name).mkdir(parents=True)
    disk = os.stat(elsewhere).st_dev
    disk_window = Path(f"/sys/class/bdi/{os.major(disk)}:{os.minor(disk)}/read_ahead_kb")
    before = disk_window.read_text() if disk_window.exists() else None
    via.unlink()
    via.symlink_to(elsewhere)

    try:
        with caplog.at_level(logging.INFO, logger="mithrilfs"):
            # A size neither window has, so that a write to either would show.
            trio.run(widen_readahead, via / mount.mountpoint.name, 12 * MiB)
        assert "no longer leads to this mithrilfs mount" in caplog.text
        assert (disk_window.read_text() if disk_window.exists() else None) == before
    finally:
        if before is not None and disk_window.read_text() != before:
            disk_window.write_text(before)  # the host's own disk: put it back
    assert readahead(mount.mountpoint) == DEFAULT_READAHEAD
