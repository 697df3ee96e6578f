"""Which files form one cache entry (the unit of eviction), for the trees the compilers write.

The paths are the ones torch 2.13 and Triton 3.9 produce, relative to the
mount root; `entry_rule` must put every file of one compiler entry in the
same entry, and never two compiler entries in one.
"""

from __future__ import annotations

import pytest

from mithrilfs.layouts import SINGLE_FILE, EntryRule, entry_rule, layout_of

TRITON_KEY = "Q5ZJYHJ6XV6VUIG5MW2H6GMR5QTWJ4O3QWRK6KN5TWMOQFQ6ZN2A"


def rule(path: str) -> EntryRule:
    return entry_rule([part.encode() for part in path.split("/")])


@pytest.mark.parametrize(
    "name",
    [
        "__grp__add_kernel.json",
        "add_kernel.cubin",
        "add_kernel.ptx",
        "add_kernel.ttir",
        "add_kernel.ttgir",
        "add_kernel.llir",
        "add_kernel.json",
        "add_kernel.source",
        # FileCacheManager.put writes here first, then os.replace()s into the key dir.
        "tmp.pid_4242_0b3c1d2e-6f70-4a8b-9c0d-1e2f3a4b5c6d/add_kernel.cubin",
    ],
)
def test_every_file_of_a_triton_kernel_is_in_its_key_directory_entry(name: str) -> None:
    assert rule(f"triton/{TRITON_KEY}/{name}") == EntryRule(depth=2)


def test_inductor_triton_directories_per_device_index_are_entries() -> None:
    assert rule(f"inductor/triton/0/{TRITON_KEY}/__grp__k.json") == EntryRule(depth=4)
    assert rule(f"inductor/triton/1/{TRITON_KEY}/k.cubin") == EntryRule(depth=4)


def test_fx_graph_and_aot_autograd_entries_are_key_directories() -> None:
    key = "fabcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu"
    assert rule(f"inductor/fxgraph/ab/{key}/ftmpxyz") == EntryRule(depth=4)
    assert rule(f"inductor/fxgraph/ab/{key}/.4242.140001.tmp") == EntryRule(depth=4)
    assert rule(f"inductor/aotautograd/{key}/entry") == EntryRule(depth=3)


@pytest.mark.parametrize("ext", ["py", "cpp", "so", "main.so", "kernel.cpp", "json"])
def test_code_cache_files_sharing_a_key_stem_are_one_entry(ext: str) -> None:
    assert rule(f"inductor/xy/cxyzkey123.{ext}") == EntryRule(stem=b"cxyzkey123")


def test_code_cache_temporaries_are_not_part_of_a_stem_until_renamed() -> None:
    # torch's write_atomic: ".<pid>.<tid>.tmp" next to the target, then rename.
    assert rule("inductor/xy/.4242.139872.tmp") == SINGLE_FILE


def test_code_cache_directories_are_entries() -> None:
    assert rule("inductor/xy/cxyzkey123/kernel.so") == EntryRule(depth=3)


@pytest.mark.parametrize(
    "path",
    [
        "loose.txt",
        "triton/loose.txt",
        "inductor/loose.txt",
        "inductor/locks/cxyzkey123.lock",
        "inductor/fxgraph/ab/orphan",
        "other/a/b/c",
    ],
)
def test_anything_else_is_an_entry_of_its_own(path: str) -> None:
    assert rule(path) == SINGLE_FILE


def test_layout_of_names_the_roots() -> None:
    assert layout_of(b"triton") == "triton"
    assert layout_of(b"inductor") == "inductor"
    assert layout_of(b"elsewhere") == "other"
