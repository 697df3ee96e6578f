#!/usr/bin/env python3
"""Benchmark: the cost of evicting one entry does not grow with the size of the store.

Builds stores of 10^3, 10^4 and 10^5 cache entries offline, through the Index
API (the way a daemon would have left them: Triton-shaped key directories of
two files each, every file with its own content and a real object file), then
times `Evictor.evict_until_below` removing the N least recently read entries,
several rounds per store (medians), and prints a markdown table.  The time is
split into the index's share (choosing victims, removing rows, one transaction
per entry) and the filesystem's (unlinking object files), which depends on the
backing disk and on how much of it the kernel has cached.

    .venv/bin/python scripts/bench_eviction.py [--sizes 1000,10000,100000] [--evict 100]

Not a test: it asserts nothing about time, it reports.  The store is built in
a temporary directory (``--dir`` to choose where) and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mithrilfs.eviction import Evictor  # noqa: E402
from mithrilfs.index import SUPER_ROOT  # noqa: E402
from mithrilfs.repository import Repository  # noqa: E402
from mithrilfs.store import ContentStore  # noqa: E402

BUILD_BATCH = 5000  # entries per transaction while building
FILES = ("add_kernel.cubin", "__grp__add_kernel.json")


def build(store: Path, entries: int) -> tuple[Repository, list[int]]:
    """A store of *entries* Triton-shaped entries, and each entry's bytes, oldest first."""
    repo = Repository.open(store)
    repo.recover()
    index, content = repo.index, repo.content
    owner = (os.geteuid(), os.getegid())
    class_root = index.ensure_dir(SUPER_ROOT, b"cuda-sm90", 0o755, *owner)
    triton = index.ensure_dir(class_root.id, b"triton", 0o755, *owner)
    sizes: list[int] = []
    for start in range(0, entries, BUILD_BATCH):
        with index.transaction():
            for i in range(start, min(entries, start + BUILD_BATCH)):
                key = index.make_node(triton.id, b"K%058d" % i, stat.S_IFDIR | 0o755, *owner)
                entry_bytes = 0
                for name in FILES:
                    data = b"%s/%d:" % (name.encode(), i) * (8 if name.endswith(".json") else 40)
                    digest = blake3.blake3(data).digest()
                    path = content.object_path(digest)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    node = index.make_node(key.id, name.encode(), stat.S_IFREG | 0o644, *owner)
                    index.set_content(node.id, digest, len(data), time.time_ns())
                    entry_bytes += len(data)
                sizes.append(entry_bytes)
    return repo, sizes


class TimedContentStore(ContentStore):
    """The object store, timing the deletion of object files (the filesystem's share)."""

    deleting = 0.0

    def delete(self, digest: bytes) -> None:
        started = time.perf_counter()
        super().delete(digest)
        self.deleting += time.perf_counter() - started


def time_evictions(
    repo: Repository, sizes: list[int], count: int, rounds: int
) -> list[tuple[float, float]]:
    """(total, unlinking objects) seconds of each round evicting *count* least recently read."""
    content = TimedContentStore(repo.root)
    evictor = Evictor(repo.index, content, cap=repo.index.stored_bytes)
    timings = []
    for round_ in range(rounds):
        oldest = sizes[round_ * count : (round_ + 1) * count]
        target = repo.index.stored_bytes - sum(oldest)
        content.deleting = 0.0
        started = time.perf_counter()
        result = evictor.evict_until_below(target, reason="gc")
        timings.append((time.perf_counter() - started, content.deleting))
        assert result.entries == count, (result, count)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="store sizes, in entries")
    parser.add_argument("--evict", type=int, default=100, help="entries evicted per round (N)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per store")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores")
    options = parser.parse_args()

    rows = []
    for entries in (int(size) for size in options.sizes.split(",")):
        workdir = Path(tempfile.mkdtemp(prefix="mithrilfs-bench-evict-", dir=options.dir))
        try:
            started = time.perf_counter()
            repo, sizes = build(workdir / "store", entries)
            built = time.perf_counter() - started
            try:
                timings = time_evictions(repo, sizes, options.evict, options.rounds)
            finally:
                repo.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        total = statistics.median(t for t, _unlink in timings)
        index = statistics.median(t - unlink for t, unlink in timings)
        unlink = statistics.median(unlink for _t, unlink in timings)
        rows.append((entries, built, total, index, unlink))
        print(f"built {entries} entries in {built:.1f}s; rounds: {timings}", file=sys.stderr)

    n = options.evict
    print(
        f"| entries in store | build (s) | evict {n}: total (ms) | index (ms) "
        "| index per entry (µs) | object unlinks per entry (µs) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for entries, built, total, index, unlink in rows:
        print(
            f"| {entries:,} | {built:.1f} | {total * 1e3:.1f} | {index * 1e3:.1f} "
            f"| {index / n * 1e6:.0f} | {unlink / n * 1e6:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
