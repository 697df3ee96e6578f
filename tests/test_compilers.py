"""Real compilers through real mounts: torch.compile (inductor, CPU) and triton.compile.

Every compile runs in a fresh interpreter (a workload script under
tests/workloads/) whose environment points the compiler caches into the
mount, so that nothing can be served from in-process memoisation: a second
process can only be fast because the files the first one left in the mount
are found again.  The workloads print one JSON line last on stdout with the
compilers' own view of what happened (inductor's cache counters, triton's
compilation listener).

Observed with torch 2.13 / triton 3.9 (see the notes on each test):
- inductor on CPU compiles ~11 C++ modules for a tiny MLP (most are the
  vector-ISA probes), each as .cpp + .so plus an empty lock file under
  ``locks/``; the hit path re-opens every one of those lock files O_RDWR and
  flocks it, then dlopens the .so files straight from the mount.
- inductor keeps its precompiled header (a ~150 MB .gch) under
  ``$TMPDIR/torchinductor_$USER/precompiled_headers`` whatever
  TORCHINDUCTOR_CACHE_DIR says, so that part never lands in the mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = Path(__file__).resolve().parent / "workloads"
TORCH_MLP = WORKLOADS / "torch_mlp.py"
TRITON_KERNEL = WORKLOADS / "triton_kernel.py"
WORKLOAD_TIMEOUT = 300

# Inherited settings that could redirect or bypass the caches.
_SCRUBBED_PREFIXES = ("TRITON_", "TORCHINDUCTOR_", "TORCH_COMPILE", "TORCHDYNAMO_", "MITHRILFS_")


def base_env(**extra: str) -> dict[str, str]:
    """This environment minus every compiler/cache setting, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.pop("TORCH_LOGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # `python` in job scripts is this interpreter.
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.update(extra)
    return env


def cache_env(mountpoint: Path, **extra: str) -> dict[str, str]:
    """Both cache variables pointing into *mountpoint*, the local FX graph cache forced on."""
    return base_env(
        TORCHINDUCTOR_CACHE_DIR=str(mountpoint / "inductor"),
        TRITON_CACHE_DIR=str(mountpoint / "triton"),
        TORCHINDUCTOR_FX_GRAPH_CACHE="1",
        TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE="0",
        # One compile process: no worker pool (the same speed on two cores, measured).
        TORCHINDUCTOR_COMPILE_THREADS="1",
        # Triton 3.9 warns on every compile unless this is set; keep its default.
        TRITON_DEFAULT_FP_FUSION="1",
        **extra,
    )


def run_json(command: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, Any]:
    """Run *command* in a fresh process; return the JSON on its last stdout line."""
    proc = subprocess.run(
        command,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=WORKLOAD_TIMEOUT,
        check=False,
    )
    detail = f"command: {shlex.join(command)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"exited with {proc.returncode}\n{detail}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output\n{detail}"
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(f"last stdout line is not JSON\n{detail}") from None
    result["_stderr"] = proc.stderr
    return result


def run_workload(script: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    return run_json([sys.executable, str(script), *args], env)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under *root*: relative path -> sha256 (or "dir")."""
    tree: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return tree


def describe_change(before: dict[str, str], after: dict[str, str]) -> str:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return f"added {added}, removed {removed}, changed {changed}"


def inductor_counts(result: dict[str, Any]) -> tuple[int, int]:
    counters = result["inductor"]
    return counters.get("fxgraph_cache_hit", 0), counters.get("fxgraph_cache_miss", 0)


def assert_cold(result: dict[str, Any], mountpoint: Path) -> None:
    hit, miss = inductor_counts(result)
    assert miss > 0, f"expected an FX graph cache miss: {result}"
    assert hit == 0, f"expected no FX graph cache hit: {result}"
    assert result["cache_dir"] == str(mountpoint / "inductor"), result
    assert result["env"]["TRITON_CACHE_DIR"] == str(mountpoint / "triton"), result


def assert_warm(result: dict[str, Any], mountpoint: Path) -> None:
    hit, miss = inductor_counts(result)
    assert hit > 0, f"expected an FX graph cache hit: {result}"
    assert miss == 0, f"expected no FX graph cache miss: {result}"
    aot = result["aot_autograd"]
    assert aot.get("autograd_cache_hit", 0) > 0, result
    assert aot.get("autograd_cache_miss", 0) == 0, result
    assert result["cache_dir"] == str(mountpoint / "inductor"), result


def assert_inductor_entries(inductor: Path) -> None:
    """What a cold CPU compile leaves: an FX graph entry, an AOTAutograd entry, kernels."""
    fxgraph = [p for p in (inductor / "fxgraph").rglob("*") if p.is_file()]
    aotautograd = [p for p in (inductor / "aotautograd").rglob("*") if p.is_file()]
    kernels = list(inductor.glob("*/*.so"))
    assert fxgraph, f"no FX graph entry in {inductor}: {sorted(snapshot(inductor))}"
    assert aotautograd, f"no AOTAutograd entry in {inductor}: {sorted(snapshot(inductor))}"
    assert kernels, f"no compiled kernel in {inductor}: {sorted(snapshot(inductor))}"


# -- 1. torch.compile through the cache variables -------------------------------


@pytest.mark.compilers
def test_torch_compile_second_process_hits(mount) -> None:
    env = cache_env(mount.mountpoint)
    inductor = mount / "inductor"

    cold = run_workload(TORCH_MLP, env)
    assert_cold(cold, mount.mountpoint)
    assert_inductor_entries(inductor)
    after_cold = snapshot(mount.mountpoint)

    warm = run_workload(TORCH_MLP, env)
    assert_warm(warm, mount.mountpoint)
    # Nothing compiled, nothing rewritten: the hit only read (and flocked) what was there.
    after_warm = snapshot(mount.mountpoint)
    assert after_warm == after_cold, describe_change(after_cold, after_warm)
    assert warm["checksum"] == cold["checksum"]


# -- 2. triton.compile for sm90 without a GPU ----------------------------------------


def compile_triton(mountpoint: Path, arch: int) -> dict[str, Any]:
    return run_workload(TRITON_KERNEL, cache_env(mountpoint), "--arch", str(arch))


@pytest.mark.compilers
def test_triton_compile_second_process_hits(mount) -> None:
    triton_dir = mount / "triton"
    cold = compile_triton(mount.mountpoint, 90)
    assert cold["cache_hit"] is False, cold
    assert cold["cache_dir"] == str(triton_dir)
    assert set(cold["asm"]) >= {"source", "ttir", "ttgir", "llir", "ptx", "cubin"}, cold
    assert cold["cubin_size"] > 0
    for relative in cold["group_files"].values():
        assert (triton_dir / relative).is_file(), relative
    groups = list(triton_dir.glob("*/__grp__add_kernel.json"))
    assert len(groups) == 1, sorted(snapshot(triton_dir))
    after_cold = snapshot(mount.mountpoint)

    warm = compile_triton(mount.mountpoint, 90)
    assert warm["cache_hit"] is True, warm
    assert warm["hash"] == cold["hash"]
    assert warm["asm"] == cold["asm"], "the cached ptx/cubin differ from what was compiled"
    assert warm["group_files"] == cold["group_files"]
    after_warm = snapshot(mount.mountpoint)
    assert after_warm == after_cold, describe_change(after_cold, after_warm)


@pytest.mark.compilers
def test_concurrent_cold_triton_compiles_agree(mount) -> None:
    """Three processes race to publish the same kernel (os.replace onto each other's files)."""
    env = cache_env(mount.mountpoint)
    command = [sys.executable, str(TRITON_KERNEL), "--arch", "90"]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    # Wait for all of them before judging any, so none outlives the mount.
    outputs = [proc.communicate(timeout=WORKLOAD_TIMEOUT) for proc in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"exited with {proc.returncode}\nstderr:\n{err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({json.dumps(r["asm"], sort_keys=True) for r in results}) == 1, results

    warm = compile_triton(mount.mountpoint, 90)
    assert warm["cache_hit"] is True, warm
    assert warm["asm"] == results[0]["asm"]
    keys = [p.name for p in (mount / "triton").iterdir()]
    assert keys == [Path(next(iter(warm["group_files"].values()))).parts[0]], keys
    leftovers = [p for p in (mount / "triton").rglob("*") if "tmp" in p.name]
    assert not leftovers, leftovers


# -- 4. the in-process hook ------------------------------------------------------------


@pytest.mark.compilers
def test_hook_activate_then_torch_compile_hits(mount) -> None:
    # Only the hook says where the caches are: no cache variable is inherited.
    env = base_env(TORCHINDUCTOR_COMPILE_THREADS="1")
    activate = ("--activate", str(mount.mountpoint))

    cold = run_workload(TORCH_MLP, env, *activate)
    assert_cold(cold, mount.mountpoint)
    assert_inductor_entries(mount / "inductor")
    after_cold = snapshot(mount.mountpoint)

    warm = run_workload(TORCH_MLP, env, *activate)
    assert_warm(warm, mount.mountpoint)
    after_warm = snapshot(mount.mountpoint)
    assert after_warm == after_cold, describe_change(after_cold, after_warm)
    assert warm["checksum"] == cold["checksum"]


# -- 5. a job script that only evals `mithrilfs env` -------------------------------------


@pytest.mark.compilers
def test_job_script_with_env_eval_hits(mount, tmp_path: Path) -> None:
    job = tmp_path / "job.sh"
    job.write_text(
        "#!/usr/bin/env bash\n"
        "set -euo pipefail\n"
        f'eval "$(python -m mithrilfs env {shlex.quote(str(mount.mountpoint))})"\n'
        f"exec python {shlex.quote(str(TORCH_MLP))}\n"
    )
    # Defaults for everything else, compile worker pool included.
    env = base_env()

    cold = run_json(["bash", str(job)], env, cwd=tmp_path)
    assert_cold(cold, mount.mountpoint)
    assert_inductor_entries(mount / "inductor")

    warm = run_json(["bash", str(job)], env, cwd=tmp_path)
    assert_warm(warm, mount.mountpoint)
    assert warm["checksum"] == cold["checksum"]


# -- 6. the mount root ---------------------------------------------------------------------


def test_root_has_layout_dirs_and_accepts_others(mount) -> None:
    root = mount.mountpoint
    names = set(os.listdir(root))
    assert {"triton", "inductor"} <= names, names
    for layout in ("triton", "inductor"):
        assert (root / layout).is_dir()
        assert os.listdir(root / layout) == []

    (root / "datasets").mkdir()
    (root / "datasets" / "notes.txt").write_bytes(b"mine")
    (root / "tool" / "sub").mkdir(parents=True)
    assert {"triton", "inductor", "datasets", "tool"} <= set(os.listdir(root))

    # The layout directories are there on every mount, even after a user removed one
    # (whether removing it is allowed at all is not this test's business).
    with contextlib.suppress(OSError):
        (root / "triton").rmdir()
    mount.remount()
    assert {"triton", "inductor", "datasets", "tool"} <= set(os.listdir(root))
    assert (root / "triton").is_dir()
    assert (root / "datasets" / "notes.txt").read_bytes() == b"mine"
    assert (root / "tool" / "sub").is_dir()
