"""Facts about the compilers' trees that layouts.py owns beyond `entry_rule`
(which tests/test_layouts.py covers, also without a mount)."""

from __future__ import annotations

import pytest

from mithrilfs.layouts import EntryKey, is_group_file, is_transient, is_triton_entry


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((b"triton", b"KEY"), True),
        ((b"inductor", b"triton", b"0", b"KEY"), True),
        ((b"inductor", b"fxgraph", b"ab", b"KEY"), False),
        ((b"inductor", b"aotautograd", b"KEY"), False),
        ((b"other", b"triton"), False),
    ],
)
def test_triton_entries_are_told_from_inductor_ones(
    path: tuple[bytes, ...], expected: bool
) -> None:
    assert is_triton_entry(path) is expected
    assert is_triton_entry(list(path)) is expected


def test_the_group_file_is_triton_s_last_file() -> None:
    assert is_group_file(b"__grp__add_kernel.json")
    assert not is_group_file(b"add_kernel.json")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"tmp.pid_4242_0b3c", True),
        (b".hidden", True),
        (b"cabc.py.tmp", True),
        (b"tmpdir", False),
        (b"cabc.py", False),
    ],
)
def test_transient_names(name: bytes, expected: bool) -> None:
    assert is_transient(name) is expected


def test_entry_keys_describe_themselves_for_people() -> None:
    assert EntryKey("dir", 3).describe("triton/KEY") == "triton/KEY"
    assert EntryKey("file", 4).describe("notes.txt") == "notes.txt"
    assert EntryKey("stem", 5, b"cabc").describe("inductor/ab") == "inductor/ab/cabc.*"
    assert EntryKey("stem", 5, b"cabc").describe("") == "cabc.*"
    assert EntryKey("stem", 5, b"cabc").leaf == b"cabc.*"
    assert EntryKey("dir", 3).leaf == b""


def test_a_stem_with_undecodable_bytes_survives_the_round_trip() -> None:
    key = EntryKey("stem", 9, b"c\xff")
    assert EntryKey.decode(key.encode()) == key
    assert key.describe("d") == "d/c\udcff.*"
