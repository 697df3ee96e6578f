"""Which FUSE requests each benchmark pass sends, and what each costs in the daemon.

    .venv/bin/python scripts/bench_workloads/request_profile.py [--files N] [--json OUT]
                                                               [--no-compilers]

Mounts a fresh store with counting_daemon.py (the unmodified daemon with a
counter and timer around every request handler), runs the passes of
scripts/bench.py's tree workload one at a time (and a torch.compile /
triton.compile warm run), and prints per pass: client operations, client
time per operation, and for each request type the number of requests per
client operation and the daemon's handler time per request.  The difference
between the client's time and the handler time is what the kernel, libfuse,
pyfuse3 and trio add per request (the daemon is single-threaded).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.fspath(HERE.parent))

import bench  # noqa: E402  (scripts/bench.py)


class Counter:
    def __init__(self, mount: bench.Mount, path: Path) -> None:
        self.mount = mount
        self.path = path

    def snapshot(self) -> dict[str, list[int]]:
        """Counts since the last snapshot (and start counting from zero)."""
        self.path.unlink(missing_ok=True)
        assert self.mount.pid is not None
        os.kill(self.mount.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the counting daemon did not answer SIGUSR2")
            time.sleep(0.005)
        counts: dict[str, list[int]] = json.loads(self.path.read_text())
        return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-compilers", action="store_true")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="mithrilfs-reqprof-"))
    rows: list[dict[str, object]] = []
    counts_file = base / "counts.json"
    mount = bench.Mount(
        base,
        "prof",
        entry=[os.fspath(HERE / "counting_daemon.py")],
        env={"MITHRILFS_COUNTS": os.fspath(counts_file)},
    )
    counter = Counter(mount, counts_file)

    def measure(label: str, ops: int, fn: Callable[[], object]) -> None:
        counter.snapshot()
        t0 = time.perf_counter_ns()
        fn()
        elapsed = time.perf_counter_ns() - t0
        time.sleep(0.2)  # RELEASE and FORGET arrive after the syscall returns
        counts = counter.snapshot()
        rows.append({"pass": label, "ops": ops, "client_ns": elapsed, "requests": counts})
        print_row(rows[-1])

    try:
        src = base / "src"
        files = bench.tree_spec(args.files)
        bench.write_tree(src, files)
        libs = bench.build_libs(base, 4)
        lib_rels = []
        rng = random.Random(3)
        for lib in libs:
            leaf = rng.randbytes(32).hex()
            rel = f"{leaf[:2]}/{leaf}/{lib.name}"
            (src / rel).parent.mkdir(parents=True)
            shutil.copy2(lib, src / rel)
            lib_rels.append(rel)
        rels = [rel for rel, _ in files]
        small = [rel for rel, size in files if size <= bench.SMALL_FILE]
        mount.start()
        tree = mount.mountpoint / "inductor" / "tree"
        measure("populate (copytree)", len(rels), lambda: shutil.copytree(src, tree))
        paths = [os.fspath(tree / rel) for rel in rels]
        small_paths = [os.fspath(tree / rel) for rel in small]
        leaves = sorted({os.path.dirname(p) for p in paths})
        missing = [f"{random.Random(k).choice(leaves)}/missing-{k}.json" for k in range(1000)]

        mount.remount()
        measure("stat cold", len(paths), lambda: bench.stat_pass(paths))
        measure("stat warm", len(paths), lambda: bench.stat_pass(paths))
        measure("stat missing first", len(missing), lambda: bench.stat_missing_pass(missing))
        measure("stat missing repeat", len(missing), lambda: bench.stat_missing_pass(missing))
        mount.remount()
        bench.stat_pass(paths)  # names known: the read passes then show only open/read/close
        measure("read small, first", len(small_paths), lambda: bench.read_pass(small_paths))
        measure("read small, again", len(small_paths), lambda: bench.read_pass(small_paths))
        mount.remount()
        measure("walk cold", 1, lambda: bench.walk_pass(tree))
        measure("walk warm", 1, lambda: bench.walk_pass(tree))
        if lib_rels:
            mount.remount()
            lib_paths = [os.fspath(tree / rel) for rel in lib_rels]
            for label in ("dlopen cold (process)", "dlopen warm (process)"):
                measure(
                    label, len(lib_paths), lambda: bench.run_python("dlopen_libs.py", lib_paths, {})
                )
        sizes = [8192] * 200
        measure(
            "write+rename",
            len(sizes),
            lambda: bench.write_rename_pass(tree.parent / "writes", sizes, random.Random(1)),
        )
        if not args.no_compilers:
            env = bench.cache_env(mount.mountpoint)
            for workload, script, script_args in (
                ("torch_mlp", "torch_compile.py", ["--model", "mlp"]),
                ("triton", "triton_compile.py", []),
            ):
                measure(
                    f"{workload} cold (process)",
                    1,
                    functools.partial(bench.run_python, script, script_args, env),
                )
                mount.remount()
                measure(
                    f"{workload} warm (process)",
                    1,
                    functools.partial(bench.run_python, script, script_args, env),
                )
    finally:
        try:
            mount.stop()
        finally:
            bench.cleanup_all_mounts()
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def print_row(row: dict) -> None:  # type: ignore[type-arg]
    ops = max(1, int(row["ops"]))
    requests: dict[str, list[int]] = row["requests"]
    total_requests = sum(c for c, _ in requests.values())
    handler_ns = sum(t for _, t in requests.values())
    print(
        f"{row['pass']:<24} ops {ops:>5}  client {row['client_ns'] / ops / 1e3:>9.1f} us/op  "
        f"requests {total_requests / ops:>6.2f}/op  handler {handler_ns / ops / 1e3:>8.1f} us/op",
        flush=True,
    )
    for name, (count, ns) in sorted(requests.items(), key=lambda kv: -kv[1][1]):
        print(f"      {name:<11} {count / ops:>8.2f}/op  {ns / max(count, 1) / 1e3:>8.1f} us/req")


if __name__ == "__main__":
    sys.exit(main())
