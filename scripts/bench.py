#!/usr/bin/env python3
"""Benchmark mithrilfs against a native directory on this machine.

    .venv/bin/python scripts/bench.py [--quick] [--json OUT] [--png OUT]
                                      [--workloads a,b,...] [--repeat N]
                                      [--workload ranks --ranks 2,4,8]

Everything is built in a temporary directory: the data, a native directory
and a fresh mithrilfs store and mount per workload.  Each repetition runs a
workload against the native directory and against the mount, alternating
which goes first, and the first repetition is a warm-up whose numbers are
dropped (where one is configured; see DEFAULTS).  The table shows medians
over the kept repetitions and the ratio mount / native.

Workloads (``--workloads``, comma-separated; default all but ranks):

  torch_mlp, torch_transformer
      torch.compile on CPU, whole-process wall time of a fresh python process
      with TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR on the directory under
      test: cold (empty cache), warm (a second fresh process), and "remount"
      (a third process after the mount was restarted: the first job after a
      daemon restart; natively just a third warm run).
  triton
      triton.compile of four small kernels for sm80 and sm90 (no GPU needed),
      cold, warm and remount as above, fresh processes.
  tree
      a synthetic compiler-cache tree (``ab/<64 hex>/file``, 1 KiB-2 MiB):
      stat of every file, stat of missing names, open+read+close of every
      file, os.walk, dlopen of small .so files from a fresh process, and
      write-temp-then-rename of new entries.  "cold" on the mount means the
      first pass after a fresh mount (the kernel's dentry, attribute and page
      caches for the mount are empty; the store's backing files may still be
      in the host page cache).  The native directory is never dropped from
      the page cache (that needs root and disturbs the machine): its "cold"
      pass is really warm, so cold ratios are upper bounds.
  scale
      a store built offline with 10^4, 10^5 (and 10^6 unless --quick) empty
      files, mounted with the daemon form of ``mithrilfs mount``: start-up
      time (until the command returns, i.e. until the mount is ready), stat
      latency of random existing files (one LOOKUP each), the daemon's RSS
      and its CPU use while idle.
  ranks
      N ranks started together (torchrun on CPU, gloo, N = 2, 4, 8; ``--ranks``
      to choose), every rank torch.compiling the same small model with the
      caches on the directory under test, cold (empty cache) then warm.  With
      N above the machine's cores the ranks are oversubscribed.
  large
      sequential read (1 MiB reads) of one 256 MiB file: cold (the first read
      after a fresh mount, the file's or the backing object's pages dropped
      from the host page cache with POSIX_FADV_DONTNEED, so both sides read
      the disk) and warm (the next read, from the page cache).

For ranks, large and the compile workloads the mount's daemon runs under
bench_workloads/counting_daemon.py (not with --profile): next to each wall
time the table shows the daemon's CPU seconds (/proc/PID/stat) and the
requests it answered in that phase.  The last column is the spread over the kept repetitions,
min/median/max.

Mounts are always unmounted in ``finally`` (fusermount3 -u, then -uz and
SIGKILL of the daemon if it does not exit); the run ends by checking
/proc/mounts for anything left behind.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_SCRIPTS = Path(__file__).resolve().parent / "bench_workloads"
PYTHON = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL_WORKLOADS = ("torch_mlp", "torch_transformer", "triton", "tree", "scale", "ranks", "large")
# ranks only when asked for: on 2 cores N = 2 alone takes minutes, N = 8 over half an hour.
DEFAULT_WORKLOADS = tuple(w for w in ALL_WORKLOADS if w != "ranks")
BENCH_CLASS = "cuda-sm90"  # the device class the workload mounts serve
MOUNT_DEADLINE = 60.0
UNMOUNT_DEADLINE = 60.0
SUBPROCESS_TIMEOUT = 900.0
SMALL_FILE = 16 * 1024  # "small file" for the re-read target

# A run's settings: (measured, warm-up) repetitions per workload, and sizes
# (ints, tuples of them), so a value's type depends on its key.
Config = dict[str, Any]
# A JSON object: a workload's printed line, a scale row, the run's notes.
JsonObject = dict[str, Any]

# (measured repetitions, warm-up repetitions dropped) per workload.
DEFAULTS: dict[str, Config] = {
    "full": {
        "torch_mlp": (3, 1),
        "torch_transformer": (3, 1),
        "triton": (5, 1),
        "tree": (5, 1),
        "scale": (5, 1),
        "tree_files": 3000,
        "missing_names": 2000,
        "write_entries": 300,
        "dlopen_libs": 8,
        "scale_sizes": (10_000, 100_000, 1_000_000),
        "scale_samples": 2000,
        "ranks": (1, 0),
        "rank_counts": (2, 4, 8),
        "large": (3, 1),
    },
    "quick": {
        "torch_mlp": (1, 0),
        "torch_transformer": (1, 0),
        "triton": (2, 1),
        "tree": (2, 1),
        "scale": (2, 1),
        "tree_files": 600,
        "missing_names": 500,
        "write_entries": 100,
        "dlopen_libs": 4,
        "scale_sizes": (10_000, 100_000),
        "scale_samples": 1000,
        "ranks": (1, 0),
        "rank_counts": (2, 4),
        "large": (2, 1),
    },
}

# Targets: ratio (mount / native) at most this much.
RATIO_TARGETS = {
    ("torch_mlp", "wall", "warm"): 1.03,
    ("torch_mlp", "wall", "cold"): 1.10,
    ("torch_transformer", "wall", "warm"): 1.03,
    ("torch_transformer", "wall", "cold"): 1.10,
    ("triton", "wall", "warm"): 1.10,
    ("tree", "stat p50", "warm"): 1.5,
    ("tree", "stat missing p50", "repeat"): 2.0,
    ("tree", "read small p50", "warm"): 3.0,
    ("ranks N=8", "wall", "warm"): 1.05,
    # Throughput: cold >= 50% of native, warm >= 90% (time ratios 2 and 1/0.9).
    ("large", "read 256 MiB", "cold"): 2.0,
    ("large", "read 256 MiB", "warm"): 1.11,
}
STARTUP_TARGET_S = 2.0  # mount start-up with 10^6 files
LOOKUP_SCALE_TARGET = 1.5  # stat p50 at 10^6 / at 10^4


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# -- statistics ------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Metric:
    """One number measured on both sides, one value per kept repetition."""

    workload: str
    name: str
    phase: str
    unit: str
    native: list[float] = field(default_factory=list)
    mount: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def native_median(self) -> float:
        return median(self.native)

    @property
    def mount_median(self) -> float:
        return median(self.mount)

    @property
    def ratio(self) -> float:
        n, m = self.native_median, self.mount_median
        return m / n if n and not math.isnan(n) and not math.isnan(m) else float("nan")

    @property
    def target(self) -> float | None:
        return RATIO_TARGETS.get((self.workload, self.name, self.phase))

    @property
    def passed(self) -> bool | None:
        if self.target is None or math.isnan(self.ratio):
            return None
        return self.ratio <= self.target

    def summary(self) -> dict[str, object]:
        data = asdict(self)
        data.update(
            native_median=self.native_median,
            mount_median=self.mount_median,
            ratio=self.ratio,
            target=self.target,
            passed=self.passed,
        )
        return data


class Results:
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, str, str], Metric] = {}
        self.scale: list[JsonObject] = []
        self.errors: dict[str, str] = {}
        self.notes: JsonObject = {}

    def add(
        self,
        workload: str,
        name: str,
        phase: str,
        unit: str,
        side: str,
        value: float,
        note: str = "",
    ) -> None:
        key = (workload, name, phase)
        metric = self.metrics.get(key)
        if metric is None:
            metric = self.metrics[key] = Metric(workload, name, phase, unit, note=note)
        getattr(metric, side).append(value)


# -- mounts ----------------------------------------------------------------------

# Every mountpoint this run may have mounted, with a way to find its daemon.
_ACTIVE: dict[Path, Callable[[], int | None]] = {}


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return False


def _in_mount_table(mountpoint: Path) -> bool:
    target = os.fspath(mountpoint)
    with open("/proc/self/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def _holder_pid(store: Path) -> int | None:
    try:
        pid = int((store / "lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _pid_alive(pid) else None


def _force_unmount(mountpoint: Path, pid: int | None, deadline: float = UNMOUNT_DEADLINE) -> bool:
    """Unmount, wait for the daemon; lazy unmount and SIGKILL if it hangs.  True: clean."""
    clean = True
    if _in_mount_table(mountpoint):
        result = subprocess.run(
            ["fusermount3", "-u", os.fspath(mountpoint)], capture_output=True, check=False
        )
        if result.returncode != 0:
            clean = False
    end = time.monotonic() + deadline
    while pid is not None and _pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    if (pid is not None and _pid_alive(pid)) or _in_mount_table(mountpoint):
        clean = False
        subprocess.run(
            ["fusermount3", "-uz", os.fspath(mountpoint)], capture_output=True, check=False
        )
        if pid is not None and _pid_alive(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid) and time.monotonic() < end + 10:
                time.sleep(0.02)
    return clean


def cleanup_all_mounts() -> None:
    for mountpoint, pid_of in list(_ACTIVE.items()):
        with suppress(Exception):
            _force_unmount(mountpoint, pid_of(), deadline=15.0)
        _ACTIVE.pop(mountpoint, None)


class Mount:
    """A mithrilfs daemon started in the foreground form (we own its process)."""

    def __init__(
        self,
        base: Path,
        name: str,
        *,
        device_class: str = BENCH_CLASS,
        profile_dir: Path | None = None,
        entry: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.mountpoint = base / f"{name}-mnt"
        self.store = base / f"{name}-store"
        self.log = base / f"{name}.log"
        self.device_class = device_class
        self.profile_dir = profile_dir
        # How to start the daemon: `python -m mithrilfs` unless a wrapper is given.
        self.entry = entry or ["-m", "mithrilfs"]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def start(self, attempts: int = 2) -> Mount:
        """Mount; a daemon that dies before the mount is ready is retried once."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as exc:
                if attempt + 1 == attempts:
                    raise
                log(f"  mount failed, retrying: {exc}")
        raise AssertionError("unreachable")

    def log_tail(self, lines: int = 5) -> str:
        text = ""
        for path in (self.log, self.log.with_suffix(".stderr")):
            with suppress(OSError):
                text += "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
        return text.strip()

    def _start_once(self) -> Mount:
        assert self.proc is None
        command = [PYTHON]
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"{self.mountpoint.name}-{self.starts}.prof"
            command += ["-m", "cProfile", "-o", os.fspath(out)]
        command += [
            *self.entry,
            "mount",
            os.fspath(self.mountpoint),
            "--store",
            os.fspath(self.store),
            "--foreground",
            "--log-file",
            os.fspath(self.log),
            "--device-class",
            self.device_class,
        ]
        _ACTIVE[self.mountpoint] = lambda: self.proc.pid if self.proc else None
        with open(self.log.with_suffix(".stderr"), "ab") as err:
            env = None if self.env is None else {**os.environ, **self.env}
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO, env=env
            )
        self.starts += 1
        deadline = time.monotonic() + MOUNT_DEADLINE
        delay = 0.002
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(
                    f"mithrilfs exited ({code}) before mounting; its log ends:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount at {self.mountpoint} not ready after {MOUNT_DEADLINE}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        clean = _force_unmount(self.mountpoint, proc.pid)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _ACTIVE.pop(self.mountpoint, None)
        if not clean or proc.returncode not in (0, None):
            raise RuntimeError(
                f"daemon for {self.mountpoint} did not stop cleanly "
                f"(exit {proc.returncode}); see {self.log}"
            )

    def remount(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


@contextmanager
def mounted(base: Path, name: str, **kwargs: object) -> Iterator[Mount]:
    mount = Mount(base, name, **kwargs)  # type: ignore[arg-type]
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()


def daemon_mount(mountpoint: Path, store: Path, device_class: str, log_file: Path) -> float:
    """Mount with the daemon form; return seconds until the command returned (ready)."""
    _ACTIVE[mountpoint] = lambda: _holder_pid(store)
    t0 = time.perf_counter()
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "mithrilfs",
            "mount",
            os.fspath(mountpoint),
            "--store",
            os.fspath(store),
            "--device-class",
            device_class,
            "--log-file",
            os.fspath(log_file),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"mithrilfs mount failed ({result.returncode}): {result.stderr.strip()}")
    if not os.path.ismount(mountpoint):
        raise RuntimeError(f"mithrilfs mount returned but {mountpoint} is not a mount")
    return elapsed


def daemon_unmount(mountpoint: Path, store: Path) -> None:
    pid = _holder_pid(store)
    clean = _force_unmount(mountpoint, pid)
    _ACTIVE.pop(mountpoint, None)
    if not clean:
        raise RuntimeError(f"daemon for {mountpoint} did not stop cleanly")


IDLE_WINDOW_S = 2.0


def cpu_percent(pid: int | None, window: float) -> float:
    """CPU used by *pid* over the next *window* seconds, in percent of one core."""

    def ticks() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    if pid is None:
        return float("nan")
    try:
        t0, c0 = time.monotonic(), ticks()
        time.sleep(window)
        t1, c1 = time.monotonic(), ticks()
    except OSError:
        return float("nan")
    return 100.0 * (c1 - c0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def rss_kib(pid: int | None) -> dict[str, int]:
    out: dict[str, int] = {}
    if pid is None:
        return out
    with suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# -- subprocess workloads --------------------------------------------------------


def run_python(script: str, args: list[str], env_extra: dict[str, str]) -> tuple[float, JsonObject]:
    """Run a workload script in a fresh python; return (wall seconds, its JSON line)."""
    return run_timed([os.fspath(WORKLOAD_SCRIPTS / script), *args], env_extra)


def run_timed(args: list[str], env_extra: dict[str, str]) -> tuple[float, JsonObject]:
    """Run python with *args*; return (wall seconds, the last JSON line it printed)."""
    env = dict(os.environ)
    env.update(env_extra)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    result = subprocess.run(
        [PYTHON, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return wall, (json.loads(lines[-1]) if lines else {})


def cache_env(root: Path) -> dict[str, str]:
    return {
        "TORCHINDUCTOR_CACHE_DIR": os.fspath(root / "inductor"),
        "TRITON_CACHE_DIR": os.fspath(root / "triton"),
    }


def sides(rep: int) -> tuple[str, str]:
    """Alternate which side runs first, so slow drift hits both equally."""
    return ("native", "mount") if rep % 2 == 0 else ("mount", "native")


def bench_compile(
    workload: str, cfg: Config, base: Path, results: Results, profile_dir: Path | None
) -> None:
    measured, warmup = cfg[workload]
    if workload == "triton":
        script, args = "triton_compile.py", []
    else:
        script, args = "torch_compile.py", ["--model", workload.removeprefix("torch_")]
    for rep in range(warmup + measured):
        kept = rep >= warmup
        for side in sides(rep):
            if side == "native":
                root = base / f"{workload}-native-{rep}"
                for sub in ("inductor", "triton"):
                    (root / sub).mkdir(parents=True)
                runs = _compile_runs(script, args, root, lambda: None)
            else:
                # The daemon's CPU and requests per phase (the counting wrapper),
                # unless it runs under cProfile instead.
                mount = (
                    Mount(base, f"{workload}-{rep}", profile_dir=profile_dir)
                    if profile_dir is not None
                    else CountedMount(base, f"{workload}-{rep}")
                )
                counted = mount if isinstance(mount, CountedMount) else None
                mount.start()
                try:
                    runs = _compile_runs(
                        script,
                        args,
                        mount.mountpoint,
                        mount.remount,
                        functools.partial(daemon_cost, results, workload, mount=counted, kept=kept),
                    )
                finally:
                    mount.stop()
            for phase, (wall, info) in runs.items():
                log(
                    f"  {workload} rep {rep}{'' if kept else ' (warm-up)'} {side:6} {phase}: "
                    f"{wall:.2f}s (in-process compile {info.get('compile_s', 0):.2f}s)"
                )
                if kept:
                    results.add(workload, "wall", phase, "s", side, wall)
                    if "compile_s" in info:
                        results.add(
                            workload, "compile (in-process)", phase, "s", side, info["compile_s"]
                        )
            for phase in ("warm", "remount"):
                if workload == "triton":
                    break
                hits = runs[phase][1].get("inductor", {}).get("fxgraph_cache_hit", 0)
                if not hits:
                    log(f"  WARNING: {workload} {phase} run on {side} had no fxgraph cache hit")
                    results.notes.setdefault("warm_misses", []).append(
                        f"{workload}/{side}/{phase}/{rep}"
                    )


def _compile_runs(
    script: str,
    args: list[str],
    root: Path,
    remount: Callable[[], None],
    cost: Callable[[str], AbstractContextManager[None]] = lambda _phase: nullcontext(),
) -> dict[str, tuple[float, JsonObject]]:
    """cold: empty cache; warm: a second process; remount: a third, after a fresh mount.

    "remount" is the first job after the daemon restarted (node reboot,
    upgrade): on the native side it is just a third warm process.  *cost*
    wraps each run (the daemon's CPU and requests on the mount side).
    """
    env = cache_env(root)
    runs = {}
    for phase in ("cold", "warm", "remount"):
        if phase == "remount":
            remount()
        with cost(phase):
            runs[phase] = run_python(script, args, env)
    return runs


# -- many ranks and large artifacts: daemon CPU and requests per phase ------------

COUNTING_DAEMON = WORKLOAD_SCRIPTS / "counting_daemon.py"
RANKS_SCRIPT = WORKLOAD_SCRIPTS / "ranks_compile.py"
LARGE_BYTES = 256 * 2**20
READ_CHUNK = 2**20


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of *pid*, all its threads."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CountedMount(Mount):
    """A mount whose daemon counts its requests (bench_workloads/counting_daemon.py)."""

    def __init__(self, base: Path, name: str) -> None:
        self.counts_file = base / f"{name}-counts.json"
        super().__init__(
            base,
            name,
            entry=[os.fspath(COUNTING_DAEMON)],
            env={"MITHRILFS_COUNTS": os.fspath(self.counts_file)},
        )

    def requests(self) -> dict[str, int]:
        """Requests per operation since the last call (the daemon starts again from zero)."""
        self.counts_file.unlink(missing_ok=True)
        assert self.pid is not None
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not self.counts_file.exists():
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("the counting daemon did not answer SIGUSR2")
            time.sleep(0.005)
        counts: dict[str, list[int]] = json.loads(self.counts_file.read_text())
        return {op: value[0] for op, value in counts.items()}


@contextmanager
def daemon_cost(
    results: Results, workload: str, phase: str, mount: CountedMount | None, kept: bool
) -> Iterator[None]:
    """Record the daemon's CPU seconds and request count over the block (mount side only)."""
    if mount is None:
        yield
        return
    mount.requests()
    cpu0 = process_cpu_s(mount.pid)
    yield
    # RELEASE and FORGET may arrive just after the last syscall returned.
    time.sleep(0.2)
    cpu = process_cpu_s(mount.pid) - cpu0
    requests = mount.requests()
    total = sum(requests.values())
    top = ", ".join(f"{op} {n}" for op, n in sorted(requests.items(), key=lambda i: -i[1])[:5])
    log(f"    daemon: {cpu:.2f} s CPU, {total} requests ({top})")
    if kept:
        results.add(workload, "daemon CPU", phase, "s", "mount", cpu)
        results.add(workload, "daemon requests", phase, "req", "mount", total)


def bench_ranks(cfg: Config, base: Path, results: Results) -> None:
    """N ranks started together (torchrun, gloo, CPU), each torch.compiling the same model."""
    measured, warmup = cfg["ranks"]
    for n in cfg["rank_counts"]:
        workload = f"ranks N={n}"
        for rep in range(warmup + measured):
            kept = rep >= warmup
            for side in sides(rep):
                name = f"ranks{n}-{side}-{rep}"
                mount = CountedMount(base, name) if side == "mount" else None
                root = mount.mountpoint if mount is not None else base / name
                if mount is None:
                    for sub in ("inductor", "triton"):
                        (root / sub).mkdir(parents=True)
                else:
                    mount.start()
                try:
                    for phase in ("cold", "warm"):
                        with daemon_cost(results, workload, phase, mount, kept):
                            wall, info = _torchrun(n, root)
                        log(
                            f"  {workload} rep {rep}{'' if kept else ' (warm-up)'} {side:6} "
                            f"{phase}: {wall:.2f}s (rank compile max "
                            f"{max(info.get('compile_s', [0])):.2f}s, fxgraph hits "
                            f"{info.get('fxgraph_cache_hit')}, misses "
                            f"{info.get('fxgraph_cache_miss')})"
                        )
                        if kept:
                            results.add(workload, "wall", phase, "s", side, wall)
                        if phase == "warm" and not info.get("fxgraph_cache_hit"):
                            results.notes.setdefault("warm_misses", []).append(
                                f"{workload}/{side}/{rep}"
                            )
                finally:
                    if mount is not None:
                        mount.stop()


def _torchrun(n: int, root: Path) -> tuple[float, JsonObject]:
    env = {
        **cache_env(root),
        # One compile process per rank: eight ranks with a worker pool each
        # would measure the pools, not the cache.
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    return run_timed([*args, os.fspath(RANKS_SCRIPT)], env)


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's clean pages from the host page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path: Path) -> float:
    """Seconds to read *path* start to end in 1 MiB reads."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def bench_large(cfg: Config, base: Path, results: Results) -> None:
    """Sequential read of one 256 MiB file (an AOTInductor package, a big .so).

    cold: the first read after a fresh mount, with the file's pages (natively)
    and the backing object's pages (mount) dropped from the host page cache,
    so both sides read from the disk; warm: the next read, from the page cache.
    """
    measured, warmup = cfg["large"]
    source = base / "large-src.bin"
    with open(source, "wb") as out:
        rng = random.Random(5)
        for _ in range(LARGE_BYTES // READ_CHUNK):
            out.write(rng.randbytes(READ_CHUNK))
    native = base / "large-native" / "model.so"
    native.parent.mkdir()
    shutil.copyfile(source, native)
    mount = CountedMount(base, "large")
    mount.start()
    try:
        inside = mount.mountpoint / "inductor" / "ab" / "model.so"
        inside.parent.mkdir(parents=True)
        shutil.copyfile(source, inside)
        backing = max(
            (p for p in (mount.store / "objects").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size,
        )
        for rep in range(warmup + measured):
            kept = rep >= warmup
            for side in sides(rep):
                if side == "native":
                    drop_from_page_cache(native)
                    times = {"cold": sequential_read(native), "warm": sequential_read(native)}
                else:
                    mount.remount()
                    drop_from_page_cache(backing)
                    times = {}
                    for phase in ("cold", "warm"):
                        with daemon_cost(results, "large", phase, mount, kept):
                            times[phase] = sequential_read(inside)
                for phase, seconds in times.items():
                    rate = LARGE_BYTES / 2**20 / seconds
                    log(
                        f"  large rep {rep}{'' if kept else ' (warm-up)'} {side:6} {phase}: "
                        f"{seconds:.3f}s ({rate:.0f} MiB/s)"
                    )
                    if kept:
                        results.add("large", "read 256 MiB", phase, "s", side, seconds)
                        results.add("large", "throughput", phase, "MiB/s", side, rate)
    finally:
        mount.stop()


# -- the synthetic cache tree ----------------------------------------------------

EXTENSIONS = ("json", "cubin", "ptx", "llir", "ttir", "py", "bin", "code")


def _file_size(rng: random.Random) -> int:
    u = rng.random()
    if u < 0.70:
        return rng.randint(1024, 8 * 1024)
    if u < 0.95:
        return int(math.exp(rng.uniform(math.log(8 * 1024), math.log(128 * 1024))))
    return int(math.exp(rng.uniform(math.log(128 * 1024), math.log(2 * 1024 * 1024))))


def tree_spec(n_files: int, seed: int = 1234) -> list[tuple[str, int]]:
    """Relative paths ``ab/<64 hex>/name`` and sizes, deterministic for a seed."""
    rng = random.Random(seed)
    files: list[tuple[str, int]] = []
    while len(files) < n_files:
        leaf = rng.randbytes(32).hex()
        top = leaf[:2]
        for j in range(rng.randint(1, 5)):
            if len(files) >= n_files:
                break
            ext = "json" if j == 0 else EXTENSIONS[rng.randrange(len(EXTENSIONS))]
            name = f"{'__grp__' if j == 0 else ''}k{j}.{ext}"
            files.append((f"{top}/{leaf}/{name}", _file_size(rng)))
    return files


def build_libs(base: Path, count: int) -> list[Path]:
    """Compile *count* tiny distinct shared libraries with gcc (empty list if no gcc)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None or count <= 0:
        return []
    out = base / "libs"
    out.mkdir()
    libs = []
    for i in range(count):
        source = out / f"lib{i}.c"
        pad = 1024 * (4 << (i % 5))
        source.write_text(
            f"static const char pad[{pad}] = {{{i + 1}}};\n"
            f"int bench_value(void) {{ return {i + 1} + pad[{pad - 1}] + pad[0]; }}\n"
        )
        lib = out / f"lib{i}.so"
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O1", "-o", os.fspath(lib), os.fspath(source)],
            check=True,
            capture_output=True,
        )
        libs.append(lib)
    return libs


def write_tree(dest: Path, files: list[tuple[str, int]], seed: int = 99) -> None:
    rng = random.Random(seed)
    for rel, size in files:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def stat_pass(paths: list[str]) -> list[int]:
    out: list[int] = []
    clock, st, append = time.perf_counter_ns, os.stat, out.append
    for path in paths:
        t0 = clock()
        st(path)
        append(clock() - t0)
    return out


def stat_missing_pass(paths: list[str]) -> list[int]:
    clock, st, out = time.perf_counter_ns, os.stat, []
    for path in paths:
        t0 = clock()
        try:
            st(path)
        except FileNotFoundError:
            pass
        else:
            raise RuntimeError(f"{path} should not exist")
        out.append(clock() - t0)
    return out


def read_pass(paths: list[str]) -> tuple[list[int], int]:
    clock, out, total = time.perf_counter_ns, [], 0
    flags = os.O_RDONLY | os.O_CLOEXEC
    for path in paths:
        t0 = clock()
        fd = os.open(path, flags)
        try:
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
        finally:
            os.close(fd)
        out.append(clock() - t0)
    return out, total


def walk_pass(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    count = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
    return time.perf_counter() - t0, count


def write_rename_pass(root: Path, sizes: list[int], rng: random.Random) -> list[int]:
    """Publish new entries like the compilers do: mkdir, write a temp file, rename."""
    clock, out = time.perf_counter_ns, []
    payload = rng.randbytes(max(sizes) + 1024)
    for i, size in enumerate(sizes):
        leaf_name = rng.randbytes(32).hex()
        leaf = root / leaf_name[:2] / leaf_name
        t0 = clock()
        os.makedirs(leaf, exist_ok=True)
        tmp = leaf / f".tmp.{os.getpid()}.{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, payload[i % 1024 : i % 1024 + size])
        finally:
            os.close(fd)
        os.rename(tmp, leaf / f"entry{i}.bin")
        out.append(clock() - t0)
    return out


def bench_tree(cfg: Config, base: Path, results: Results, profile_dir: Path | None) -> None:
    measured, warmup = cfg["tree"]
    work = base / "tree-src"
    work.mkdir()
    files = tree_spec(cfg["tree_files"])
    libs = build_libs(base, cfg["dlopen_libs"])
    rng = random.Random(7)
    lib_rels = []
    for lib in libs:
        leaf = rng.randbytes(32).hex()
        lib_rels.append(f"{leaf[:2]}/{leaf}/{lib.name}")
    log(
        f"tree: writing {len(files)} files "
        f"({sum(s for _, s in files) / 2**20:.0f} MiB) and {len(libs)} .so files"
    )
    write_tree(work, files)
    for lib, rel in zip(libs, lib_rels, strict=True):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, work / rel)
    rels = [rel for rel, _ in files] + lib_rels
    sizes = {rel: size for rel, size in files}
    sizes.update({rel: (work / rel).stat().st_size for rel in lib_rels})
    results.notes["tree"] = {
        "files": len(rels),
        "bytes": sum(sizes.values()),
        "dlopen_libs": len(libs),
        "small_file_limit": SMALL_FILE,
        "small_files": sum(1 for s in sizes.values() if s <= SMALL_FILE),
    }
    leaves = sorted({rel.rsplit("/", 1)[0] for rel in rels})
    missing_rng = random.Random(11)
    missing = [
        f"{missing_rng.choice(leaves)}/missing-{k}.json" for k in range(cfg["missing_names"])
    ]

    native_root = base / "tree-native"
    mount = Mount(base, "tree", profile_dir=profile_dir)
    try:
        mount.start()
        for side, dest in (
            ("native", native_root / "inductor" / "tree"),
            ("mount", mount.mountpoint / "inductor" / "tree"),
        ):
            t0 = time.perf_counter()
            shutil.copytree(work, dest)
            elapsed = time.perf_counter() - t0
            log(f"  tree populate (copytree) {side}: {elapsed:.2f}s")
            results.add("tree", "populate (copytree, n=1)", "", "s", side, elapsed)
        for rep in range(warmup + measured):
            kept = rep >= warmup
            order_rng = random.Random(1000 + rep)
            order = rels[:]
            order_rng.shuffle(order)
            write_sizes = [
                min(_file_size(order_rng), 256 * 1024) for _ in range(cfg["write_entries"])
            ]
            for side in sides(rep):
                if side == "native":
                    root, remount = native_root / "inductor", (lambda: None)
                else:
                    root, remount = mount.mountpoint / "inductor", mount.remount
                values = _tree_rep(
                    root,
                    order,
                    missing,
                    lib_rels,
                    sizes,
                    write_sizes,
                    remount,
                    random.Random(2000 + rep),
                    rep,
                )
                log(
                    f"  tree rep {rep}{'' if kept else ' (warm-up)'} {side:6} "
                    + ", ".join(
                        f"{k[0]}/{k[1]}={v:.4g}"
                        for k, v in values.items()
                        if k[0]
                        in (
                            "stat p50",
                            "read small p50",
                            "walk",
                            "stat missing p50",
                            "write+rename p50",
                        )
                    )
                )
                if kept:
                    for (name, phase), value in values.items():
                        unit = "s" if name in ("walk", "read all (total)") else "us"
                        results.add("tree", name, phase, unit, side, value)
    finally:
        mount.stop()


def _tree_rep(
    root: Path,
    order: list[str],
    missing: list[str],
    lib_rels: list[str],
    sizes: dict[str, int],
    write_sizes: list[int],
    remount: Callable[[], None],
    rng: random.Random,
    rep: int,
) -> dict[tuple[str, str], float]:
    tree = root / "tree"
    paths = [os.fspath(tree / rel) for rel in order]
    small = [i for i, rel in enumerate(order) if sizes[rel] <= SMALL_FILE]
    out: dict[tuple[str, str], float] = {}
    us = 1e-3

    remount()
    for phase in ("cold", "warm"):
        lat = stat_pass(paths)
        out[("stat p50", phase)] = percentile(lat, 0.5) * us
        out[("stat p99", phase)] = percentile(lat, 0.99) * us
    missing_paths = [os.fspath(tree / rel) for rel in missing]
    for phase in ("first", "repeat"):
        lat = stat_missing_pass(missing_paths)
        out[("stat missing p50", phase)] = percentile(lat, 0.5) * us
        out[("stat missing p99", phase)] = percentile(lat, 0.99) * us

    remount()
    for phase in ("cold", "warm"):
        lat, total = read_pass(paths)
        if total != sum(sizes.values()):
            raise RuntimeError(f"read {total} bytes, expected {sum(sizes.values())}")
        out[("read p50", phase)] = percentile(lat, 0.5) * us
        out[("read p99", phase)] = percentile(lat, 0.99) * us
        out[("read small p50", phase)] = percentile([lat[i] for i in small], 0.5) * us
        out[("read all (total)", phase)] = sum(lat) * 1e-9

    remount()
    counts = []
    for phase in ("cold", "warm"):
        elapsed, count = walk_pass(tree)
        out[("walk", phase)] = elapsed
        counts.append(count)
    if counts[0] != counts[1]:
        raise RuntimeError(f"os.walk saw {counts[0]} then {counts[1]} entries")

    if lib_rels:
        remount()
        lib_paths = [os.fspath(tree / rel) for rel in lib_rels]
        for phase in ("cold", "warm"):
            _wall, info = run_python("dlopen_libs.py", lib_paths, {})
            out[("dlopen p50", phase)] = percentile(info["dlopen_ns"], 0.5) * us

    writes = root / f"writes-{rep}"
    lat = write_rename_pass(writes, write_sizes, rng)
    out[("write+rename p50", "")] = percentile(lat, 0.5) * us
    out[("write+rename p99", "")] = percentile(lat, 0.99) * us
    shutil.rmtree(writes)
    return out


# -- scale: a big store built offline ------------------------------------------


def scale_names(n_files: int, per_leaf: int = 4) -> Iterator[tuple[str, str, str]]:
    """(top, leaf, file) names of the scale tree, deterministic."""
    rng = random.Random(n_files)
    n_leaves = (n_files + per_leaf - 1) // per_leaf
    made = 0
    for _ in range(n_leaves):
        leaf = rng.randbytes(32).hex()
        for j in range(per_leaf):
            if made == n_files:
                return
            yield leaf[:2], leaf, f"k{j}.json"
            made += 1


def build_scale_store(store: Path, device_class: str, n_files: int) -> JsonObject:
    """Fill a new store's index with *n_files* empty files, offline, through its own API.

    Uses ``Index.make_node`` (what the daemon's create/mkdir do), so the
    store follows every invariant of the current schema (cache entries
    included) without this script knowing it; all files share the empty
    object.  The tree is ``<class>/inductor/ab/<64 hex>/kN.json``: one
    inductor code-cache directory (one cache entry) per leaf.  Committed in
    batches of ~200k files.
    """
    from mithrilfs.repository import Repository

    t0 = time.perf_counter()
    uid, gid = os.geteuid(), os.getegid()
    dir_mode, file_mode = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644
    repo = Repository.open(store)
    dirs: dict[str, int] = {}
    try:
        repo.recover()
        idx = repo.index
        class_root = idx.ensure_dir(1, device_class.encode(), 0o755, uid, gid)
        inductor = idx.ensure_dir(class_root.id, b"inductor", 0o755, uid, gid)
        idx.ensure_dir(class_root.id, b"triton", 0o755, uid, gid)
        names = scale_names(n_files)
        done = 0
        while done < n_files:
            with idx.transaction():
                for top, leaf, name in itertools.islice(names, 200_000):
                    top_ino = dirs.get(top)
                    if top_ino is None:
                        top_ino = dirs[top] = idx.make_node(
                            inductor.id, top.encode(), dir_mode, uid, gid
                        ).id
                    leaf_ino = dirs.get(leaf)
                    if leaf_ino is None:
                        leaf_ino = dirs[leaf] = idx.make_node(
                            top_ino, leaf.encode(), dir_mode, uid, gid
                        ).id
                    idx.make_node(leaf_ino, name.encode(), file_mode, uid, gid)
                    done += 1
        checked: object = "skipped"
        if n_files <= 10_000:
            from mithrilfs import fsck

            report = fsck.check(idx, repo.content, verify_hashes=False)
            if not report.clean:
                raise RuntimeError(
                    "offline-built store fails fsck: "
                    + "; ".join(p.detail for p in report.problems[:5])
                )
            checked = "clean"
    finally:
        repo.close(clean=True)
    db_bytes = sum(p.stat().st_size for p in store.glob("mithril.db*"))
    tops = sum(1 for key in dirs if len(key) == 2)
    return {
        "build_s": time.perf_counter() - t0,
        "db_bytes": db_bytes,
        "fsck": checked,
        "leaf_dirs": len(dirs) - tops,
        "top_dirs": tops,
    }


@dataclass
class ScaleStore:
    files: int
    store: Path
    mountpoint: Path
    log_file: Path
    info: dict[str, object]
    top_paths: list[str]
    leaf_paths: list[str]
    paths: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)
    first_startup: float | None = None


def _prepare_scale(base: Path, n_files: int, samples: int) -> ScaleStore:
    name = f"scale-{n_files}"
    store, mountpoint = base / f"{name}-store", base / f"{name}-mnt"
    mountpoint.mkdir()
    info = build_scale_store(store, BENCH_CLASS, n_files)
    log(
        f"scale {n_files}: built store in {info['build_s']:.1f}s "
        f"({info['db_bytes'] / 2**20:.0f} MiB index, fsck {info['fsck']})"
    )
    # One file in each of distinct, randomly chosen leaf directories, so that
    # every size does the same requests: with the top directories already
    # looked up, stat(leaf) is one LOOKUP and stat(file) another.
    by_leaf: dict[str, tuple[str, list[str]]] = {}
    for top, leaf, fname in scale_names(n_files):
        by_leaf.setdefault(leaf, (top, []))[1].append(fname)
    rng = random.Random(5)
    leaves = rng.sample(sorted(by_leaf), min(samples, len(by_leaf)))
    scale_dir = mountpoint / "inductor"
    leaf_paths = [os.fspath(scale_dir / by_leaf[leaf][0] / leaf) for leaf in leaves]
    return ScaleStore(
        files=n_files,
        store=store,
        mountpoint=mountpoint,
        log_file=base / f"{name}.log",
        info=info,
        top_paths=sorted({os.fspath(scale_dir / by_leaf[leaf][0]) for leaf in leaves}),
        leaf_paths=leaf_paths,
        paths=[
            os.path.join(lp, rng.choice(by_leaf[leaf][1]))
            for lp, leaf in zip(leaf_paths, leaves, strict=True)
        ],
    )


def bench_scale(cfg: Config, base: Path, results: Results) -> None:
    """Build every store first, then rotate through the sizes in each repetition."""
    measured, warmup = cfg["scale"]
    stores = [_prepare_scale(base, n, cfg["scale_samples"]) for n in cfg["scale_sizes"]]
    try:
        for rep in range(warmup + measured):
            shift = rep % len(stores)
            for s in stores[shift:] + stores[:shift]:
                _scale_rep(s, rep, kept=rep >= warmup)
    finally:
        for s in stores:
            if _in_mount_table(s.mountpoint):
                daemon_unmount(s.mountpoint, s.store)
    for s in stores:
        v = s.samples
        results.scale.append(
            {
                "files": s.files,
                **s.info,
                "first_startup_s": s.first_startup,
                "startup_s": median(v.get("startup", [])),
                "startup_all_s": v.get("startup", []),
                "lookup_p50_us": median(v.get("file_p50", [])),
                "lookup_p99_us": median(v.get("file_p99", [])),
                "lookup_warm_p50_us": median(v.get("warm_p50", [])),
                "dir_lookup_p50_us": median(v.get("dir_p50", [])),
                "rss_idle_kib": median(v.get("rss_idle", [])),
                "rss_after_lookups_kib": median(v.get("rss_after", [])),
                "idle_cpu_percent": median(v.get("idle_cpu", [])),
                "samples": len(s.paths),
            }
        )
        shutil.rmtree(s.store, ignore_errors=True)


def _scale_rep(s: ScaleStore, rep: int, *, kept: bool) -> None:
    elapsed = daemon_mount(s.mountpoint, s.store, BENCH_CLASS, s.log_file)
    try:
        pid = _holder_pid(s.store)
        idle = rss_kib(pid)
        stat_pass(s.top_paths)
        dirs = stat_pass(s.leaf_paths)
        cold = stat_pass(s.paths)
        warm = stat_pass(s.paths)
        after = rss_kib(pid)
        idle_cpu = cpu_percent(pid, IDLE_WINDOW_S)
    finally:
        daemon_unmount(s.mountpoint, s.store)
    log(
        f"  scale {s.files} rep {rep}{'' if kept else ' (warm-up)'}: "
        f"start-up {elapsed:.3f}s, stat p50 dir {percentile(dirs, 0.5) / 1e3:.1f}us "
        f"file {percentile(cold, 0.5) / 1e3:.1f}us "
        f"warm {percentile(warm, 0.5) / 1e3:.1f}us, RSS {idle.get('VmRSS')} -> "
        f"{after.get('VmRSS')} KiB, idle CPU {idle_cpu:.1f}%"
    )
    if s.first_startup is None:
        s.first_startup = elapsed
    if not kept:
        return
    for key, value in (
        ("startup", elapsed),
        ("file_p50", percentile(cold, 0.5) / 1e3),
        ("file_p99", percentile(cold, 0.99) / 1e3),
        ("dir_p50", percentile(dirs, 0.5) / 1e3),
        ("warm_p50", percentile(warm, 0.5) / 1e3),
        ("rss_idle", idle.get("VmRSS", 0)),
        ("rss_after", after.get("VmRSS", 0)),
        ("idle_cpu", idle_cpu),
    ):
        s.samples.setdefault(key, []).append(value)


# -- report ----------------------------------------------------------------------


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def scale_checks(results: Results) -> list[tuple[str, str, bool | None]]:
    checks: list[tuple[str, str, bool | None]] = []
    by_size = {row["files"]: row for row in results.scale}
    big = by_size.get(1_000_000)
    if big is not None:
        checks.append(
            (
                "mount start-up at 10^6 < 2 s",
                f"{big['startup_s']:.3f} s",
                big["startup_s"] < STARTUP_TARGET_S,
            )
        )
    small = by_size.get(10_000)
    largest = max(by_size) if by_size else None
    if small is not None and largest is not None and largest > 10_000:
        ratio = by_size[largest]["lookup_p50_us"] / small["lookup_p50_us"]
        label = "10^6" if largest == 1_000_000 else f"{largest}"
        checks.append(
            (
                f"lookup p50 at {label} / 10^4 <= 1.5x",
                f"{ratio:.2f}x",
                ratio <= LOOKUP_SCALE_TARGET if largest == 1_000_000 else None,
            )
        )
    return checks


def spread(values: list[float]) -> str:
    """min/median/max of the kept repetitions ("-" for none, the value for one)."""
    if len(values) < 2:
        return fmt(values[0]) if values else "-"
    return f"{fmt(min(values))}/{fmt(median(values))}/{fmt(max(values))}"


def table_text(results: Results) -> str:
    lines = []
    header = (
        f"{'workload':<18} {'metric':<26} {'phase':<7} {'unit':<4} {'native':>9} "
        f"{'mount':>9} {'ratio':>7} {'target':>7}  {'result':<6} spread native | mount"
    )
    lines += [header, "-" * len(header)]
    for metric in results.metrics.values():
        target = f"<={metric.target:g}x" if metric.target is not None else ""
        verdict = {True: "PASS", False: "MISS", None: ""}[metric.passed]
        lines.append(
            f"{metric.workload:<18} {metric.name:<26} {metric.phase:<7} {metric.unit:<4} "
            f"{fmt(metric.native_median):>9} {fmt(metric.mount_median):>9} "
            f"{fmt(metric.ratio) + 'x':>7} {target:>7}  {verdict:<6} "
            f"{spread(metric.native)} | {spread(metric.mount)}"
        )
    if results.scale:
        lines += [
            "",
            f"{'files':>9} {'build s':>8} {'index MiB':>9} {'start-up s':>10} "
            f"{'1st s':>6} {'dir p50 us':>10} {'file p50 us':>11} {'p99 us':>8} "
            f"{'warm p50':>8} "
            f"{'RSS MiB':>8} {'RSS after':>9} {'idle CPU%':>9}",
        ]
        for row in results.scale:
            lines.append(
                f"{row['files']:>9} {row['build_s']:>8.1f} {row['db_bytes'] / 2**20:>9.0f} "
                f"{row['startup_s']:>10.3f} {row['first_startup_s']:>6.3f} "
                f"{row['dir_lookup_p50_us']:>10.1f} "
                f"{row['lookup_p50_us']:>11.1f} {row['lookup_p99_us']:>8.1f} "
                f"{row['lookup_warm_p50_us']:>8.1f} {row['rss_idle_kib'] / 1024:>8.1f} "
                f"{row['rss_after_lookups_kib'] / 1024:>9.1f} "
                f"{row['idle_cpu_percent']:>9.1f}"
            )
        for label, value, ok in scale_checks(results):
            verdict = {True: "PASS", False: "MISS", None: "(needs 10^6)"}[ok]
            lines.append(f"  {label}: {value}  {verdict}")
    for workload, error in results.errors.items():
        lines.append(f"ERROR in {workload}: {error.strip().splitlines()[-1]}")
    return "\n".join(lines)


def plot(results: Results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Metric]] = {}
    plotted = {
        ("torch_mlp", "wall"),
        ("torch_transformer", "wall"),
        ("triton", "wall"),
        ("tree", "stat p50"),
        ("tree", "stat missing p50"),
        ("tree", "read small p50"),
        ("tree", "read all (total)"),
        ("tree", "walk"),
        ("tree", "dlopen p50"),
        ("tree", "write+rename p50"),
        ("large", "read 256 MiB"),
    }
    for metric in results.metrics.values():
        if (metric.workload, metric.name) in plotted or (
            metric.workload.startswith("ranks") and metric.name == "wall"
        ):
            groups.setdefault(f"{metric.workload}: {metric.name}", []).append(metric)
    n_panels = len(groups) + (3 if results.scale else 0)
    if n_panels == 0:
        return
    cols = 4
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (label, metrics) in zip(flat, groups.items(), strict=False):
        xs = range(len(metrics))
        width = 0.38
        native = [m.native_median for m in metrics]
        mount = [m.mount_median for m in metrics]
        ax.bar([x - width / 2 for x in xs], native, width, label="native", color="#7f8c8d")
        bars = ax.bar([x + width / 2 for x in xs], mount, width, label="mithrilfs", color="#2e86c1")
        for bar, m in zip(bars, metrics, strict=True):
            colour = {True: "green", False: "red", None: "black"}[m.passed]
            ax.annotate(
                f"{m.ratio:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                color=colour,
            )
        ax.set_xticks(list(xs), [m.phase or "-" for m in metrics])
        positive = [v for v in native + mount if v and v > 0 and not math.isnan(v)]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(metrics[0].unit)
        ax.margins(y=0.25)
    if results.scale:
        rest = flat[len(groups) :]
        sizes = [row["files"] for row in results.scale]
        for ax, key, ylabel, name in (
            (rest[0], "lookup_p50_us", "us", "scale: stat p50 of a file (1 LOOKUP)"),
            (rest[1], "startup_s", "s", "scale: mount start-up"),
            (rest[2], "rss_after_lookups_kib", "MiB", "scale: daemon RSS"),
        ):
            values = [row[key] / (1024 if key.startswith("rss") else 1) for row in results.scale]
            bars = ax.bar([f"{n:.0e}" for n in sizes], values, color="#2e86c1")
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(
                    fmt(value),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_title(name, fontsize=9)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("files in store")
            ax.margins(y=0.18)
        if any(row["files"] == 1_000_000 for row in results.scale):
            rest[1].axhline(STARTUP_TARGET_S, color="red", linestyle="--", linewidth=0.8)
        used = len(groups) + 3
    else:
        used = len(groups)
    for ax in flat[used:]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict[str, object]:
    model = ""
    with suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": model,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    with suppress(Exception):
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        info["mithrilfs_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "mithrilfs"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    with suppress(Exception):
        import importlib.metadata as md

        info["versions"] = {p: md.version(p) for p in ("torch", "triton", "pyfuse3")}
    return info


# -- main ------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer files and repetitions, no 10^6 store (< 5 min)"
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--png", type=Path, help="write a chart here")
    parser.add_argument(
        "--workloads",
        "--workload",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (default: all but ranks)",
    )
    parser.add_argument(
        "--repeat", type=int, help="measured repetitions per workload (a warm-up is added)"
    )
    parser.add_argument(
        "--ranks", help="comma-separated rank counts for the ranks workload (default 2,4,8)"
    )
    parser.add_argument("--tmpdir", type=Path, help="where to make the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--profile-daemon",
        type=Path,
        metavar="DIR",
        help="run workload daemons under cProfile, writing .prof files to DIR",
    )
    args = parser.parse_args()

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(ALL_WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    cfg = dict(DEFAULTS["quick" if args.quick else "full"])
    if args.repeat is not None:
        for workload in ALL_WORKLOADS:
            cfg[workload] = (max(1, args.repeat), cfg[workload][1])
    if args.ranks:
        counts = [n.strip() for n in args.ranks.split(",")]
        if not all(n.isdigit() and int(n) > 0 for n in counts):
            parser.error(f"--ranks expects comma-separated positive integers, got {args.ranks!r}")
        cfg["rank_counts"] = tuple(int(n) for n in counts)
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        print("bench: needs FUSE 3 (fusermount3 and /dev/fuse)", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    results = Results()
    results.notes["machine"] = machine_info()
    results.notes["command"] = " ".join(
        [os.path.relpath(PYTHON, REPO) if PYTHON.startswith(str(REPO)) else PYTHON, *sys.argv]
    )
    results.notes["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    base = Path(tempfile.mkdtemp(prefix="mithrilfs-bench-", dir=args.tmpdir))
    log(f"bench: workloads {','.join(workloads)} in {base} ({'quick' if args.quick else 'full'})")
    started = time.perf_counter()
    try:
        if any(w.startswith("torch") or w == "triton" for w in workloads):
            # Bring torch and triton into the page cache, so that the first
            # measured process does not pay for reading them from disk.
            subprocess.run([PYTHON, "-c", "import torch, triton"], check=False, capture_output=True)
        for workload in workloads:
            t0 = time.perf_counter()
            log(f"== {workload}")
            try:
                if workload in ("torch_mlp", "torch_transformer", "triton"):
                    bench_compile(workload, cfg, base, results, args.profile_daemon)
                elif workload == "tree":
                    bench_tree(cfg, base, results, args.profile_daemon)
                elif workload == "scale":
                    bench_scale(cfg, base, results)
                elif workload == "ranks":
                    bench_ranks(cfg, base, results)
                elif workload == "large":
                    bench_large(cfg, base, results)
            except (Exception, KeyboardInterrupt) as exc:
                results.errors[workload] = "".join(traceback.format_exception(exc))
                log(f"!! {workload} failed: {exc!r}")
                cleanup_all_mounts()
                if isinstance(exc, KeyboardInterrupt):
                    raise
            log(f"== {workload} done in {time.perf_counter() - t0:.0f}s")
    finally:
        cleanup_all_mounts()
        left = []
        with open("/proc/self/mounts") as table:
            left = [
                line.strip() for line in table if "mithrilfs" in line and os.fspath(base) in line
            ]
        if left:
            print("bench: WARNING: mounts left behind:\n  " + "\n  ".join(left), file=sys.stderr)
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    results.notes["elapsed_s"] = time.perf_counter() - started
    results.notes["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(table_text(results))
    print(
        f"\nload average (1, 5, 15 min) at start {results.notes['machine']['loadavg_start']}, "
        f"at end {results.notes['loadavg_end']} on {os.cpu_count()} CPUs"
    )
    print(
        f"\nratio = mount / native (lower is better); medians over kept repetitions; "
        f"total {results.notes['elapsed_s']:.0f}s"
    )
    if args.json:
        payload = {
            "notes": results.notes,
            "metrics": [m.summary() for m in results.metrics.values()],
            "scale": results.scale,
            "scale_checks": [
                {"check": c, "value": v, "passed": ok} for c, v, ok in scale_checks(results)
            ],
            "errors": results.errors,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {args.json}")
    if args.png:
        machine = results.notes["machine"]
        title = (
            f"mithrilfs vs native: {machine['cpu']} x{machine['nproc']}, "
            f"kernel {machine['kernel']}, {machine['date']}"
        )
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.png, title)
        log(f"wrote {args.png}")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
