"""A corrupt object is never served: it becomes a miss and the compiler rebuilds it.

Objects are verified against their blake3 name the first time each is opened
after a mount.  These tests damage object files behind the daemon's back
(between mounts, as a disk or an operator would) and check that the bytes
never reach a reader, that the event is logged and counted, and that the
entry is dropped so the next compile starts from a miss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.conftest import wait_for
from tests.test_compilers import WORKLOADS, cache_env, run_workload


def object_path(store: Path, content: bytes) -> Path:
    hexname = blake3.blake3(content).hexdigest()
    return store / "objects" / hexname[:2] / hexname[2:4] / hexname


def stats_json(mount) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "mithrilfs", "stats", "--store", str(mount.store), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary: dict[str, Any] = json.loads(out)
    return summary


def damage(path: Path, how: str) -> None:
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    if how == "bitflip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bitflip", "truncate"])
def test_damaged_object_is_never_served(mount, how: str) -> None:
    entry = mount / "triton" / "KEY"
    entry.mkdir()
    good = b"cubin bytes " * 1000
    (entry / "k.cubin").write_bytes(good)
    (entry / "__grp__k.json").write_bytes(b'{"child_paths": {}}')
    mount.stop()
    damage(object_path(mount.store, good), how)
    mount.start()

    with pytest.raises(FileNotFoundError):
        (entry / "k.cubin").read_bytes()
    # The whole entry went, group file included: a miss, never half an entry.
    # (The kernel is told asynchronously, so its cached name goes a moment later.)
    wait_for(lambda: not entry.exists(), 10, "the dropped entry's name to vanish")
    assert "does not match its hash" in mount.log_text()
    wait_for(lambda: stats_json(mount)["integrity_failures"] == 1, 10, "integrity counter")
    assert not object_path(mount.store, good).exists()
    # The mount keeps serving, and the name can be written again.
    entry.mkdir(exist_ok=True)
    (entry / "k.cubin").write_bytes(good)
    assert (entry / "k.cubin").read_bytes() == good


def test_deleted_object_file_is_a_miss(mount) -> None:
    content = b"inductor code " * 500
    path = mount / "inductor" / "ab"
    path.mkdir()
    (path / "cabc.py").write_bytes(content)
    mount.stop()
    object_path(mount.store, content).unlink()
    mount.start()
    with pytest.raises(FileNotFoundError):
        (path / "cabc.py").read_bytes()
    wait_for(lambda: not (path / "cabc.py").exists(), 10, "the dropped file's name to vanish")


def test_dedup_shares_the_verdict(mount) -> None:
    """Identical content under two entries: damage drops both, serves neither."""
    content = b"shared ptx " * 300
    for key in ("A", "B"):
        (mount / "triton" / key).mkdir()
        (mount / "triton" / key / "k.ptx").write_bytes(content)
    mount.stop()
    damage(object_path(mount.store, content), "bitflip")
    mount.start()
    with pytest.raises(FileNotFoundError):
        (mount / "triton" / "A" / "k.ptx").read_bytes()
    other = mount / "triton" / "B" / "k.ptx"
    wait_for(lambda: not other.exists(), 10, "the other entry's name to vanish")


@pytest.mark.compilers
def test_triton_rebuilds_after_a_corrupt_cubin(mount) -> None:
    env = cache_env(mount.mountpoint)
    first = run_workload(WORKLOADS / "triton_kernel.py", env, "--arch", "90")
    assert first["cache_hit"] is False
    cubin = next(
        mount.mountpoint / "triton" / path
        for name, path in first["group_files"].items()
        if name.endswith(".cubin")
    )
    good = cubin.read_bytes()
    mount.stop()
    damage(object_path(mount.store, good), "bitflip")
    mount.start()

    second = run_workload(WORKLOADS / "triton_kernel.py", env, "--arch", "90")
    # Never served the damaged cubin: a miss, compiled again, same result.
    assert second["cache_hit"] is False
    assert second["asm"] == first["asm"]
    third = run_workload(WORKLOADS / "triton_kernel.py", env, "--arch", "90")
    assert third["cache_hit"] is True
