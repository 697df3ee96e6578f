"""One store, several device classes: separate trees, shared content.

A mount serves the tree of one device class (``--device-class``); the
objects underneath are shared, so a file whose bytes are the same for two
classes is stored once.  Triton 3.9 compiling the same kernel for sm80 and
sm90 writes some artifacts that do not depend on the target (the ``.source``
and ``.ttir`` stages, and for this kernel the ``.llir`` too) and others that
do (``.ttgir``, ``.ptx``, ``.cubin``, ``.json``); the test finds out which
from the compiler's output instead of assuming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs.repository import Repository

REPO = Path(__file__).resolve().parent.parent
TRITON_KERNEL = Path(__file__).resolve().parent / "workloads" / "triton_kernel.py"
_SCRUBBED_PREFIXES = ("TRITON_", "TORCHINDUCTOR_", "TORCH_COMPILE", "TORCHDYNAMO_", "MITHRILFS_")


def compile_triton(mountpoint: Path, arch: int) -> dict[str, Any]:
    """triton.compile the workload's kernel for sm<arch> in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["TRITON_CACHE_DIR"] = str(mountpoint / "triton")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    command = [sys.executable, str(TRITON_KERNEL), "--arch", str(arch)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\nstderr:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def read_artifacts(mountpoint: Path, result: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of each artifact file the compile named, by stage (source, ttir, ...)."""
    triton_dir = mountpoint / "triton"
    return {
        name.rsplit(".", 1)[1]: (triton_dir / relative).read_bytes()
        for name, relative in result["group_files"].items()
    }


def test_each_class_sees_only_its_own_tree(make_mount) -> None:
    mount = make_mount("--device-class", "cuda-sm80")
    (mount / "triton" / "K80").mkdir()
    (mount / "triton" / "K80" / "kernel.cubin").write_bytes(b"sm80 code")
    (mount / "inductor" / "only-sm80").write_bytes(b"x")

    mount.remount("--device-class", "cuda-sm90")
    assert os.listdir(mount / "triton") == []
    assert os.listdir(mount / "inductor") == []
    assert not (mount / "triton" / "K80").exists()
    (mount / "triton" / "K90").mkdir()
    (mount / "triton" / "K90" / "kernel.cubin").write_bytes(b"sm90 code")

    mount.remount("--device-class", "cuda-sm80")
    assert os.listdir(mount / "triton") == ["K80"]
    assert (mount / "triton" / "K80" / "kernel.cubin").read_bytes() == b"sm80 code"
    assert (mount / "inductor" / "only-sm80").read_bytes() == b"x"
    assert not (mount / "triton" / "K90").exists()

    mount.remount("--device-class", "cuda-sm90")
    assert os.listdir(mount / "triton") == ["K90"]
    assert (mount / "triton" / "K90" / "kernel.cubin").read_bytes() == b"sm90 code"


@pytest.mark.compilers
def test_two_classes_store_identical_artifacts_once(make_mount) -> None:
    mount = make_mount("--device-class", "cuda-sm80")
    sm80 = compile_triton(mount.mountpoint, 80)
    assert sm80["cache_hit"] is False, sm80
    sm80_files = read_artifacts(mount.mountpoint, sm80)
    sm80_keys = os.listdir(mount / "triton")

    mount.remount("--device-class", "cuda-sm90")
    assert os.listdir(mount / "triton") == [], "the sm80 tree leaked into the sm90 mount"
    sm90 = compile_triton(mount.mountpoint, 90)
    assert sm90["cache_hit"] is False, sm90
    sm90_files = read_artifacts(mount.mountpoint, sm90)
    assert sm90["hash"] != sm80["hash"]
    assert not set(os.listdir(mount / "triton")) & set(sm80_keys)

    # Back on sm80: its kernel is still a hit there.
    mount.remount("--device-class", "cuda-sm80")
    again = compile_triton(mount.mountpoint, 80)
    assert again["cache_hit"] is True, again
    assert again["asm"] == sm80["asm"]
    mount.stop()

    assert sm80_files.keys() == sm90_files.keys()
    same = sorted(stage for stage in sm80_files if sm80_files[stage] == sm90_files[stage])
    different = sorted(stage for stage in sm80_files if sm80_files[stage] != sm90_files[stage])
    # The frontend stages do not depend on the target; the machine code does.
    assert {"source", "ttir"} <= set(same), (same, different)
    assert {"ptx", "cubin"} <= set(different), (same, different)

    repo = Repository.open(mount.store, create=False)
    try:
        db = repo.index.db
        for stage in same:
            digest = blake3.blake3(sm80_files[stage]).digest()
            users = db.execute("SELECT count(*) FROM inodes WHERE object=?", (digest,)).fetchone()
            rows = db.execute(
                "SELECT count(*), max(refcount) FROM objects WHERE hash=?", (digest,)
            ).fetchone()
            assert users[0] == 2, f"{stage}: {users[0]} inodes refer to its object"
            assert tuple(rows) == (1, 2), f"{stage}: objects rows (count, refcount) = {rows}"
            assert repo.content.object_path(digest).is_file(), stage
        for stage in different:
            for files in (sm80_files, sm90_files):
                digest = blake3.blake3(files[stage]).digest()
                refcount = db.execute(
                    "SELECT refcount FROM objects WHERE hash=?", (digest,)
                ).fetchone()
                assert refcount == (1,), f"{stage}: refcount {refcount}"
    finally:
        repo.close()

    proc = subprocess.run(
        [sys.executable, "-m", "mithrilfs", "classes", "--store", str(mount.store), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    usage = {entry["name"]: entry for entry in json.loads(proc.stdout)}
    assert {"cuda-sm80", "cuda-sm90"} <= usage.keys(), usage
    for name in ("cuda-sm80", "cuda-sm90"):
        # add_kernel.{source,ttir,ttgir,llir,ptx,cubin,json} + __grp__add_kernel.json
        assert usage[name]["files"] >= len(sm80_files) + 1, usage
        assert usage[name]["bytes"] > 0, usage
