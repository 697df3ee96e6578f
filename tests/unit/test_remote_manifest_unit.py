"""The manifest format and the tier's keys: encode, decode, check (pure; no mount, no redis)."""

from __future__ import annotations

import json
import os

import blake3
import pytest

from mithrilfs import remote
from mithrilfs.remote.keys import dirs_key, entry_key, namespace, object_key
from mithrilfs.remote.manifest import MAX_ENTRY_FILES, FileSpec, Manifest, ManifestError
from mithrilfs.store import EMPTY_DIGEST

CLASS = "cuda-sm90"
DIGEST = blake3.blake3(b"x").digest()


def test_manifests_describe_only_their_own_entry() -> None:
    digest = blake3.blake3(b"x").hexdigest()

    def doc(entry: str, kind: str, paths: list[str], dirs: list[str] = ()) -> bytes:  # type: ignore[assignment]
        return json.dumps(
            {
                "format": 1,
                "class": CLASS,
                "entry": entry,
                "kind": kind,
                "mtime_ns": 1,
                "dirs": [{"path": d, "mode": 0o755} for d in dirs],
                "files": [
                    {"path": p, "mode": 0o644, "size": 1, "blake3": digest, "mtime_ns": 1}
                    for p in paths
                ],
            }
        ).encode()

    def parse(entry: str, data: bytes) -> remote.Manifest:
        return remote.Manifest.from_json(data, tuple(os.fsencode(p) for p in entry.split("/")))

    ok = parse("triton/KEY", doc("triton/KEY", "dir", ["a.cubin", "sub/b"], ["sub"]))
    assert [f.path for f in ok.files] == [(b"a.cubin",), (b"sub", b"b")]
    assert parse("inductor/ab/cabc", doc("inductor/ab/cabc", "stem", ["cabc.so", "cabc.cpp"]))
    round_trip = parse("triton/KEY", ok.to_json(CLASS))
    assert round_trip == ok
    hostile = [
        ("triton/KEY", doc("triton/OTHER", "dir", ["a"])),  # not the entry asked for
        ("triton/KEY", doc("triton/KEY", "dir", ["../escape"])),
        ("triton/KEY", doc("triton/KEY", "dir", ["sub/b"])),  # directory not listed
        ("triton/KEY", doc("triton/KEY", "dir", ["a", "a"])),
        ("inductor/ab/cabc", doc("inductor/ab/cabc", "stem", ["cother.so"])),
        ("inductor/ab/cabc", doc("inductor/ab/cabc", "stem", ["x/cabc.so"])),
        ("inductor/x.txt", doc("inductor/x.txt", "file", ["y.txt"])),
        ("triton/KEY", b"not json"),
        ("triton/KEY", doc("triton/KEY", "bogus", ["a"])),
        ("triton/KEY", doc("triton/KEY", "dir", ["a"]).replace(digest.encode(), b"xyz")),
    ]
    two_sizes = json.loads(doc("triton/KEY", "dir", ["a", "b"]))
    two_sizes["files"][1]["size"] = 2
    empty = json.loads(doc("triton/KEY", "dir", ["a"]))
    empty["files"][0]["blake3"] = blake3.blake3(b"").hexdigest()  # size 1: a lie
    hostile += [
        ("triton/KEY", json.dumps(two_sizes).encode()),
        ("triton/KEY", json.dumps(empty).encode()),
    ]
    # Every number in range: SQLite and the kernel take at most 2**63 - 1 ns.
    for field_name, value in (
        ("mtime_ns", 1 << 63),
        ("mtime_ns", -1),
        ("size", 1 << 40),
        ("size", 0),  # an empty file whose object is not the empty one
        ("mode", 0o10000),
        ("mode", True),
    ):
        bad_number = json.loads(doc("triton/KEY", "dir", ["a"]))
        bad_number["files"][0][field_name] = value
        hostile.append(("triton/KEY", json.dumps(bad_number).encode()))
    bad_total = json.loads(doc("triton/KEY", "dir", ["a"]))
    bad_total["mtime_ns"] = 1 << 63
    hostile.append(("triton/KEY", json.dumps(bad_total).encode()))
    latest = json.loads(doc("triton/KEY", "dir", ["a"]))
    latest["files"][0]["mtime_ns"] = latest["mtime_ns"] = (1 << 63) - 1
    assert parse("triton/KEY", json.dumps(latest).encode()).mtime_ns == (1 << 63) - 1
    for entry, data in hostile:
        with pytest.raises(remote.ManifestError):
            parse(entry, data)


def spec(path: str, data: bytes = b"x", mode: int = 0o644, mtime_ns: int = 1) -> FileSpec:
    parts = tuple(os.fsencode(part) for part in path.split("/"))
    return FileSpec(parts, mode, len(data), blake3.blake3(data).digest(), mtime_ns)


def test_a_manifest_encodes_to_one_canonical_form() -> None:
    files = (spec("a.cubin", b"abc", mtime_ns=5), spec("sub/b", b"de", 0o600, mtime_ns=9))
    manifest = Manifest((b"triton", b"KEY"), "dir", files, (((b"sub",), 0o755),))
    assert (manifest.size, manifest.mtime_ns) == (5, 9)
    data = manifest.to_json(CLASS)
    assert data == manifest.to_json(CLASS)
    assert b" " not in data  # compact: the same entry is the same bytes on every node
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert (doc["format"], doc["class"], doc["entry"]) == (1, CLASS, "triton/KEY")
    assert doc["kind"] == "dir"
    assert doc["mtime_ns"] == 9
    assert doc["dirs"] == [{"path": "sub", "mode": 0o755}]
    assert doc["files"][1] == {
        "path": "sub/b",
        "mode": 0o600,
        "size": 2,
        "blake3": blake3.blake3(b"de").hexdigest(),
        "mtime_ns": 9,
    }
    assert Manifest.from_json(data, (b"triton", b"KEY")) == manifest


def test_names_that_are_not_utf8_survive_a_round_trip() -> None:
    name = b"k\xff.so"
    files = (FileSpec((name,), 0o644, 1, DIGEST, 1),)
    manifest = Manifest((b"inductor", b"misc", name), "file", files)
    assert Manifest.from_json(manifest.to_json(CLASS), manifest.entry) == manifest


@pytest.mark.parametrize(
    ("entry", "kind", "files", "dirs"),
    [
        ((b"triton", b"KEY"), "dir", (), ()),  # no files
        ((b"inductor", b"ab", b"cabc"), "stem", (spec("cabc.so"),), (((b"x",), 0o755),)),
        ((b"inductor", b"misc.txt"), "file", (spec("misc.txt"), spec("other.txt")), ()),
        ((b"inductor", b"ab", b"cabc"), "file", (spec("cabc"),), ()),  # a stem, not a file
        ((b"triton", b"KEY"), "dir", (spec("sub"),), (((b"sub",), 0o755),)),  # file and dir
        ((b"triton", b"KEY"), "dir", (spec("a/b/c"),), (((b"a", b"b"), 0o755),)),  # no a/
        ((b"triton", b"KEY"), "dir", (spec("a"),), (((b"d",), 0o755), ((b"d",), 0o700))),
    ],
)
def test_a_manifest_that_breaks_the_layout_is_refused(
    entry: tuple[bytes, ...],
    kind: str,
    files: tuple[FileSpec, ...],
    dirs: tuple[tuple[tuple[bytes, ...], int], ...],
) -> None:
    with pytest.raises(ManifestError):
        Manifest(entry, kind, files, dirs).check()


def test_the_size_of_an_entry_is_bounded_and_empty_files_are_fine() -> None:
    empty = FileSpec((b"empty",), 0o644, 0, EMPTY_DIGEST, 1)
    Manifest((b"triton", b"KEY"), "dir", (empty, spec("a"))).check()
    many = tuple(spec(f"f{i}") for i in range(MAX_ENTRY_FILES + 1))
    with pytest.raises(ManifestError, match="files"):
        Manifest((b"triton", b"KEY"), "dir", many).check()
    Manifest((b"triton", b"KEY"), "dir", many[:MAX_ENTRY_FILES]).check()


def test_other_formats_and_shapes_are_refused() -> None:
    good = json.loads(Manifest((b"triton", b"KEY"), "dir", (spec("a"),)).to_json(CLASS))
    for change in ({"format": 2}, {"files": "a"}, {"entry": 7}, {"dirs": [{"path": "d"}]}):
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps({**good, **change}).encode(), (b"triton", b"KEY"))
    for data in (b"[]", b"null", b'"text"', b"\xff"):
        with pytest.raises(ManifestError):
            Manifest.from_json(data, (b"triton", b"KEY"))


def test_keys_name_one_namespace_per_class_and_tree() -> None:
    assert object_key(DIGEST) == b"mithrilfs:v1:obj:" + DIGEST.hex().encode()
    shared, private = namespace(CLASS, None), namespace(CLASS, 1000)
    assert entry_key(shared, (b"triton", b"KEY")) == b"mithrilfs:v1:cuda-sm90:entry:triton/KEY"
    assert entry_key(private, (b"triton", b"KEY")) == (
        b"mithrilfs:v1:cuda-sm90:user:1000:entry:triton/KEY"
    )
    assert dirs_key(shared) == b"mithrilfs:v1:cuda-sm90:dirs"
    assert dirs_key(private) == b"mithrilfs:v1:cuda-sm90:user:1000:dirs"
    assert namespace("cuda-sm80", None) != shared
