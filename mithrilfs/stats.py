"""Counters and gauges: kept by the daemon, shown by `mithrilfs stats` and /metrics.

The daemon counts on the request path in a plain dict (no I/O), and every
few seconds saves the counters and gauges to the index in one transaction
and publishes an immutable snapshot.  `mithrilfs stats MOUNTPOINT` asks the
daemon (admin socket), which answers with the saved values, limited to the
caller's tree for a user who is not trusted (`of_tree`); `mithrilfs stats
--store` reads them through a read-only SQLite connection, which never blocks
the daemon; the Prometheus endpoint, served from its own thread, reads only
the snapshot.
Counters survive a remount because they are loaded back from the index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mithrilfs.index import IndexReader
from mithrilfs.layouts import MARKER_KINDS, SHARED_TREE
from mithrilfs.units import format_size

# name -> (help text, label names).  Names follow Prometheus conventions;
# the exported metric is "mithrilfs_" + name.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cache_entries_total": (
        "Compiler cache entries found (hit: a compiler read the entry) or compiled (miss: "
        "a compiler created it), by kind: triton kernel, fxgraph, aotautograd, code",
        ("result", "kind", "tree"),
    ),
    "lookups_total": (
        "Name lookups the daemon answered, by whether the name existed (a hit from the shared "
        "tree counts here too); the kernel answers repeated lookups itself, unseen here",
        ("result", "layout", "tree"),
    ),
    "opens_total": ("Files opened", ("layout", "tree")),
    "shared_hits_total": (
        "Names a private tree took from the shared tree (cloned at first use)",
        ("tree",),
    ),
    "read_bytes_total": ("Bytes read through the mount", ()),
    "files_sealed_total": ("Files whose content was sealed into the store", ()),
    "dedup_hits_total": ("Sealed files whose content was already stored", ()),
    "evictions_total": ("Cache entries evicted", ("reason",)),
    "evicted_bytes_total": ("Stored bytes freed by eviction", ()),
    "integrity_failures_total": ("Objects whose bytes did not match their hash", ()),
    "request_verifications_total": (
        "Objects hashed on the request path before serving (no valid verification mark)",
        (),
    ),
    "request_verified_bytes_total": ("Bytes hashed on the request path before serving", ()),
    "scrub_verified_bytes_total": ("Bytes the background scrub hashed", ()),
    "scrub_findings_total": ("Damaged or missing objects the background scrub found", ()),
    "scrub_passes_total": ("Full passes of the background scrub over every object", ()),
    "remote_hits_total": ("Local misses served from the shared tier", ()),
    "remote_misses_total": ("Local misses the shared tier did not have either", ()),
    "remote_errors_total": ("Shared-tier operations that failed or timed out", ()),
    "remote_fetched_bytes_total": ("Bytes fetched from the shared tier", ()),
    "remote_published_total": ("Objects published to the shared tier", ()),
}

GAUGES: dict[str, str] = {
    "logical_bytes": "Sum of the sizes of all files in the store",
    "store_bytes": "Bytes the store takes on disk, as du counts them (counted against the cap)",
    "object_bytes": "Bytes of stored objects after dedup (their sizes, not their blocks)",
    "objects": "Distinct content objects stored",
    "entries": "Cache entries (units of eviction)",
    "cap_bytes": "The store's size cap",
    "remote_publish_backlog": "Objects waiting to be published to the shared tier",
    "scrub_pass_started": "Unix time the background scrub's current (or last) pass started",
    "scrub_pass_objects": "Objects the background scrub verified in its current pass",
    "scrub_pass_bytes": "Bytes the background scrub verified in its current pass",
    "scrub_last_finding": "Unix time of the scrub's last damaged object (0: none)",
}

# Saved with the gauges but not exported: when the daemon last saved, so that
# `mithrilfs stats` can tell fresh numbers from those of a daemon that died
# (and tests can wait for a save that follows what they did).
SAVED_AT_GAUGE = "saved_at_ms"

LabelKey = tuple[tuple[str, str], ...]


@dataclass
class Stats:
    device_class: str
    counters: dict[tuple[str, LabelKey], int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    tree_usage: dict[str, tuple[int, int]] = field(default_factory=dict)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0) + amount

    def set_gauge(self, name: str, value: int) -> None:
        self.gauges[name] = value

    def mark_saved(self) -> None:
        """Stamp the values about to be saved; call before reading the counters."""
        self.gauges[SAVED_AT_GAUGE] = time.time_ns() // 1_000_000

    def rows(self) -> Iterator[tuple[str, str, int]]:
        """(name, labels as JSON, value) rows for saving, device class included."""
        for (name, labels), value in self.counters.items():
            all_labels = dict(labels, device_class=self.device_class)
            yield name, json.dumps(all_labels, sort_keys=True), value

    def load_rows(self, rows: Iterator[tuple[str, str, int]]) -> None:
        for name, labels_json, value in rows:
            labels = json.loads(labels_json)
            if labels.pop("device_class", None) != self.device_class:
                continue
            self.counters[(name, tuple(sorted(labels.items())))] = value

    def snapshot(self) -> Snapshot:
        return Snapshot(
            counters=[
                (name, dict(labels, device_class=self.device_class), value)
                for (name, labels), value in self.counters.items()
            ],
            gauges=dict(self.gauges),
            tree_usage=dict(self.tree_usage),
        )


@dataclass(frozen=True)
class Snapshot:
    counters: list[tuple[str, dict[str, str], int]]
    gauges: dict[str, int]
    # tree -> (bytes of files, files): computed when `stats` runs, or by the
    # daemon at a slow pace for /metrics; never on the request path.
    tree_usage: dict[str, tuple[int, int]] = field(default_factory=dict)


def tree_usage(index: IndexReader) -> dict[str, tuple[int, int]]:
    """(bytes of files, files) per tree, all device classes together.

    The shared tree is a class root minus its `users/`; each private tree is
    named by its user.  Bytes are what the files hold before dedup: an
    object used by two trees counts in both.
    """
    usage: dict[str, tuple[int, int]] = {}

    def add(tree: str, found: tuple[int, int]) -> None:
        size, files = usage.get(tree, (0, 0))
        usage[tree] = (size + found[0], files + found[1])

    def files_below(directory: int) -> tuple[int, int]:
        files, size, _entries = index.file_usage(directory)
        return size, files

    for _class_name, class_root in index.class_roots():
        whole = files_below(class_root)
        private = (0, 0)
        for name, root in index.private_roots(class_root):
            found = files_below(root)
            add(name.decode(errors="replace"), found)
            private = (private[0] + found[0], private[1] + found[1])
        add(SHARED_TREE, (whole[0] - private[0], whole[1] - private[1]))
    return usage


def read_tree_usage(index_path: Path) -> dict[str, tuple[int, int]]:
    """`tree_usage` through a connection of its own (the daemon calls it in a thread)."""
    index = IndexReader.open_read_only(index_path)
    try:
        return tree_usage(index)
    finally:
        index.close()


def read_saved(index_path: Path) -> Snapshot:
    """The counters and gauges a daemon last saved, read without disturbing it."""
    index = IndexReader.open_read_only(index_path)
    try:
        counters = index.load_counters()
        gauges = index.saved_gauges()
        usage = tree_usage(index)
    finally:
        index.close()
    return snapshot_of(counters, gauges, usage)


def snapshot_of(
    counters: Iterable[tuple[str, str, int]],
    gauges: Iterable[tuple[str, object]],
    usage: dict[str, tuple[int, int]] | None = None,
) -> Snapshot:
    """A snapshot of saved rows: (name, labels as JSON, value) and (gauge, value)."""
    return Snapshot(
        [(name, json.loads(labels), value) for name, labels, value in counters],
        {name: int(value) for name, value in gauges if isinstance(value, int | str)},
        usage or {},
    )


def of_tree(snapshot: Snapshot, tree: str, usage: Mapping[str, int]) -> Snapshot:
    """What one private tree's owner sees: its counters, its usage, the store's cap."""
    return Snapshot(
        [row for row in snapshot.counters if row[1].get("tree") == tree],
        {
            **{k: v for k, v in snapshot.gauges.items() if k in ("cap_bytes", SAVED_AT_GAUGE)},
            **usage,
        },
        {tree: (usage["logical_bytes"], usage.get("files", 0))} if "logical_bytes" in usage else {},
    )


def summarize(snapshot: Snapshot) -> dict[str, Any]:
    """The stable JSON form of `mithrilfs stats --json`."""

    def total(name: str, **match: str) -> int:
        return sum(
            value
            for counter, labels, value in snapshot.counters
            if counter == name and all(labels.get(k) == v for k, v in match.items())
        )

    layouts: dict[str, dict[str, int]] = {}
    kinds: dict[str, dict[str, int]] = {kind: {"hit": 0, "miss": 0} for kind in MARKER_KINDS}
    opens_by_layout: dict[str, int] = {}
    trees: dict[str, dict[str, int]] = {}

    def tree_of(labels: dict[str, str]) -> dict[str, int]:
        return trees.setdefault(
            labels.get("tree") or SHARED_TREE,
            {"hit": 0, "miss": 0, "from_shared": 0, "opens": 0, "logical_bytes": 0, "files": 0},
        )

    for name, labels, value in snapshot.counters:
        if name == "cache_entries_total":
            kind = kinds.setdefault(labels.get("kind", "other"), {"hit": 0, "miss": 0})
            kind[labels.get("result", "miss")] += value
        elif name == "lookups_total":
            layout = layouts.setdefault(labels.get("layout", "other"), {"hit": 0, "miss": 0})
            layout[labels.get("result", "miss")] += value
            tree_of(labels)[labels.get("result", "miss")] += value
        elif name == "opens_total":
            key = labels.get("layout", "other")
            opens_by_layout[key] = opens_by_layout.get(key, 0) + value
            tree_of(labels)["opens"] += value
        elif name == "shared_hits_total":
            tree_of(labels)["from_shared"] += value
    for tree, (size, files) in snapshot.tree_usage.items():
        counts = tree_of({"tree": tree})
        counts["logical_bytes"], counts["files"] = size, files
    hits, misses = total("lookups_total", result="hit"), total("lookups_total", result="miss")
    found = total("cache_entries_total", result="hit")
    compiled = total("cache_entries_total", result="miss")
    gauges = snapshot.gauges
    logical, stored = gauges.get("logical_bytes", 0), gauges.get("store_bytes", 0)
    classes = sorted({labels.get("device_class", "") for _n, labels, _v in snapshot.counters})
    return {
        "device_classes": classes,
        # Compile-level: cache entries a compiler found (hit) or had to create (miss).
        "compiles": {
            "hit": found,
            "miss": compiled,
            "hit_rate": _ratio(found, found + compiled),
            "by_kind": {
                name: dict(counts, hit_rate=_ratio(counts["hit"], counts["hit"] + counts["miss"]))
                for name, counts in kinds.items()
            },
        },
        # Name lookups the daemon saw (the kernel answers repeated ones itself).
        "lookups": {
            "hit": hits,
            "miss": misses,
            "hit_rate": _ratio(hits, hits + misses),
            "by_layout": {
                name: dict(counts, hit_rate=_ratio(counts["hit"], counts["hit"] + counts["miss"]))
                for name, counts in sorted(layouts.items())
            },
        },
        "opens": total("opens_total"),
        # Per tree ("shared" or a user's tree name): own hits and misses, names
        # taken from the shared tree, opens, and the bytes and files it holds.
        "trees": {name: dict(counts) for name, counts in sorted(trees.items())},
        "opens_by_layout": dict(sorted(opens_by_layout.items())),
        "read_bytes": total("read_bytes_total"),
        "files_sealed": total("files_sealed_total"),
        "dedup_hits": total("dedup_hits_total"),
        "evictions": total("evictions_total"),
        "evicted_bytes": total("evicted_bytes_total"),
        "integrity_failures": total("integrity_failures_total"),
        # Objects hashed on the request path because they had no valid mark.
        "request_verifications": total("request_verifications_total"),
        "request_verified_bytes": total("request_verified_bytes_total"),
        "scrub": {
            "pass_started": gauges.get("scrub_pass_started", 0),
            "objects_verified": gauges.get("scrub_pass_objects", 0),
            "bytes_verified": gauges.get("scrub_pass_bytes", 0),
            "passes": total("scrub_passes_total"),
            "findings": total("scrub_findings_total"),
            "last_finding": gauges.get("scrub_last_finding", 0) or None,
        },
        "remote": {
            "hits": total("remote_hits_total"),
            "misses": total("remote_misses_total"),
            "errors": total("remote_errors_total"),
            "fetched_bytes": total("remote_fetched_bytes_total"),
            "published": total("remote_published_total"),
            "publish_backlog": gauges.get("remote_publish_backlog", 0),
        },
        "logical_bytes": logical,
        "store_bytes": stored,
        "object_bytes": gauges.get("object_bytes", stored),
        "dedup_ratio": _ratio(logical, gauges.get("object_bytes", stored)),
        "objects": gauges.get("objects", 0),
        "entries": gauges.get("entries", 0),
        "cap_bytes": gauges.get("cap_bytes", 0),
        "used_fraction": _ratio(stored, gauges.get("cap_bytes", 0)),
        # Unix seconds of the daemon's last save (None: never saved).
        "saved_at": gauges[SAVED_AT_GAUGE] / 1000 if SAVED_AT_GAUGE in gauges else None,
    }


def render_text(summary: Mapping[str, Any], now: float | None = None) -> str:
    compiles = summary.get("compiles", {"hit": 0, "miss": 0, "hit_rate": 0.0, "by_kind": {}})
    lookups = summary["lookups"]
    lines = [_rate_line("hit rate", compiles)]
    lines += [
        _rate_line(f"  {name}", counts)
        for name, counts in compiles["by_kind"].items()
        if counts["hit"] or counts["miss"]
    ]
    lines.append(_rate_line("lookup hits", lookups))
    lines += [_rate_line(f"  {name}", counts) for name, counts in lookups["by_layout"].items()]
    for name, counts in summary.get("trees", {}).items():
        lines.append(
            f"  tree {name:<16} {counts['hit']} hits ({counts['from_shared']} from shared), "
            f"{counts['miss']} misses, {counts['files']} files, "
            f"{format_size(counts['logical_bytes'])}"
        )
    lines += [
        f"used          {format_size(summary['store_bytes'])} of "
        f"{format_size(summary['cap_bytes'])} cap ({_percent(summary['used_fraction'])})",
        f"dedup ratio   {summary['dedup_ratio']:.2f}x  "
        f"({format_size(summary['logical_bytes'])} of files in "
        f"{format_size(summary['object_bytes'])} stored, {summary['objects']} objects)",
        f"entries       {summary['entries']}",
        f"sealed        {summary['files_sealed']} files ({summary['dedup_hits']} deduplicated)",
        f"evictions     {summary['evictions']} entries, "
        f"{format_size(summary['evicted_bytes'])} freed",
        f"integrity     {summary['integrity_failures']} corrupt objects caught",
        f"verified      {summary['request_verifications']} objects hashed before serving "
        f"({format_size(summary['request_verified_bytes'])})",
        _scrub_line(summary["scrub"]),
    ]
    remote = summary["remote"]
    if any(remote.values()):
        lines.append(
            f"shared tier   {remote['hits']} hits, {remote['misses']} misses, "
            f"{remote['errors']} errors, {format_size(remote['fetched_bytes'])} fetched, "
            f"backlog {remote['publish_backlog']}"
        )
    lines.append(f"saved         {_age(summary.get('saved_at'), now)}")
    return "\n".join(lines) + "\n"


def _scrub_line(scrub: Mapping[str, Any]) -> str:
    if not scrub["pass_started"]:
        return "scrub         not started"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(scrub["pass_started"]))
    last = scrub["last_finding"]
    finding = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "none"
    return (
        f"scrub         pass from {started}: {scrub['objects_verified']} objects, "
        f"{format_size(scrub['bytes_verified'])} verified; {scrub['passes']} passes done, "
        f"{scrub['findings']} damaged found (last: {finding})"
    )


def _rate_line(label: str, counts: Mapping[str, Any]) -> str:
    return (
        f"{label:<13} {_percent(counts['hit_rate'])}  "
        f"({counts['hit']} hits, {counts['miss']} misses)"
    )


def _age(saved_at: float | None, now: float | None) -> str:
    """When the numbers were saved: a daemon saves every second while it serves."""
    if saved_at is None:
        return "never (no daemon has served this store yet)"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved_at))
    age = max(0.0, (time.time() if now is None else now) - saved_at)
    return f"{stamp} ({age:.0f} s ago)"


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}%"
