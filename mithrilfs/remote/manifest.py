"""The manifest format: one cache entry as the tier stores it (JSON), checked on the way in.

Pure: no I/O.  A manifest lists each file's path relative to the entry's
base (the entry directory, or for stem and single-file entries the directory
holding them), mode, size, blake3 digest and mtime.  `Manifest.from_json`
refuses anything whose shape would place a file outside its own entry, as
`layouts.entry_rule` defines entries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mithrilfs.errors import FsError
from mithrilfs.index import check_name
from mithrilfs.layouts import entry_rule
from mithrilfs.store import DIGEST_SIZE, EMPTY_DIGEST

MANIFEST_FORMAT = 1
MAX_ENTRY_FILES = 4096
MAX_OBJECT_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a longer manifest is refused unread
MAX_NS = (1 << 63) - 1  # the largest timestamp SQLite and the kernel take

_KINDS = ("dir", "stem", "file")


class ManifestError(Exception):
    """A manifest from the tier that is malformed or describes files outside its entry."""


@dataclass(frozen=True)
class FileSpec:
    path: tuple[bytes, ...]  # relative to the entry's base directory
    mode: int  # permission bits
    size: int
    digest: bytes
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    """One cache entry as published: the unit that is fetched whole or not at all."""

    entry: tuple[bytes, ...]  # the entry's path from the class root
    kind: str  # "dir": a directory entry; "stem": files <stem>.*; "file": one file
    files: tuple[FileSpec, ...]
    dirs: tuple[tuple[tuple[bytes, ...], int], ...] = ()  # "dir" entries: (path, mode)

    @property
    def mtime_ns(self) -> int:
        return max((f.mtime_ns for f in self.files), default=0)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self, device_class: str) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "class": device_class,
                "entry": os.fsdecode(b"/".join(self.entry)),
                "kind": self.kind,
                "mtime_ns": self.mtime_ns,
                "dirs": [
                    {"path": os.fsdecode(b"/".join(path)), "mode": mode} for path, mode in self.dirs
                ],
                "files": [
                    {
                        "path": os.fsdecode(b"/".join(f.path)),
                        "mode": f.mode,
                        "size": f.size,
                        "blake3": f.digest.hex(),
                        "mtime_ns": f.mtime_ns,
                    }
                    for f in self.files
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, entry: tuple[bytes, ...]) -> Manifest:
        """Parse and check a manifest fetched for *entry*; raise ManifestError."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ManifestError("unknown manifest format")
            if _split(doc["entry"]) != entry:
                raise ManifestError(f"manifest is for {doc['entry']!r}")
            kind = doc["kind"]
            if kind not in _KINDS:
                raise ManifestError(f"unknown entry kind {kind!r}")
            _int(doc.get("mtime_ns", 0), MAX_NS)
            files = tuple(
                FileSpec(
                    path=_split(item["path"]),
                    mode=_int(item["mode"], 0o7777),
                    size=_int(item["size"], MAX_OBJECT_BYTES),
                    digest=_digest(item["blake3"]),
                    mtime_ns=_int(item["mtime_ns"], MAX_NS),
                )
                for item in doc["files"]
            )
            dirs = tuple(
                (_split(item["path"]), _int(item["mode"], 0o7777)) for item in doc.get("dirs", [])
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from None
        manifest = cls(entry, kind, files, dirs)
        manifest.check()
        return manifest

    def check(self) -> None:
        """Every file must belong to this entry by the layout's own rule."""
        if not self.files or len(self.files) > MAX_ENTRY_FILES:
            raise ManifestError(f"{len(self.files)} files")
        if len({f.path for f in self.files}) != len(self.files):
            raise ManifestError("a path is listed twice")
        sizes: dict[bytes, int] = {EMPTY_DIGEST: 0}
        for f in self.files:
            if f.size == 0 and f.digest != EMPTY_DIGEST:
                raise ManifestError(f"object {f.digest.hex()} listed as empty")
            if sizes.setdefault(f.digest, f.size) != f.size:
                raise ManifestError(f"object {f.digest.hex()} listed with two sizes")
        if self.kind == "dir":
            depth = len(self.entry)
            known = {()} | {path for path, _mode in self.dirs}
            if len(known) != len(self.dirs) + 1:
                raise ManifestError("a directory is listed twice")
            for path, _mode in self.dirs:
                if path[:-1] not in known:
                    raise ManifestError("a directory's parent is not listed")
            for f in self.files:
                if f.path[:-1] not in known or f.path in known:
                    raise ManifestError("a file's directory is not listed")
                if entry_rule([*self.entry, *f.path]).depth != depth:
                    raise ManifestError(f"{f.path!r} is not part of a directory entry")
            return
        if self.dirs:
            raise ManifestError("only directory entries list directories")
        base, last = self.entry[:-1], self.entry[-1]
        for f in self.files:
            if len(f.path) != 1:
                raise ManifestError("files of a stem or single-file entry must be names")
            rule = entry_rule([*base, f.path[0]])
            if self.kind == "stem" and (rule.stem != last or rule.depth is not None):
                raise ManifestError(f"{f.path[0]!r} is not part of stem {last!r}")
            if self.kind == "file" and (
                f.path[0] != last or rule.stem is not None or rule.depth is not None
            ):
                raise ManifestError(f"{f.path[0]!r} is not a single-file entry")


def _split(text: object) -> tuple[bytes, ...]:
    if not isinstance(text, str):
        raise ManifestError("a path is not a string")
    parts = tuple(os.fsencode(part) for part in text.split("/"))
    for part in parts:
        try:
            check_name(part)
        except FsError:
            raise ManifestError(f"invalid path {text!r}") from None
    return parts


def _int(value: object, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ManifestError(f"invalid number {value!r}")
    return value


def _digest(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * DIGEST_SIZE:
        raise ManifestError(f"invalid digest {value!r}")
    return bytes.fromhex(value)
