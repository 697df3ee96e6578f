"""The export archive: a zstd-compressed PAX tar, read and validated without a store.

The first member is `EXPORT_META_NAME`, a JSON header (format, version,
device class, how many entries and file bytes follow); then one member per
name of the class's tree, each directory before its children, names sorted,
mtimes in nanoseconds (PAX).  Every header field is checked before anything
of a member is written anywhere, so a hostile archive is refused before an
import changes the store.

What the tar carries, in tar's own terms:

- files, directories and symlinks;
- hard links: the second and later names of an inode are ``LNKTYPE``
  members naming the first (as GNU tar writes them); an import makes them
  one inode again (nlink 2 or more), so they never take two objects;
- FIFOs and character and block devices: ``FIFOTYPE``, ``CHRTYPE``,
  ``BLKTYPE`` with their device numbers.  Sockets have no tar type: export
  skips them and counts them;
- extended attributes of the ``user.`` namespace, the only one the store
  keeps, as ``SCHILY.xattr.user.NAME`` PAX records (what GNU tar and bsdtar
  write with ``--xattrs``); any other namespace is refused.

Version 1 archives (files, directories and symlinks only) read unchanged.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import zstandard

from mithrilfs import device, xattrs
from mithrilfs.errors import FsError
from mithrilfs.index import check_name
from mithrilfs.transfer.plan import Kind, Node, Plan, imported_mode

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from mithrilfs.progress import Progress

EXPORT_META_NAME = ".mithrilfs-export.json"
EXPORT_FORMAT = "mithrilfs-export"
EXPORT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ARCHIVE_SUFFIXES = (".tar.zst", ".tzst")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TAR_ENCODING = "utf-8"
# Names are bytes; surrogateescape carries non-UTF-8 bytes through tarfile's
# str names, and PAX's hdrcharset=BINARY stores them unchanged.
TAR_ERRORS = "surrogateescape"
XATTR_PAX_PREFIX = "SCHILY.xattr."
# The kernel's limits on one attribute (what a mount would refuse, ERANGE and E2BIG).
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 64 * 1024
SYMLINK_MAX = 4095
CHUNK = 1024 * 1024
NS = 1_000_000_000
# What the index (SQLite INTEGER) and the kernel's timestamps hold.
INT64_MAX = (1 << 63) - 1
# Device numbers the kernel can hold: 12 bits of major, 20 of minor.
_DEVICE_MAJORS = 1 << 12
_DEVICE_MINORS = 1 << 20
# A PAX time: an optional sign, ASCII digits, optional fraction.
_PAX_TIME = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?", re.ASCII)
_SPECIAL_MEMBER_TYPES = {
    tarfile.FIFOTYPE: stat.S_IFIFO,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
}

# What a hard link may name: anything but a directory, as link(2) has it.
_LINKABLE = (Kind.FILE, Kind.SYMLINK, Kind.SPECIAL)

# Stages one member's bytes (read by the callable) and returns (digest, size).
Stage = Callable[[Callable[[int], bytes]], tuple[bytes, int]]


class BadArchive(Exception):
    """The archive is not a complete, valid mithrilfs export."""


def is_archive(path: Path) -> bool:
    """An export is recognised by its suffix or, failing that, by zstd's magic number."""
    if path.name.endswith(ARCHIVE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as head:
            return head.read(len(ZSTD_MAGIC)) == ZSTD_MAGIC
    except OSError:
        return False


class ZstdInput(io.RawIOBase):
    """Decompresses one zstd frame and notices when it was cut short.

    zstandard's stream reader reports a truncated frame as a clean end of
    data; a decompression object says whether the frame really ended.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            if self._decompressor.eof:
                return 0
            chunk = self._raw.read(256 * 1024)
            if not chunk:
                raise BadArchive("the archive is truncated")
            self._pending = memoryview(self._decompressor.decompress(chunk))
        count = min(len(view), len(self._pending))
        view[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def finish(self) -> None:
        """Read to the end; the frame must be complete, with nothing after it."""
        while self.read(CHUNK):
            pass
        if self._decompressor.unused_data or self._raw.read(1):
            raise BadArchive("unexpected data after the end of the archive")


@dataclass(frozen=True)
class ExportMeta:
    device_class: str
    entries: int
    file_bytes: int
    mithrilfs_version: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "device_class": self.device_class,
                "entries": self.entries,
                "file_bytes": self.file_bytes,
                "mithrilfs_version": self.mithrilfs_version,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExportMeta:
        try:
            raw = json.loads(data)
            if raw.get("format") != EXPORT_FORMAT:
                raise BadArchive("it is not a mithrilfs export")
            if raw.get("version") not in READABLE_VERSIONS:
                raise BadArchive(f"export format version {raw.get('version')} is not supported")
            meta = cls(
                str(raw["device_class"]),
                int(raw["entries"]),
                int(raw["file_bytes"]),
                str(raw.get("mithrilfs_version", "?")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadArchive(f"unreadable {EXPORT_META_NAME}: {exc}") from None
        try:
            device.validate_class_name(meta.device_class)
        except device.DeviceClassError as exc:
            raise BadArchive(str(exc)) from None
        return meta


def read_archive(raw: BinaryIO, stage: Stage, progress: Progress) -> tuple[Plan, ExportMeta]:
    """Stage every file of an export read from *raw* and describe its tree.

    BadArchive (or tarfile's, zstandard's errors, EOFError) for anything
    incomplete or invalid, the header's counts included.
    """
    source = ZstdInput(raw)
    plan, meta = _read_tar(source, stage, progress)
    source.finish()
    check_links(plan)
    found = (len(plan.nodes), plan.file_bytes)
    if found != (meta.entries, meta.file_bytes):
        raise BadArchive(
            f"it holds {found[0]} entries and {found[1]} bytes, its header says "
            f"{meta.entries} and {meta.file_bytes} (truncated?)"
        )
    return plan, meta


def _read_tar(source: ZstdInput, stage: Stage, progress: Progress) -> tuple[Plan, ExportMeta]:
    plan = Plan()
    meta: ExportMeta | None = None
    with tarfile.open(fileobj=source, mode="r|", encoding=TAR_ENCODING, errors=TAR_ERRORS) as tar:
        for member in tar:
            if meta is None:
                meta = _read_meta(tar, member)
                progress.set_totals(meta.entries, meta.file_bytes)
                continue
            node = node_from_member(tar, member, stage, plan)
            plan.add(node)
            progress.advance(1, node.size)
    if meta is None:
        raise BadArchive("it is empty")
    return plan, meta


def _read_meta(tar: tarfile.TarFile, member: tarfile.TarInfo) -> ExportMeta:
    if member.name != EXPORT_META_NAME or not member.isreg():
        raise BadArchive(f"its first member is not {EXPORT_META_NAME}")
    reader = tar.extractfile(member)
    assert reader is not None
    return ExportMeta.from_json(reader.read())


def node_from_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, stage: Stage, plan: Plan
) -> Node:
    """Every header field is checked here, before anything of the member is
    staged, and staging is the only write before the commit: a bad archive is
    refused before the store changes.  *plan* holds the members before this
    one, which a hard link must name."""
    parts = archive_parts(member.name)
    if not isinstance(member.mode, int) or not 0 <= member.mode <= 0o7777:
        raise BadArchive(f"member {member.name!r} has an invalid mode")
    mode = imported_mode(member.mode)
    mtime_ns = member_mtime_ns(member)
    attributes = member_xattrs(member)
    if attributes and not (member.isdir() or member.isreg()):
        raise BadArchive(f"member {member.name!r}: only files and directories have xattrs")
    if member.isdir():
        return Node(parts, Kind.DIR, mode, mtime_ns, xattrs=attributes)
    if member.issym():
        target = member.linkname.encode(TAR_ENCODING, TAR_ERRORS)
        if not target or b"\0" in target or len(target) > SYMLINK_MAX:
            raise BadArchive(f"symlink {member.name!r} has an invalid target")
        return Node(parts, Kind.SYMLINK, mode, mtime_ns, target=target)
    if member.islnk():
        return Node(parts, Kind.HARDLINK, mode, mtime_ns, link=_link_target(member, plan))
    if member.type in _SPECIAL_MEMBER_TYPES:
        file_type = _SPECIAL_MEMBER_TYPES[member.type]
        rdev = _device_number(member) if file_type != stat.S_IFIFO else 0
        return Node(parts, Kind.SPECIAL, mode, mtime_ns, file_type=file_type, rdev=rdev)
    if member.isreg():
        if not 0 <= member.size <= INT64_MAX:
            raise BadArchive(f"member {member.name!r} has an invalid size {member.size}")
        reader = tar.extractfile(member)
        assert reader is not None
        digest, size = stage(reader.read)
        if size != member.size:
            raise BadArchive(f"{member.name!r} is cut short")
        return Node(parts, Kind.FILE, mode, mtime_ns, size=size, digest=digest, xattrs=attributes)
    raise BadArchive(
        f"{member.name!r} is not a file, directory, symlink, hard link, FIFO or device node"
    )


def _link_target(member: tarfile.TarInfo, plan: Plan) -> tuple[bytes, ...]:
    """The earlier member (not a directory) that a hard-link member names."""
    target = archive_parts(member.linkname)
    node = plan.nodes.get(target)
    if node is not None and node.kind is Kind.HARDLINK:
        assert node.link is not None
        target, node = node.link, plan.nodes.get(node.link)
    if node is None or node.kind not in _LINKABLE:
        raise BadArchive(
            f"hard link {member.name!r} does not name a file, symlink or special node before it"
        )
    return target


def check_links(plan: Plan) -> None:
    """Every hard link still names a non-directory once the whole archive is read
    (a later member of the same name may have replaced what it named)."""
    for node in plan.nodes.values():
        if node.kind is Kind.HARDLINK:
            assert node.link is not None
            named = plan.nodes.get(node.link)
            if named is None or named.kind not in _LINKABLE:
                shown = b"/".join(node.parts).decode(TAR_ENCODING, TAR_ERRORS)
                raise BadArchive(f"hard link {shown!r} names what a later member replaced")


def _device_number(member: tarfile.TarInfo) -> int:
    major, minor = member.devmajor, member.devminor
    if not (
        isinstance(major, int)
        and isinstance(minor, int)
        and 0 <= major < _DEVICE_MAJORS
        and 0 <= minor < _DEVICE_MINORS
    ):
        raise BadArchive(f"device node {member.name!r} has an invalid device number")
    return os.makedev(major, minor)


def member_xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    """The member's ``user.`` extended attributes from its PAX records."""
    found: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if not key.startswith(XATTR_PAX_PREFIX):
            continue
        name = key[len(XATTR_PAX_PREFIX) :].encode(TAR_ENCODING, TAR_ERRORS)
        data = value.encode(TAR_ENCODING, TAR_ERRORS)
        try:
            xattrs.check_name(name)
        except FsError:
            raise BadArchive(
                f"member {member.name!r} has the attribute {name!r}: only user.* is kept"
            ) from None
        if len(name) > XATTR_NAME_MAX or len(data) > XATTR_VALUE_MAX:
            raise BadArchive(f"member {member.name!r} has an oversized attribute {name!r}")
        found[name] = data
    if sum(len(name) + len(data) for name, data in found.items()) > xattrs.INODE_XATTR_BYTES:
        raise BadArchive(f"member {member.name!r} has more attributes than an inode holds")
    return found


def archive_parts(name: str) -> tuple[bytes, ...]:
    """The path components of a member name; anything that could escape is refused."""
    raw = name.encode(TAR_ENCODING, TAR_ERRORS)
    if raw.startswith(b"/"):
        raise BadArchive(f"member {name!r} has an absolute path")
    parts = tuple(part for part in raw.split(b"/") if part not in (b"", b"."))
    if not parts:
        raise BadArchive(f"member {name!r} has an empty path")
    for part in parts:
        try:
            check_name(part)
        except FsError:
            raise BadArchive(f"member {name!r} has an invalid path") from None
    return parts


def member_mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns, refused unless it fits the index (signed 64 bits)."""
    # tarfile turns the PAX mtime into a float, which cannot hold nanoseconds
    # since 1970; the raw header string can.
    text = member.pax_headers.get("mtime")
    if text is None:
        mtime = member.mtime
        ns = int(mtime) * NS if isinstance(mtime, int) or math.isfinite(mtime) else None
    else:
        match = _PAX_TIME.fullmatch(text)
        ns = None
        if match is not None and len(match.group(2)) <= 20:  # more digits are out of range
            ns = int(match.group(2)) * NS + int((match.group(3) or "").ljust(9, "0")[:9])
            if match.group(1) == "-":
                ns = -ns
    if ns is None or not -INT64_MAX <= ns <= INT64_MAX:
        shown = text if text is not None else member.mtime
        raise BadArchive(f"member {member.name!r} has an invalid mtime {str(shown)[:40]!r}")
    return ns


def ns_to_decimal(ns: int) -> str:
    """A PAX time with nanoseconds, for the writer."""
    seconds, fraction = divmod(abs(ns), NS)
    return f"{'-' if ns < 0 else ''}{seconds}.{fraction:09d}"
