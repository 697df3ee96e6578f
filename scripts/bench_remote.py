#!/usr/bin/env python3
"""Benchmark the shared tier (``--remote``) on this machine.

    .venv/bin/python scripts/bench_remote.py [--repeat N] [--seconds S] [--json OUT]

Everything runs in a temporary directory with its own ``redis-server`` on a
free loopback port (no persistence), and every mount is served at the same
path, as on a fleet (Triton's group files hold absolute paths).

1. Warm path.  Node A (its own store, ``--remote``) compiles a Triton
   kernel for sm90 and a torch.compile'd MLP on CPU (tests/workloads), cold.
   Then N rounds: A mounts again and runs each workload (*A local hit*); a
   node B with a fresh empty store mounts at the same path and runs each twice:
   the first run fetches every entry from Redis on first access (*B remote
   fetch*), the second is served locally (*B local hit*).  Whole-process
   wall time of a fresh python process; every run is checked (cache_hit,
   fxgraph_cache_hit) so a silent recompile cannot pass as a hit.
2. Miss overhead.  For S seconds after mounting, stat() distinct missing
   names under ``triton/`` (each name is new, so the kernel's negative cache
   never answers) on a mount with no remote, with a remote that does not have
   the names, with an unreachable remote (a closed port) and with a silent
   one (accepts connections, never answers): the time until the mount is
   ready and per-lookup latency (median, mean, p99, max; the mean and the
   max include the attempts made each time the backoff expires).  Then a
   cold Triton compile with no remote and with the unreachable one.

Mounts are unmounted in ``finally`` (fusermount3 -u, then -uz and SIGKILL),
and redis-server is killed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = REPO / "tests" / "workloads"
PYTHON = sys.executable
CLASS = "cuda-sm90"
DEADLINE = 60.0
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mithrilfs import stats  # noqa: E402
from mithrilfs.repository import INDEX_NAME  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402


def log(message: str) -> None:
    print(f"[bench_remote] {message}", file=sys.stderr, flush=True)


def poll(predicate: Any, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    delay = 0.005
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@contextmanager
def mounted(mountpoint: Path, store: Path, *args: str) -> Iterator[Path]:
    """A foreground daemon serving *store* at *mountpoint*, unmounted on exit."""
    log_file = store.parent / f"{store.name}.log"
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "mithrilfs",
            "mount",
            str(mountpoint),
            "--store",
            str(store),
            "--device-class",
            CLASS,
            "--foreground",
            "--log-file",
            str(log_file),
            *args,
        ],
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {log_file.read_text(errors='replace')}")
        return os.path.ismount(mountpoint)

    try:
        poll(ready, f"mount at {mountpoint}")
        yield store
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            subprocess.run(
                ["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False
            )
            proc.kill()
            proc.wait()


def summary(store: Path) -> dict[str, Any]:
    return stats.summarize(stats.read_saved(store / INDEX_NAME))


def cache_env(mountpoint: Path) -> dict[str, str]:
    scrubbed = ("TRITON_", "TORCHINDUCTOR_", "TORCH_COMPILE", "TORCHDYNAMO_", "MITHRILFS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(scrubbed)}
    env.update(
        PYTHONPATH=str(REPO),
        TORCHINDUCTOR_CACHE_DIR=str(mountpoint / "inductor"),
        TRITON_CACHE_DIR=str(mountpoint / "triton"),
        TORCHINDUCTOR_FX_GRAPH_CACHE="1",
        TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE="0",
        TORCHINDUCTOR_COMPILE_THREADS="1",
        TRITON_DEFAULT_FP_FUSION="1",
    )
    return env


WORKLOAD_ARGS = {
    "triton": ("triton_kernel.py", ["--arch", "90"]),
    "torch": ("torch_mlp.py", []),
}


def run_workload(name: str, mountpoint: Path, expect: str) -> float:
    """Wall seconds of one fresh process; *expect* is 'hit' or 'miss' and is checked."""
    script, args = WORKLOAD_ARGS[name]
    start = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, str(WORKLOADS / script), *args],
        env=cache_env(mountpoint),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if name == "triton":
        hit = bool(result["cache_hit"])
    else:
        counters = result["inductor"]
        hit = counters.get("fxgraph_cache_hit", 0) > 0 and not counters.get("fxgraph_cache_miss")
    if hit != (expect == "hit"):
        raise RuntimeError(f"{name}: expected a cache {expect}, got {result}")
    return elapsed


def stat_missing_for(root: Path, seconds: float) -> list[float]:
    """stat() distinct never-seen names for *seconds*; each lookup's latency in seconds."""
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        path = root / "triton" / f"MISS{i:07d}"
        i += 1
        start = time.perf_counter()
        exists = path.exists()
        times.append(time.perf_counter() - start)
        assert not exists
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def bench_warm_path(base: Path, url: str, repeat: int, results: dict[str, Any]) -> None:
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    rows: dict[str, dict[str, list[float]]] = {
        w: {"A cold compile": [], "A local hit": [], "B remote fetch": [], "B local hit": []}
        for w in WORKLOAD_ARGS
    }
    log("node A: cold compiles")
    with mounted(mountpoint, base / "store-a", "--remote", url):
        for workload in WORKLOAD_ARGS:
            rows[workload]["A cold compile"].append(run_workload(workload, mountpoint, "miss"))
    remote_b: list[dict[str, Any]] = []
    # A and B alternate, so that a change in the machine's load hits both alike.
    for rep in range(repeat):
        log(f"round {rep + 1}: node A's local hits, then node B with an empty store")
        with mounted(mountpoint, base / "store-a", "--remote", url):
            for workload in WORKLOAD_ARGS:
                rows[workload]["A local hit"].append(run_workload(workload, mountpoint, "hit"))
        store = base / f"store-b{rep}"
        with mounted(mountpoint, store, "--remote", url):
            for workload in WORKLOAD_ARGS:
                rows[workload]["B remote fetch"].append(run_workload(workload, mountpoint, "hit"))
                rows[workload]["B local hit"].append(run_workload(workload, mountpoint, "hit"))
        remote_b.append(summary(store)["remote"])
        shutil.rmtree(store)
    results["warm_path"] = {
        w: {k: {"median_s": med(v), "runs": v} for k, v in cols.items()} for w, cols in rows.items()
    }
    results["node_b_remote_counters"] = remote_b


@contextmanager
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def bench_miss_overhead(
    base: Path, url: str, seconds: float, repeat: int, results: dict[str, Any]
) -> None:
    mountpoint = base / "mnt-miss"
    mountpoint.mkdir()
    closed = f"redis://127.0.0.1:{free_port()}/0"
    out: dict[str, Any] = {}
    with silent_server() as silent:
        variants = {
            "no remote": [],
            "remote without the names": ["--remote", url],
            "unreachable remote (closed port)": ["--remote", closed],
            "silent remote (accepts, never answers)": ["--remote", silent],
        }
        for n, (label, args) in enumerate(variants.items()):
            store = base / f"store-miss-{n}"
            started = time.perf_counter()
            with mounted(mountpoint, store, *args):
                ready = time.perf_counter() - started
                times = stat_missing_for(mountpoint, seconds)
            shutil.rmtree(store)
            out[label] = {
                "mount_ready_s": ready,
                "lookups": len(times),
                "median_us": med(times) * 1e6,
                "mean_us": statistics.fmean(times) * 1e6,
                "p99_us": p99(times) * 1e6,
                "max_ms": max(times) * 1e3,
            }
            log(f"missing-name lookups, {label}: {out[label]}")
    results["miss_lookups"] = out

    compiles: dict[str, list[float]] = {"no remote": [], "unreachable remote": []}
    arguments = {"no remote": [], "unreachable remote": ["--remote", closed]}
    for rep in range(repeat):
        for label, args in arguments.items():
            store = base / f"store-cold-{rep}-{len(compiles[label])}-{label[:2]}"
            with mounted(mountpoint, store, *args):
                compiles[label].append(run_workload("triton", mountpoint, "miss"))
            shutil.rmtree(store)
    results["cold_triton_compile"] = {
        k: {"median_s": med(v), "runs": v} for k, v in compiles.items()
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | A cold compile | A local hit | B remote fetch | B local hit |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for workload, cols in results["warm_path"].items():
        cells = [
            f"{cols[k]['median_s']:.2f} s"
            for k in ("A cold compile", "A local hit", "B remote fetch", "B local hit")
        ]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| missing-name lookups | mount ready | lookups | median | mean | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in results["miss_lookups"].items():
        lines.append(
            f"| {label} | {row['mount_ready_s']:.2f} s | {row['lookups']} | "
            f"{row['median_us']:.0f} µs | {row['mean_us']:.0f} µs | {row['p99_us']:.0f} µs | "
            f"{row['max_ms']:.1f} ms |"
        )
    lines += ["", "| cold triton compile | median |", "| --- | ---: |"]
    for label, row in results["cold_triton_compile"].items():
        lines.append(f"| {label} | {row['median_s']:.2f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="how long to stat missing names per variant (default 15)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    options = parser.parse_args()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(PYTHON).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="mithril-bench-remote-") as tmp:
        base = Path(tmp)
        (base / "redis").mkdir()
        with redis_server(base / "redis") as url:
            bench_warm_path(base, url, options.repeat, results)
            bench_miss_overhead(base, url, options.seconds, options.repeat, results)
    text = table(results)
    print(text)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
