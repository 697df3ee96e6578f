"""The compile-level hit rate: cache entries found versus compiled, from real compilers.

A cold run of a compiler creates each cache entry it compiles (a miss), and
a warm run in a fresh process reads each one back (a hit).  The daemon counts
both where it sees them: the creation of an entry's marker file (Triton's
``__grp__*.json``, the file of an FX graph or AOTAutograd entry) and an open
of it for reading.  So after N entries compiled cold, `stats` says N misses
and no hit, and after the warm run N hits and no new miss: on /metrics, in
`stats --json` and in the headline "hit rate" of `mithrilfs stats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mount
from tests.test_compilers import TORCH_MLP, TRITON_KERNEL, cache_env, run_workload
from tests.test_stats import Observer, metrics_mount, mithrilfs, sample

KINDS = ("triton", "fxgraph", "aotautograd")
# Two kernels: the same source for two targets has two cache keys.
ARCHS = ("90", "80")


def entry_counts(summary: dict[str, Any]) -> dict[str, int]:
    """(kind.result) -> count, for the kinds the tests compile."""
    by_kind = summary["compiles"]["by_kind"]
    return {
        f"{kind}.{result}": by_kind.get(kind, {}).get(result, 0)
        for kind in KINDS
        for result in ("hit", "miss")
    }


def change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    old, new = entry_counts(before), entry_counts(after)
    return {key: new[key] - old[key] for key in new}


def entries_on_disk(mount: Mount, pattern: str) -> int:
    return sum(1 for path in mount.mountpoint.glob(pattern) if path.is_file())


def assert_metrics_agree(observer: Observer, summary: dict[str, Any]) -> None:
    samples = observer.scrape()
    for kind in KINDS:
        for result in ("hit", "miss"):
            exported = sample(samples, "mithrilfs_cache_entries_total", result=result, kind=kind)
            assert exported == summary["compiles"]["by_kind"][kind][result], (kind, result)


@pytest.mark.compilers
def test_triton_kernels_miss_cold_and_hit_warm(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    env = cache_env(mount.mountpoint)
    start = observer.settled()

    for arch in ARCHS:
        assert run_workload(TRITON_KERNEL, env, "--arch", arch)["cache_hit"] is False
    after_cold = observer.settled()
    kernels = entries_on_disk(mount, "triton/*/__grp__*.json")
    assert kernels == len(ARCHS)
    assert change(start, after_cold) == {
        **dict.fromkeys(entry_counts(start), 0),
        "triton.miss": kernels,
    }

    # A fresh mount: nothing the kernel cached from the cold runs is left.
    mount.remount()
    for arch in ARCHS:
        assert run_workload(TRITON_KERNEL, env, "--arch", arch)["cache_hit"] is True
    after_warm = observer.settled()
    assert change(after_cold, after_warm) == {
        **dict.fromkeys(entry_counts(start), 0),
        "triton.hit": kernels,
    }
    assert after_warm["compiles"]["hit_rate"] == pytest.approx(0.5)
    assert_metrics_agree(observer, after_warm)

    # The same process, a second time on the same mount: the kernel's dentries
    # are warm now, but every lookup a compiler makes still opens the group file.
    assert run_workload(TRITON_KERNEL, env, "--arch", ARCHS[0])["cache_hit"] is True
    again = observer.settled()
    assert change(after_warm, again)["triton.hit"] == 1

    text = mithrilfs("stats", mount.mountpoint)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    compiles, lookups = again["compiles"], again["lookups"]
    rate = f"{100 * compiles['hit_rate']:5.1f}%"
    # The headline is the compile-level rate: 3 kernels found, 2 compiled.
    assert lines[1] == f"hit rate      {rate}  (3 hits, 2 misses)", text.stdout
    assert lines[2] == f"  triton      {rate}  (3 hits, 2 misses)", text.stdout
    # The lookups the daemon answered follow, under their own name.
    assert lines[3].startswith("lookup hits   "), text.stdout
    assert lines[3].endswith(f"({lookups['hit']} hits, {lookups['miss']} misses)"), text.stdout


@pytest.mark.compilers
def test_inductor_graphs_miss_cold_and_hit_warm(make_mount) -> None:
    mount, observer = metrics_mount(make_mount)
    env = cache_env(mount.mountpoint)
    start = observer.settled()

    cold = run_workload(TORCH_MLP, env)
    after_cold = observer.settled()
    graphs = entries_on_disk(mount, "inductor/fxgraph/*/*/*")
    autograd = entries_on_disk(mount, "inductor/aotautograd/*/*")
    assert graphs == cold["inductor"]["fxgraph_cache_miss"] > 0, cold
    assert autograd > 0
    compiled = change(start, after_cold)
    assert compiled["fxgraph.miss"] == graphs, compiled
    assert compiled["aotautograd.miss"] == autograd, compiled
    assert compiled["fxgraph.hit"] == compiled["aotautograd.hit"] == 0, compiled

    warm = run_workload(TORCH_MLP, env)
    assert warm["inductor"]["fxgraph_cache_hit"] == graphs, warm
    after_warm = observer.settled()
    # An AOTAutograd hit loads its FX graph through the graph's own entry:
    # both are read once, nothing is compiled.
    assert change(after_cold, after_warm) == {
        **dict.fromkeys(entry_counts(start), 0),
        "fxgraph.hit": graphs,
        "aotautograd.hit": autograd,
    }
    assert_metrics_agree(observer, after_warm)


def test_entry_markers_follow_the_layouts() -> None:
    from mithrilfs.layouts import entry_marker

    def kind(path: str) -> str | None:
        marker = entry_marker([part.encode() for part in Path(path).parts])
        return None if marker is None else marker.kind

    assert kind("triton/KEY/__grp__add_kernel.json") == "triton"
    assert kind("triton/KEY/add_kernel.cubin") is None
    assert kind("triton/KEY/tmp.pid_1_2/__grp__add_kernel.json") is None
    assert kind("inductor/triton/0/KEY/__grp__k.json") == "triton"
    assert kind("inductor/fxgraph/ab/fKEY/0123abcd") == "fxgraph"
    assert kind("inductor/fxgraph/ab/fKEY/.0123abcd.1.2.tmp") is None
    assert kind("inductor/aotautograd/aKEY/0123abcd") == "aotautograd"
    assert kind("inductor/ab/cabKEY.py") == "code"
    assert kind("inductor/ab/cabKEY.so") is None
    assert kind("other/file") is None
