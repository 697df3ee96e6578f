"""Sustained load: 16 processes compile, publish and read Triton entries on one mount.

For MITHRILFS_LOAD_SECONDS (45 by default, to fit the suite's budget; the
issue asks for minutes, which is this test with a larger value), sixteen
forked processes share one mount:
  - 4 run the real ``triton.compile`` (CUDA sm90 target, no GPU needed) on a
    few kernels whose constexprs give a key space that grows over time, so
    that cold compiles keep happening, often of the same key in several
    processes at once, while the rest are hits served from the mount;
  - 6 publish entries with Triton's own ``FileCacheManager`` (each file into
    a ``tmp.pid_*`` directory, then ``os.replace``; the group file last),
    for keys that other processes publish too, after a ``get_group`` miss;
  - 6 read entries with ``FileCacheManager.get_group``, the way Triton looks
    for a hit, and check every byte.
No process may see an error, a group whose files are missing, or bytes other
than the ones written for that name; every process that compiled a variant
must get the same key and the same cubin; and afterwards fsck must find the
store clean.  Throughput is printed.

The long form, MITHRILFS_LOAD_SECONDS=300 on two cores shared with other
work: 178,359 operations in 300 s (594/s: 32 files published/s, 360 files
read/s, 22.6 compiles/s of which 465 cold compiles and 6,323 hits), 416
kernel variants, 2,544 key directories, no error in any process, fsck
clean.  The 45 s form: about 840 operations/s.

The second test runs two stores on two mounts side by side.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from mithrilfs.mounts import find_mount
from tests.conftest import Mount

fork = multiprocessing.get_context("fork")

SECONDS = float(os.environ.get("MITHRILFS_LOAD_SECONDS", "45"))
COMPILERS, PUBLISHERS, READERS = 4, 6, 6
# A compile started just before the end may take a while on two busy cores.
JOIN_GRACE = 180.0

ENTRY_FILES = {"k.source": 2_000, "k.ttir": 6_000, "k.llir": 20_000, "k.ptx": 30_000}
CUBIN_SIZES = [8_000, 40_000, 300_000]


# -- what the publishers write: the same bytes for a key, whoever writes them --------


def key_for(index: int) -> str:
    return hashlib.sha256(f"load-key-{index}".encode()).hexdigest()[:52].upper()


def expected_bytes(key: str, name: str) -> bytes:
    seed = int(hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:16], 16)
    rng = random.Random(seed)
    size = rng.choice(CUBIN_SIZES) if name == "k.cubin" else ENTRY_FILES.get(name, 500)
    return rng.randbytes(size)


def available_keys(started: float) -> int:
    """Publisher keys grow with time (8 a second), so that misses keep happening."""
    return 8 + int((time.monotonic() - started) * 8)


# -- the processes ---------------------------------------------------------------------


class Worker:
    def __init__(self, kind: str, wid: int, cache_dir: Path, deadline: float) -> None:
        self.kind = kind
        self.wid = wid
        self.cache_dir = cache_dir
        self.deadline = deadline
        self.started = time.monotonic()
        self.rng = random.Random(wid * 7919 + 1)
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.variants: dict[str, list[str]] = {}

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{self.kind} {self.wid}: {message}")

    def run(self) -> None:
        os.environ["TRITON_CACHE_DIR"] = str(self.cache_dir)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        step = getattr(self, f"{self.kind}_step")
        while time.monotonic() < self.deadline:
            try:
                step()
            except Exception:
                self.error(traceback.format_exc())
                self.counts["errors"] += 1

    # Triton itself: compile or hit.
    def compiler_step(self) -> None:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget

        if not hasattr(self, "kernels"):

            @triton.jit
            def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, K: tl.constexpr):
                offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
                mask = offsets < n
                x = tl.load(x_ptr + offsets, mask=mask)
                y = tl.load(y_ptr + offsets, mask=mask)
                tl.store(out_ptr + offsets, x + y + K, mask=mask)

            @triton.jit
            def scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, K: tl.constexpr):
                offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
                mask = offsets < n
                tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * K, mask=mask)

            self.kernels = {
                "add": (add_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32"}),
                "scale": (scale_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32"}),
            }
            self.target = GPUTarget("cuda", 90, 32)
            triton.knobs.compilation.listener = self.listen
            assert triton.knobs.cache.dir == str(self.cache_dir)

        name = self.rng.choice(sorted(self.kernels))
        block = self.rng.choice([64, 128, 256])
        # One new K every 4 seconds, drawn by every compiler: overlapping cold compiles.
        k = self.rng.randrange(1 + int((time.monotonic() - self.started) / 4))
        fn, pointers = self.kernels[name]
        source = triton.compiler.ASTSource(
            fn=fn,
            signature={**pointers, "n": "i32", "BLOCK": "constexpr", "K": "constexpr"},
            constexprs={"BLOCK": block, "K": k},
        )
        kernel = triton.compile(source, target=self.target)
        cubin = hashlib.sha256(kernel.asm["cubin"]).hexdigest()
        variant = f"{name}/{block}/{k}"
        seen = self.variants.setdefault(variant, [kernel.hash, cubin])
        if seen != [kernel.hash, cubin]:
            self.error(f"{variant}: got {kernel.hash} {cubin}, earlier {seen}")

    def listen(self, *, src, metadata, metadata_group, times, cache_hit):
        self.counts["compile hits" if cache_hit else "cold compiles"] += 1

    # Triton's FileCacheManager, driven like triton.compile drives it.
    def publisher_step(self) -> None:
        from triton.runtime.cache import FileCacheManager

        key = key_for(self.rng.randrange(available_keys(self.started)))
        cache = FileCacheManager(key)
        if self.check_group(cache, key) is not None:
            return
        group = {}
        for name in [*ENTRY_FILES, "k.cubin"]:
            group[name] = cache.put(expected_bytes(key, name), name)
            self.counts["files published"] += 1
        cache.put_group("k.json", group)
        self.counts["groups published"] += 1

    def reader_step(self) -> None:
        from triton.runtime.cache import FileCacheManager

        if self.rng.random() < 0.7:
            key = key_for(self.rng.randrange(available_keys(self.started)))
            self.check_group(FileCacheManager(key), key)
            return
        # A compiled kernel's entry: any key directory with a group file.
        keys = os.listdir(self.cache_dir)
        self.counts["listings"] += 1
        key = self.rng.choice(keys)
        try:
            names = [n for n in os.listdir(self.cache_dir / key) if n.startswith("__grp__")]
        except FileNotFoundError:
            return
        if not names or names[0] == "__grp__k.json":
            return
        cache = FileCacheManager(key)
        group = cache.get_group(names[0].removeprefix("__grp__"))
        if group is None:
            self.error(f"{key}/{names[0]} exists, but get_group found it incomplete")
            return
        for path in group.values():
            Path(path).read_bytes()
            self.counts["files read"] += 1
        json.loads(Path(group[names[0].removeprefix("__grp__")]).read_bytes())
        self.counts["kernel hits"] += 1

    def check_group(self, cache: Any, key: str) -> dict[str, str] | None:
        """Triton's hit path, with every byte checked; None on a miss."""
        present = os.path.exists(os.path.join(cache.cache_dir, "__grp__k.json"))
        group: dict[str, str] | None = cache.get_group("k.json")
        self.counts["group lookups"] += 1
        if group is None:
            if present:
                self.error(f"{key}: the group file exists, but get_group found it incomplete")
            return None
        if sorted(group) != sorted([*ENTRY_FILES, "k.cubin"]):
            self.error(f"{key}: group names {sorted(group)}")
        for name, path in group.items():
            if Path(path).read_bytes() != expected_bytes(key, name):
                self.error(f"{path}: not the bytes written for {key}/{name}")
            self.counts["files read"] += 1
        self.counts["group hits"] += 1
        return group


def worker_main(kind: str, wid: int, cache_dir: Path, deadline: float, result: Path) -> None:
    worker = Worker(kind, wid, cache_dir, deadline)
    try:
        worker.run()
    except BaseException:
        worker.error(traceback.format_exc())
    finally:
        result.write_text(
            json.dumps(
                {"counts": worker.counts, "errors": worker.errors, "variants": worker.variants}
            )
        )
        os._exit(0)


def test_sixteen_processes_compile_publish_and_read(tmp_path: Path) -> None:
    mount = Mount(tmp_path / "mnt", tmp_path / "store", tmp_path / "daemon.log")
    mount.mountpoint.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    procs: list[Any] = []
    try:
        mount.start()
        cache_dir = mount.mountpoint / "triton"
        started = time.monotonic()
        deadline = started + SECONDS
        kinds = ["compiler"] * COMPILERS + ["publisher"] * PUBLISHERS + ["reader"] * READERS
        for wid, kind in enumerate(kinds):
            proc = fork.Process(
                target=worker_main,
                args=(kind, wid, cache_dir, deadline, results / f"{wid}.json"),
            )
            proc.start()
            procs.append(proc)
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()) + JOIN_GRACE)
            assert proc.exitcode == 0, f"worker {proc.pid} exited with {proc.exitcode}"
        elapsed = time.monotonic() - started
        entries = len(os.listdir(cache_dir))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        try:
            mount.stop()
        finally:
            if find_mount(mount.mountpoint) is not None:
                subprocess.run(["fusermount3", "-uz", str(mount.mountpoint)], check=False)

    counts: Counter[str] = Counter()
    errors: list[str] = []
    variants: dict[str, set[tuple[str, ...]]] = {}
    for path in sorted(results.iterdir()):
        result = json.loads(path.read_text())
        counts.update(result["counts"])
        errors.extend(result["errors"])
        for variant, seen in result["variants"].items():
            variants.setdefault(variant, set()).add(tuple(seen))
    assert not errors, "\n".join(errors)
    disagreeing = {v: sorted(seen) for v, seen in variants.items() if len(seen) > 1}
    assert not disagreeing, f"processes compiled different kernels for one variant: {disagreeing}"
    mount.assert_consistent()
    assert "Traceback" not in mount.log_text(), mount.log_text()
    # The workload really ran both paths of each kind.
    for what in ("cold compiles", "compile hits", "groups published", "group hits", "kernel hits"):
        assert counts[what] > 0, f"no {what}: {dict(counts)}"

    operations = sum(n for what, n in counts.items() if what != "errors")
    print(
        f"\nload: {len(kinds)} processes for {elapsed:.0f}s: {operations} operations, "
        f"{operations / elapsed:.0f} ops/s ({counts['files published'] / elapsed:.1f} files "
        f"published/s, {counts['files read'] / elapsed:.0f} files read/s, "
        f"{(counts['cold compiles'] + counts['compile hits']) / elapsed:.2f} compiles/s); "
        f"{len(variants)} kernel variants, {entries} key directories; "
        + ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    )


# -- one store, one daemon; two stores, two daemons ----------------------------------
# (A second mount of a store that is already served is refused: test_cli.py,
# test_store_already_served_by_another_daemon.)


def test_two_stores_on_two_mounts_side_by_side(make_mount: Any) -> None:
    first = make_mount(name="first")
    second = make_mount(name="second")
    assert first.store != second.store
    entries = map(find_mount, (first.mountpoint, second.mountpoint))
    sources = {entry.source if entry else None for entry in entries}
    assert sources == {str(first.store), str(second.store)}

    for mount, label in ((first, b"first"), (second, b"second")):
        key = mount / "triton" / "SAMEKEY"
        key.mkdir()
        (key / "k.cubin").write_bytes(label * 1000)
        (mount / "triton" / f"only-{label.decode()}").write_bytes(label)
    for mount, label, other in ((first, b"first", "second"), (second, b"second", "first")):
        assert (mount / "triton" / "SAMEKEY" / "k.cubin").read_bytes() == label * 1000
        assert sorted(os.listdir(mount / "triton")) == ["SAMEKEY", f"only-{label.decode()}"]
        assert not (mount / "triton" / f"only-{other}").exists()

    # Unmounting one leaves the other serving.
    first.stop()
    assert find_mount(first.mountpoint) is None
    assert (second / "triton" / "SAMEKEY" / "k.cubin").read_bytes() == b"second" * 1000
    second.stop()
    for mount in (first, second):
        mount.assert_consistent()
