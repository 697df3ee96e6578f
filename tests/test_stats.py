"""Counters, gauges and logs, read the ways an operator reads them.

Every figure is read twice: from `mithrilfs stats MOUNTPOINT --json` (what the
daemon saved into the index) and from the Prometheus endpoint (what it
published in memory), and the two must agree.  The daemon saves about once
a second and stamps each save, so a test that wants the numbers "as of now"
waits for a save that began after it stopped doing things (polling with a
deadline, never sleeping), then compares them with what it did: compiles
through the mount (triton.compile for sm90 and torch.compile, each in fresh
processes), or writes and reads whose effect on each counter is known
exactly.

Logging: the level, stderr in the foreground, the store's log file for a
daemon without syslog, and --log-file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mithrilfs import metrics, stats
from mithrilfs.repository import INDEX_NAME, holder_pid
from tests.conftest import Mount, run_cli, wait_for
from tests.test_compilers import TORCH_MLP, TRITON_KERNEL, cache_env, run_workload

REPO = Path(__file__).resolve().parent.parent
DEVICE_CLASS = "cuda-sm90"
SETTLE_DEADLINE = 30.0
KiB = 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


mithrilfs = run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch_metrics(port: int) -> tuple[str, str]:
    """The exposition text and its content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


def parse_samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The sum of *name*'s samples that carry *labels* (whatever their other labels)."""
    return sum(
        value
        for (found, found_labels), value in samples.items()
        if found == name and labels.items() <= dict(found_labels).items()
    )


class Observer:
    """A mount's figures through `stats --json` and /metrics."""

    def __init__(self, mount: Mount, port: int | None = None) -> None:
        self.mount = mount
        self.port = port

    def stats(self, *extra: str) -> dict[str, Any]:
        result = mithrilfs("stats", self.mount.mountpoint, "--json", *extra)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        summary: dict[str, Any] = json.loads(result.stdout)
        return summary

    def settled(self) -> dict[str, Any]:
        """The figures as of this call: waits for a save that began after it."""
        since = time.time()
        index = self.mount.store / INDEX_NAME

        def saved_since() -> bool:
            saved_ms = stats.read_saved(index).gauges.get(stats.SAVED_AT_GAUGE, 0)
            return saved_ms / 1000 >= since

        wait_for(saved_since, SETTLE_DEADLINE, "the daemon to save its counters")
        summary = self.stats()
        assert summary["saved_at"] >= since
        return summary

    def scrape(self) -> Samples:
        assert self.port is not None
        return parse_samples(fetch_metrics(self.port)[0])

    def agree(self, summary: dict[str, Any]) -> Samples:
        """Poll /metrics until it shows what `stats --json` showed; return the samples."""
        expected = view(summary)
        scraped: Samples = {}

        def matches() -> bool:
            nonlocal scraped
            scraped = self.scrape()
            return prometheus_view(scraped) == expected

        try:
            wait_for(matches, SETTLE_DEADLINE, "/metrics to agree with stats --json")
        except AssertionError:
            raise AssertionError(
                f"/metrics {prometheus_view(scraped)} != stats --json {expected}"
            ) from None
        return scraped


LAYOUTS = ("triton", "inductor", "other")


def view(summary: dict[str, Any]) -> dict[str, float]:
    """The figures both surfaces carry, from `stats --json`."""
    flat: dict[str, float] = {}
    for layout in LAYOUTS:
        counts = summary["lookups"]["by_layout"].get(layout, {})
        flat[f"hit.{layout}"] = counts.get("hit", 0)
        flat[f"miss.{layout}"] = counts.get("miss", 0)
        flat[f"opens.{layout}"] = summary["opens_by_layout"].get(layout, 0)
    for key in ("read_bytes", "files_sealed", "dedup_hits", "evictions", "integrity_failures"):
        flat[key] = summary[key]
    # Not store_bytes: it counts the index and its WAL, which grow between two reads.
    for key in ("logical_bytes", "object_bytes", "objects", "entries", "cap_bytes"):
        flat[key] = summary[key]
    return flat


def prometheus_view(samples: Samples) -> dict[str, float]:
    """The same figures, from /metrics."""
    dc = {"device_class": DEVICE_CLASS}
    flat: dict[str, float] = {}
    for layout in LAYOUTS:
        for result in ("hit", "miss"):
            flat[f"{result}.{layout}"] = sample(
                samples, "mithrilfs_lookups_total", result=result, layout=layout, **dc
            )
        flat[f"opens.{layout}"] = sample(samples, "mithrilfs_opens_total", layout=layout, **dc)
    flat["read_bytes"] = sample(samples, "mithrilfs_read_bytes_total", **dc)
    flat["files_sealed"] = sample(samples, "mithrilfs_files_sealed_total", **dc)
    flat["dedup_hits"] = sample(samples, "mithrilfs_dedup_hits_total", **dc)
    flat["evictions"] = sum(
        value for (name, _labels), value in samples.items() if name == "mithrilfs_evictions_total"
    )
    flat["integrity_failures"] = sample(samples, "mithrilfs_integrity_failures_total", **dc)
    for key in ("logical_bytes", "object_bytes", "objects", "entries", "cap_bytes"):
        flat[key] = sample(samples, f"mithrilfs_{key}", **dc)
    return flat


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    old, new = view(before), view(after)
    return {key: new[key] - old[key] for key in new}


def hit_rate(change: dict[str, float], layout: str) -> float:
    hits, misses = change[f"hit.{layout}"], change[f"miss.{layout}"]
    return hits / (hits + misses)


def counters_only(summary: dict[str, Any], *leave_out: str) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("saved_at", *leave_out)}


def metrics_mount(make_mount, *extra: str, name: str = "m") -> tuple[Mount, Observer]:
    port = free_port()
    mount: Mount = make_mount(
        "--device-class", DEVICE_CLASS, "--metrics-listen", f"127.0.0.1:{port}", *extra, name=name
    )
    return mount, Observer(mount, port)


# -- real compiles ----------------------------------------------------------------------


@pytest.mark.compilers
def test_triton_compile_is_counted_and_counters_survive_remount(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    env = cache_env(mount.mountpoint)
    start = observer.settled()

    cold = run_workload(TRITON_KERNEL, env, "--arch", "90")
    assert cold["cache_hit"] is False, cold
    after_cold = observer.settled()
    compiled = delta(start, after_cold)
    written = [p for p in (mount / "triton").rglob("*") if p.is_file()]
    assert compiled["miss.triton"] > 0, compiled
    # Every file triton left in its cache was sealed once, nothing else was.
    assert compiled["files_sealed"] == len(written), (compiled, written)
    assert after_cold["logical_bytes"] == sum(p.stat().st_size for p in written)
    observer.agree(after_cold)

    # Counters survive a remount: saved at unmount, loaded and published at mount,
    # before the mount reports ready (no polling).
    mount.remount()
    reloaded = observer.stats()
    # "objects" is one off after a remount: test_objects_gauge_is_the_same_after_a_remount.
    # The store's footprint moves with its index (remounting writes to it).  Per-tree
    # usage is a gauge the daemon recomputes in the background (at mount, then once a
    # minute), so it may be newer after the remount than it was after the compile.
    moving = ("objects", "store_bytes", "used_fraction", "trees")
    assert counters_only(reloaded, *moving) == counters_only(after_cold, *moving)
    assert prometheus_view(observer.scrape()) == view(reloaded)

    warm = run_workload(TRITON_KERNEL, env, "--arch", "90")
    assert warm["cache_hit"] is True, warm
    assert warm["asm"] == cold["asm"]
    after_warm = observer.settled()
    served = delta(after_cold, after_warm)
    assert served["hit.triton"] > 0, served
    assert served["files_sealed"] == 0, served
    assert served["dedup_hits"] == 0, served
    assert hit_rate(served, "triton") > hit_rate(compiled, "triton"), (compiled, served)
    # A fresh mount has an empty page cache: every byte triton loaded came through us.
    group = [mount / "triton" / relative for relative in warm["group_files"].values()]
    assert served["read_bytes"] >= sum(p.stat().st_size for p in group), served
    assert served["opens.triton"] >= len(group), served
    assert served["opens.inductor"] == 0
    observer.agree(after_warm)


@pytest.mark.compilers
def test_torch_compile_warm_run_hits_and_seals_nothing(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    env = cache_env(mount.mountpoint)
    start = observer.settled()

    cold = run_workload(TORCH_MLP, env)
    assert cold["inductor"].get("fxgraph_cache_miss", 0) > 0, cold
    after_cold = observer.settled()
    compiled = delta(start, after_cold)
    assert compiled["miss.inductor"] > 0, compiled
    assert compiled["files_sealed"] > 0, compiled
    assert after_cold["entries"] > 0
    observer.agree(after_cold)

    warm = run_workload(TORCH_MLP, env)
    assert warm["inductor"].get("fxgraph_cache_hit", 0) > 0, warm
    after_warm = observer.settled()
    served = delta(after_cold, after_warm)
    assert served["hit.inductor"] > 0, served
    assert served["opens.inductor"] > 0, served
    assert served["files_sealed"] == 0, served
    assert served["dedup_hits"] == 0, served
    assert hit_rate(served, "inductor") > hit_rate(compiled, "inductor"), (compiled, served)
    for gauge in ("logical_bytes", "object_bytes", "objects", "entries"):
        assert after_warm[gauge] == after_cold[gauge], gauge
    observer.agree(after_warm)


# -- exact counts ---------------------------------------------------------------------------


def test_counters_match_what_the_test_did(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    rng = random.Random(7)
    copies, same = 5, rng.randbytes(64 * KiB)
    distinct = {f"cab{i}": rng.randbytes((i + 1) * 10 * KiB) for i in range(3)}
    start = observer.settled()

    (mount / "triton" / "KEYD").mkdir()
    for i in range(copies):
        (mount / "triton" / "KEYD" / f"copy{i}.bin").write_bytes(same)
    (mount / "inductor" / "ab").mkdir()
    for stem, content in distinct.items():
        (mount / "inductor" / "ab" / f"{stem}.py").write_bytes(content)
    written = observer.settled()
    change = delta(start, written)
    assert change["files_sealed"] == copies + len(distinct)
    assert change["dedup_hits"] == copies - 1
    logical = copies * len(same) + sum(map(len, distinct.values()))
    sizes = [len(content) for content in distinct.values()]
    stored = len(same) + sum(sizes)
    assert written["logical_bytes"] == logical
    assert written["object_bytes"] == stored
    # What the disk holds: whole blocks of each object, and the index besides.
    assert written["store_bytes"] >= sum(-(-n // 4096) * 4096 for n in (len(same), *sizes))
    assert written["dedup_ratio"] == pytest.approx(logical / stored)
    assert written["entries"] == 1 + len(distinct)  # triton/KEYD, and one per stem
    observer.agree(written)

    mount.remount()  # an empty page cache and dentry cache
    start = observer.stats()
    for i in range(4):
        assert not (mount / "triton" / f"absent{i}").exists()
    for i in range(copies):
        assert (mount / "triton" / "KEYD" / f"copy{i}.bin").read_bytes() == same
    for stem, content in distinct.items():
        assert (mount / "inductor" / "ab" / f"{stem}.py").read_bytes() == content
    done = observer.settled()
    change = delta(start, done)
    assert change["miss.triton"] == 4
    assert change["hit.triton"] == 2 + copies  # triton, KEYD, each copy
    assert change["miss.inductor"] == 0
    assert change["hit.inductor"] == 2 + len(distinct)  # inductor, ab, each file
    assert change["opens.triton"] == copies
    assert change["opens.inductor"] == len(distinct)
    assert change["opens.other"] == 0
    assert change["read_bytes"] >= logical
    assert change["files_sealed"] == 0
    samples = observer.agree(done)
    dc = DEVICE_CLASS
    assert (
        sample(samples, "mithrilfs_lookups_total", result="miss", layout="triton", device_class=dc)
        == done["lookups"]["by_layout"]["triton"]["miss"]
    )
    assert sample(samples, "mithrilfs_opens_total", layout="inductor", device_class=dc) >= 3


def test_objects_gauge_is_the_same_after_a_remount(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    (mount / "triton" / "f").write_bytes(b"one object")
    before = observer.settled()
    mount.remount()
    after = observer.stats()
    assert after["objects"] == before["objects"], (before["objects"], after["objects"])


def test_expiry_is_counted_with_reason_max_age(make_mount) -> None:
    import sqlite3

    mount, observer = metrics_mount(make_mount)
    (mount / "triton" / "OLD").mkdir()
    (mount / "triton" / "OLD" / "k.bin").write_bytes(b"not read for a long time")
    mount.stop()
    db = sqlite3.connect(mount.store / INDEX_NAME)
    with db:
        db.execute("UPDATE cache_entries SET last_read=0")
    db.close()
    mount.start(
        "--device-class",
        DEVICE_CLASS,
        "--metrics-listen",
        f"127.0.0.1:{observer.port}",
        "--max-age",
        "7d",
    )
    index = mount.store / INDEX_NAME
    wait_for(
        lambda: stats.summarize(stats.read_saved(index))["evictions"] == 1,
        SETTLE_DEADLINE,
        "the expired entry to be dropped",
    )
    assert not (mount / "triton" / "OLD").exists()
    samples = observer.agree(observer.settled())
    reasons = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "mithrilfs_evictions_total"
    }
    assert reasons == {"max_age": 1.0}, reasons


# -- reading never disturbs -----------------------------------------------------------------


def test_reading_stats_does_not_disturb_a_writing_mount(make_mount) -> None:
    mount: Mount = make_mount()
    index = mount.store / INDEX_NAME
    rng = random.Random(3)
    contents: dict[Path, bytes] = {}
    errors: list[BaseException] = []
    cli_reads = 0
    max_files = 5000

    def write() -> None:
        try:
            i = 0
            # At least 200 files, and on until the reader has overlapped three CLI reads.
            while (i < 200 or cli_reads < 3) and i < max_files:
                path = mount / "triton" / f"K{i // 20}" / f"f{i}.bin"
                path.parent.mkdir(exist_ok=True)
                data = rng.randbytes(rng.randrange(1, 32 * KiB))
                path.write_bytes(data)
                contents[path] = data
                i += 1
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    direct_reads = 0
    try:
        while writer.is_alive():
            for _ in range(20):
                stats.summarize(stats.read_saved(index))
                direct_reads += 1
            for form in ([mount.mountpoint], ["--store", mount.store]):
                result = mithrilfs("stats", *form, "--json")
                assert result.returncode == 0, result.stderr
                json.loads(result.stdout)
            cli_reads += 1
    finally:
        cli_reads = 10**6  # let the writer stop whatever happened here
        writer.join(timeout=120)
    assert not writer.is_alive()
    assert not errors, errors
    assert len(contents) < max_files, "the reader never kept up; nothing overlapped"
    for path, data in contents.items():
        assert path.read_bytes() == data
    summary = Observer(mount).settled()
    assert summary["files_sealed"] == len(contents)
    assert summary["logical_bytes"] == sum(map(len, contents.values()))
    assert " ERROR " not in mount.log_text()


# -- the text form ------------------------------------------------------------------------------


def test_stats_text_form(make_mount) -> None:
    mount: Mount = make_mount("--cap", "64M")
    (mount / "triton" / "K").mkdir()
    for i in range(3):
        (mount / "triton" / "K" / f"same{i}").write_bytes(b"x" * 100 * KiB)
    (mount / "triton" / "K" / "other").write_bytes(b"y" * 50 * KiB)
    assert not (mount / "triton" / "missing").exists()
    lookups = Observer(mount).settled()["lookups"]
    hits, misses = lookups["hit"], lookups["miss"]
    assert lookups["by_layout"].keys() == {"triton"}  # nothing else was looked up

    result = mithrilfs("stats", mount.mountpoint)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"store         {mount.store}"
    rate = f"{100 * hits / (hits + misses):5.1f}%  ({hits} hits, {misses} misses)"
    # No compiler ran: the compile-level headline is empty, the lookups follow it.
    assert lines[1] == "hit rate        0.0%  (0 hits, 0 misses)"
    assert lines[2] == f"lookup hits   {rate}"
    assert lines[3] == f"  triton      {rate}"
    by_label = {line[:14].strip(): line[14:] for line in lines if not line.startswith(" ")}
    # Objects' blocks plus the index: more than the 150 KiB of objects, far below the cap.
    assert re.fullmatch(r"\d+\.\d KiB of 64\.0 MiB cap \(  [01]\.\d%\)", by_label["used"])
    assert by_label["dedup ratio"] == "2.33x  (350.0 KiB of files in 150.0 KiB stored, 2 objects)"
    assert by_label["entries"] == "1"
    assert by_label["sealed"] == "4 files (2 deduplicated)"
    assert by_label["evictions"] == "0 entries, 0 B freed"
    assert by_label["integrity"] == "0 corrupt objects caught"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+ s ago\)", by_label["saved"])

    by_store = mithrilfs("stats", "--store", mount.store)

    def steady(lines: list[str]) -> list[str]:
        # The footprint moves with the index between two saves, as does the time.
        return [line for line in lines[:-1] if not line.startswith("used ")]

    assert steady(by_store.stdout.splitlines()) == steady(lines)

    mount.stop()  # the saved figures stay readable without a daemon
    offline = mithrilfs("stats", "--store", mount.store)
    assert offline.returncode == 0, offline.stderr
    assert steady(offline.stdout.splitlines()) == steady(lines)

    not_a_mount = mithrilfs("stats", mount.mountpoint)
    assert not_a_mount.returncode == 1
    assert not_a_mount.stderr.strip() == f"mithrilfs: {mount.mountpoint} is not a mithrilfs mount"


def test_stats_text_of_a_store_never_served() -> None:
    text = stats.render_text(stats.summarize(stats.Snapshot([], {})))
    assert "hit rate        0.0%  (0 hits, 0 misses)\n" in text
    assert text.endswith("saved         never (no daemon has served this store yet)\n")


# -- the Prometheus exposition -----------------------------------------------------------------


# What the dashboard's queries may call besides metrics, and the clauses that list labels.
PROMQL_FUNCTIONS = frozenset({"sum", "min", "max", "rate", "increase", "clamp_max"})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})
PROMQL_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_names(expr: str) -> tuple[set[str], set[str], set[str]]:
    """The metric names, label names and functions that a PromQL query uses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values: "$instance", "hit"
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations: [$__rate_interval]
    labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", expr))
    for group in re.findall(PROMQL_GROUPING, expr):
        labels |= set(re.findall(r"\w+", group))
    expr = re.sub(r"\{[^}]*\}", "", re.sub(PROMQL_GROUPING, "", expr))
    functions = set(re.findall(r"([a-zA-Z_]\w*)\s*\(", expr))
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)) - PROMQL_KEYWORDS
    return names, labels, functions


def dashboard_queries() -> list[str]:
    """Every query of the Grafana dashboard: its panels' and its variables'."""
    dashboard = json.loads((REPO / "docs/grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, LABEL) asks what `sum by (LABEL) (SELECTOR)` would group.
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert found, variable
            queries.append(f"sum by ({found[2]}) ({found[1]})")
    return queries


def test_promql_names_sees_every_name_of_a_query() -> None:
    query = (
        'clamp_max(sum by (instance) (mithrilfs_scrub_pass_bytes{instance=~"$instance"}) / '
        "sum by (instance) (rate(mithrilfs_objcts[$__rate_interval])), 1) > bool 0"
    )
    names, labels, functions = promql_names(query)
    assert names == {"mithrilfs_scrub_pass_bytes", "mithrilfs_objcts"}
    assert labels == {"instance"}
    assert functions == {"clamp_max", "sum", "rate"}
    names, labels, _ = promql_names('sum by (kind) (mithrilfs_cache_entries_total{reslt="hit"})')
    assert (names, labels) == ({"mithrilfs_cache_entries_total"}, {"kind", "reslt"})


def test_metrics_exposition_follows_conventions(make_mount) -> None:
    mount, observer = metrics_mount(make_mount, "--cap", "64M")
    # Published before the mount reports ready: no zeros in the first second.
    text, content_type = fetch_metrics(observer.port or 0)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert sample(parse_samples(text), "mithrilfs_cap_bytes", device_class=DEVICE_CLASS) == 64 << 20

    (mount / "triton" / "K").mkdir()
    (mount / "triton" / "K" / "k.bin").write_bytes(b"kernel")
    (mount / "triton" / "K" / "copy.bin").write_bytes(b"kernel")
    assert (mount / "triton" / "K" / "k.bin").read_bytes() == b"kernel"
    assert not (mount / "inductor" / "nothing").exists()
    observer.agree(observer.settled())
    text, _ = fetch_metrics(observer.port or 0)

    families = list(text_string_to_metric_families(text))
    exposed: set[str] = set()
    for family in families:
        assert family.name.startswith("mithrilfs_"), family.name
        exposed_name = family.name + ("_total" if family.type == "counter" else "")
        exposed.add(exposed_name)
        assert family.type in ("counter", "gauge"), family
        assert f"# HELP {exposed_name} {family.documentation}\n" in text
        assert family.documentation
        assert f"# TYPE {exposed_name} {family.type}\n" in text
        if "bytes" in exposed_name:
            assert exposed_name.endswith(("_bytes", "_bytes_total")), exposed_name
        for s in family.samples:
            assert s.name == exposed_name, s
            assert s.labels["device_class"] == DEVICE_CLASS, s
            assert s.value >= 0
    assert len(exposed) == len(stats.COUNTERS) + len(stats.GAUGES) + len(metrics.TREE_GAUGES)
    # prometheus_client writes labels sorted by name.
    assert (
        'mithrilfs_lookups_total{device_class="cuda-sm90",layout="inductor",result="miss",'
        'tree="shared"} 1.0\n' in text
    ), text
    samples = parse_samples(text)
    dc = DEVICE_CLASS
    assert (
        sample(samples, "mithrilfs_lookups_total", result="hit", layout="triton", device_class=dc)
        >= 1
    )
    assert sample(samples, "mithrilfs_files_sealed_total", device_class=dc) == 2
    assert sample(samples, "mithrilfs_dedup_hits_total", device_class=dc) == 1
    assert sample(samples, "mithrilfs_opens_total", layout="triton", device_class=dc) == 1
    assert sample(samples, "mithrilfs_object_bytes", device_class=dc) == len(b"kernel")
    assert sample(samples, "mithrilfs_store_bytes", device_class=dc) >= 4096  # a whole block
    assert sample(samples, "mithrilfs_logical_bytes", device_class=dc) == 2 * len(b"kernel")

    # What the operations guide and the Grafana dashboard query exists.
    documented = set()
    for doc in ("docs/operations.md", "docs/grafana-dashboard.json"):
        documented |= set(re.findall(r"mithrilfs_[a-z_]*[a-z]", (REPO / doc).read_text()))
    assert documented <= exposed, documented - exposed
    # Every query of the dashboard asks for metrics, labels and functions that exist, so a
    # misspelt name fails here instead of drawing an empty panel.
    labels_exposed = {"instance", "job", "device_class", "tree"}  # the scrape adds the first two
    labels_exposed |= {label for _help, names in stats.COUNTERS.values() for label in names}
    for query in dashboard_queries():
        names, labels, functions = promql_names(query)
        assert names, query
        assert names <= exposed, (query, names - exposed)
        assert labels <= labels_exposed, (query, labels - labels_exposed)
        assert functions <= PROMQL_FUNCTIONS, (query, functions - PROMQL_FUNCTIONS)


# -- logging --------------------------------------------------------------------------------------


def log_levels(text: str) -> set[str]:
    return set(re.findall(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR) ", text, re.MULTILINE))


def test_log_level_selects_what_is_logged(make_mount) -> None:
    debug: Mount = make_mount("--log-level", "DEBUG", name="debug")
    default: Mount = make_mount(name="default")
    quiet: Mount = make_mount("--log-level", "WARNING", name="quiet")
    for mount in (debug, default, quiet):
        (mount / "triton" / "f").write_bytes(b"x")
        mount.stop()
    assert {"DEBUG", "INFO"} <= log_levels(debug.log_text()), debug.log_text()
    assert "DEBUG mithrilfs.daemon: fuse options " in debug.log_text()
    assert log_levels(default.log_text()) == {"INFO"}, default.log_text()
    assert "INFO mithrilfs.daemon: serving store " in default.log_text()
    assert quiet.log_text() == ""


def test_foreground_logs_to_stderr(tmp_path: Path) -> None:
    store, mountpoint, stderr_path = tmp_path / "store", tmp_path / "mnt", tmp_path / "stderr"
    mountpoint.mkdir()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mithrilfs",
                "mount",
                str(mountpoint),
                "--store",
                str(store),
                "--foreground",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(
            lambda: os.path.ismount(mountpoint), 30, "the mount", alive=lambda: proc.poll() is None
        )
        (mountpoint / "triton" / "f").write_bytes(b"x")
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert proc.wait(timeout=30) == 0
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logged = stderr_path.read_text()
    assert "INFO mithrilfs.daemon: serving store" in logged, logged
    assert f"store {store} closed cleanly" in logged, logged
    assert not (store / "mithrilfs.log").exists()
    assert mithrilfs("fsck", "--store", store).returncode == 0


@pytest.fixture
def daemons() -> Iterator[list[tuple[Path, Path]]]:
    """(mountpoint, store) of daemonized mounts: never leave one behind."""
    pairs: list[tuple[Path, Path]] = []
    yield pairs
    for mountpoint, store in pairs:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        pid = holder_pid(store)
        if pid is not None and pid != os.getpid():
            os.kill(pid, 9)


def mount_daemon_and_unmount(daemons: list[tuple[Path, Path]], tmp_path: Path, *args: str) -> Path:
    """`mithrilfs mount` (daemonized) from *tmp_path*, write a file, `mithrilfs umount`."""
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    daemons.append((mountpoint, store))
    mounted = mithrilfs("mount", mountpoint, "--store", store, *args, cwd=tmp_path)
    assert mounted.returncode == 0, mounted.stderr
    (mountpoint / "triton" / "f").write_bytes(b"x")
    unmounted = mithrilfs("umount", mountpoint)
    assert unmounted.returncode == 0, unmounted.stderr
    assert mithrilfs("fsck", "--store", store).returncode == 0
    return store


def test_daemon_without_syslog_logs_into_the_store(
    daemons: list[tuple[Path, Path]], tmp_path: Path
) -> None:
    store = mount_daemon_and_unmount(daemons, tmp_path)
    log_file = store / "mithrilfs.log"
    if os.path.exists("/dev/log"):
        assert not log_file.exists() or "serving store" not in log_file.read_text()
    else:
        logged = log_file.read_text()
        assert "INFO mithrilfs.daemon: serving store" in logged, logged
        assert "closed cleanly" in logged
        assert log_file.stat().st_mode & 0o777 == 0o600


def test_daemon_honours_a_relative_log_file_and_level(
    daemons: list[tuple[Path, Path]], tmp_path: Path
) -> None:
    name = f"mithrilfs-test-{os.getpid()}-{tmp_path.name}.log"
    try:
        store = mount_daemon_and_unmount(
            daemons, tmp_path, "--log-file", name, "--log-level", "DEBUG"
        )
        assert not Path("/", name).exists(), "the daemon resolved --log-file after chdir('/')"
    finally:
        Path("/", name).unlink(missing_ok=True)
    logged = (tmp_path / name).read_text()
    assert {"DEBUG", "INFO"} <= log_levels(logged), logged
    assert not (store / "mithrilfs.log").exists()


def test_bad_log_level_is_refused(tmp_path: Path) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    result = mithrilfs("mount", mountpoint, "--store", store, "-o", "log_level=loud")
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        "mithrilfs: invalid log level 'loud': expected one of DEBUG, INFO, WARNING, ERROR"
    ]
    assert not os.path.ismount(mountpoint)
    assert not store.exists()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger that `_setup_logging` replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("socket_kind", ["none", "listening", "dead"])
def test_daemon_logging_syslog_or_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, socket_kind: str
) -> None:
    from mithrilfs import daemon

    store = tmp_path / "store"
    store.mkdir()
    address = tmp_path / "log-socket"
    listener = None
    if socket_kind == "listening":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(address))
        listener.settimeout(10)
    elif socket_kind == "dead":
        address.write_bytes(b"")  # exists, but nobody listens
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", str(address))
    config = daemon.MountConfig(
        mountpoint=tmp_path, store=store, device_class=DEVICE_CLASS, log_level="DEBUG"
    )
    try:
        daemon._setup_logging(config, daemon=True)
        logging.getLogger("mithrilfs.test").debug("hello %s", socket_kind)
        if listener is not None:
            datagram = listener.recv(4096)
            assert datagram == b"<15>mithrilfs: DEBUG mithrilfs.test: hello listening\x00"
            assert not (store / "mithrilfs.log").exists()
        else:
            logged = (store / "mithrilfs.log").read_text()
            assert logged.endswith(f" DEBUG mithrilfs.test: hello {socket_kind}\n"), logged
    finally:
        if listener is not None:
            listener.close()
