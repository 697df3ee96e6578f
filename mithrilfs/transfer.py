"""Moving cache trees into and out of a store while no daemon serves it.

`mithrilfs import` brings an existing cache directory (``~/.triton/cache``,
``/tmp/torchinductor_$USER``) or an export archive into a device class's tree;
`mithrilfs export` streams a class's tree into a zstd-compressed tar that
another node (or a container image build) imports.

Both hold the store lock for their whole run, like a daemon: a store that a
mount is serving is refused, and the message says to copy through the mount
or unmount first.

An import happens in two phases:

1. **Stage.**  Every input file is copied into ``staging/`` while it is
   hashed; content the store already holds (or that this import already
   staged) is dropped at once, so staging holds only new content.  The whole
   input is read and validated here, and the target tree is compared with it
   (a directory that would replace a file, or the reverse, is refused).  Any
   failure (a missing source, an unreadable file, a corrupt or truncated
   archive) deletes the staging files: the store is left as it was.
2. **Commit.**  The store is marked in use (``clean_shutdown = 0``), the new
   objects are renamed into ``objects/``, then the index rows are written in
   transactions of `BATCH` entries, parents before children.  Objects that a
   replaced file no longer needs are deleted after the last commit.

Crash states during the commit: objects published but not yet referenced are
orphans, removed by the recovery that the next mount, import or
``fsck --repair`` runs (the store was marked in use).  Batches already
committed stay: the tree is consistent but partly imported, and running the
same import again completes it, because unchanged files are skipped.

Names that already exist in the target (an import merges into a live tree):

- a file with the same content is left alone (its mode and mtime included);
  a file with different content gets the imported content, mode and mtime;
- a symlink with the same target is left alone, a different one replaced;
  a file and a symlink replace each other;
- an existing directory is merged into and keeps its own mode;
- a directory where the import has a file or symlink (or the reverse) is
  refused before anything changes: mithrilfs never deletes a subtree to make
  room for an import.

Imported entries belong to the user who runs the import (as ``cp`` without
``-p`` would make them): run it as the user the compilers run as, or as the
daemon's user for a shared ``allow_other`` mount.  Exports record the owner
but imports do not apply it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import stat
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

import blake3
import zstandard

from mithrilfs import __version__, device
from mithrilfs.errors import FsError, UserError
from mithrilfs.index import SUPER_ROOT, Index, Inode, check_name
from mithrilfs.layouts import LAYOUT_ROOTS
from mithrilfs.mounts import FSTYPE, mount_table
from mithrilfs.repository import Repository, holder_pid
from mithrilfs.store import EMPTY_DIGEST, ContentStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

EXPORT_META_NAME = ".mithrilfs-export.json"
EXPORT_FORMAT = "mithrilfs-export"
EXPORT_VERSION = 1
ARCHIVE_SUFFIXES = (".tar.zst", ".tzst")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Index rows per transaction: big enough that the commit costs little, small
# enough that a crash loses (and a re-run redoes) little.
BATCH = 512
_CHUNK = 1024 * 1024
_TAR_ENCODING = "utf-8"
# Names are bytes; surrogateescape carries non-UTF-8 bytes through tarfile's
# str names, and PAX's hdrcharset=BINARY stores them unchanged.
_TAR_ERRORS = "surrogateescape"
_NS = 1_000_000_000
# What the index (SQLite INTEGER) and the kernel's timestamps hold.
_INT64_MAX = (1 << 63) - 1
# A PAX time: an optional sign, ASCII digits, optional fraction.
_PAX_TIME = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?", re.ASCII)
SYMLINK_MAX = 4095


class Kind(Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"


@dataclass(slots=True)
class Node:
    """One entry of the tree being imported, relative to the target directory."""

    parts: tuple[bytes, ...]
    kind: Kind
    mode: int  # permission bits only
    mtime_ns: int
    size: int = 0
    digest: bytes | None = None
    target: bytes | None = None


@dataclass
class Plan:
    """Everything an import will write, gathered before anything is written."""

    nodes: dict[tuple[bytes, ...], Node] = field(default_factory=dict)
    skipped: list[bytes] = field(default_factory=list)  # sockets, fifos, devices

    def add(self, node: Node) -> None:
        self.nodes[node.parts] = node

    def count(self, kind: Kind) -> int:
        return sum(1 for node in self.nodes.values() if node.kind is kind)

    @property
    def file_bytes(self) -> int:
        return sum(node.size for node in self.nodes.values() if node.kind is Kind.FILE)


@dataclass
class ImportReport:
    target: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    new_objects: int = 0
    deduplicated: int = 0  # files whose content was already stored or seen
    unchanged: int = 0  # names already in the target with the same content
    replaced: int = 0  # names already in the target, given the imported content
    skipped: int = 0  # special files in the source, not imported

    def summary(self) -> str:
        text = (
            f"imported {self.files} files ({_human(self.bytes)}), {self.dirs} directories, "
            f"{self.symlinks} symlinks into {self.target}: {self.new_objects} new objects, "
            f"{self.deduplicated} deduplicated, {self.unchanged} unchanged, "
            f"{self.replaced} replaced"
        )
        if self.skipped:
            text += f"; skipped {self.skipped} special files (sockets, fifos, devices)"
        return text


@dataclass
class ExportReport:
    device_class: str
    output: str
    entries: int = 0
    bytes: int = 0

    def summary(self) -> str:
        return (
            f"exported {self.entries} entries ({_human(self.bytes)}) of class "
            f"{self.device_class} to {self.output}"
        )


# -- progress ------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn with '\\r'; silent unless a TTY."""

    _INTERVAL_S = 0.1

    def __init__(
        self,
        label: str,
        total_items: int | None = None,
        total_bytes: int | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.total_items = total_items
        self.total_bytes = total_bytes
        self.items = 0
        self.bytes = 0
        self._drawn_at = 0.0

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= self._INTERVAL_S:
            self._drawn_at = now
            self._draw()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        items = f"{self.items}" + (f"/{self.total_items}" if self.total_items is not None else "")
        size = _human(self.bytes) + (
            f"/{_human(self.total_bytes)}" if self.total_bytes is not None else ""
        )
        text = f"{self.label}: {items} entries, {size}"
        if self.total_bytes:
            text += f" {min(100, 100 * self.bytes // self.total_bytes):3d}%"
        return text

    def _draw(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


# -- opening the store -------------------------------------------------------------


def open_offline(store: Path, *, create: bool, hint: str) -> Repository:
    """Take the store lock, explaining what to do when a mount holds it.

    *hint* is the way to do the same through a mount, shown in the refusal.
    """
    store = store.absolute()
    try:
        return Repository.open(store, create=create)
    except UserError:
        pid = holder_pid(store)
        if pid is None:
            raise
        mounts = [
            m.mountpoint for m in mount_table() if m.fstype == FSTYPE and m.source == str(store)
        ]
        where = f" mounted at {', '.join(mounts)}" if mounts else ""
        mountpoint = mounts[0] if mounts else "MOUNTPOINT"
        raise UserError(
            f"store {store} is in use by mithrilfs pid {pid}{where}; "
            f"{hint.replace('MOUNTPOINT', mountpoint)}, or unmount it first "
            f"('mithrilfs umount {mountpoint}')",
            1,
        ) from None


def resolve_class(requested: str) -> str:
    try:
        return device.resolve(requested)
    except device.DeviceClassError as exc:
        raise UserError(str(exc), 2) from None


# -- staging content -------------------------------------------------------------


class Stager:
    """Copies content into staging/ while hashing it; keeps only what the store lacks."""

    def __init__(self, index: Index, content: ContentStore) -> None:
        self.index = index
        self.content = content
        self.staged: dict[bytes, Path] = {}
        self.deduplicated = 0
        self._names = itertools.count()

    def stage(self, read: Callable[[int], bytes]) -> tuple[bytes, int]:
        """Copy everything *read* yields into staging; return its digest and size."""
        path = self.content.staging_dir / f"import.{os.getpid()}.{next(self._names)}"
        hasher = blake3.blake3()
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        digest: bytes = hasher.digest()
        if self._already_stored(digest):
            path.unlink()
            self.deduplicated += 1
        else:
            self.staged[digest] = path
        return digest, size

    def _already_stored(self, digest: bytes) -> bool:
        # The empty object always exists once the store is recovered.
        return (
            digest == EMPTY_DIGEST
            or digest in self.staged
            or self.index.object_size(digest) is not None
        )

    def discard(self) -> None:
        for path in self.staged.values():
            path.unlink(missing_ok=True)
        self.staged.clear()


# -- reading a source directory -------------------------------------------------------


def scan_directory(src: Path, stager: Stager, progress: Progress) -> Plan:
    """Stage every file under *src* and describe its tree (names as bytes)."""
    root = os.fsencode(src)
    with source_errors():
        listing = list(_walk(root))
    progress.total_items = len(listing)
    progress.total_bytes = sum(st.st_size for _parts, st in listing if stat.S_ISREG(st.st_mode))
    plan = Plan()
    with source_errors():
        for parts, st in listing:
            _scan_entry(plan, root, parts, st, stager)
            progress.advance(1, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return plan


def _scan_entry(
    plan: Plan, root: bytes, parts: tuple[bytes, ...], st: os.stat_result, stager: Stager
) -> None:
    path = os.path.join(root, *parts)
    node = _node_from_stat(parts, st)
    if node is None:
        plan.skipped.append(path)
        return
    if node.kind is Kind.FILE:
        # The size is what was copied: a file still being written is
        # imported as it was when read, consistent with its hash.
        node.digest, node.size = _stage_file(path, stager)
    elif node.kind is Kind.SYMLINK:
        node.target = os.readlink(path)
    plan.add(node)


def _walk(root: bytes) -> Iterator[tuple[tuple[bytes, ...], os.stat_result]]:
    """(relative parts, lstat) of everything under *root*, never following symlinks."""
    pending: list[tuple[bytes, ...]] = [()]
    while pending:
        rel = pending.pop()
        directory = os.path.join(root, *rel) if rel else root
        with os.scandir(directory) as listing:
            entries = [(entry.name, entry) for entry in listing]
        for name, entry in sorted(entries, key=lambda item: item[0]):
            st = entry.stat(follow_symlinks=False)
            yield (*rel, name), st
            if stat.S_ISDIR(st.st_mode):
                pending.append((*rel, name))


def _node_from_stat(parts: tuple[bytes, ...], st: os.stat_result) -> Node | None:
    mode = _imported_mode(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Node(parts, Kind.DIR, mode, st.st_mtime_ns)
    if stat.S_ISREG(st.st_mode):
        return Node(parts, Kind.FILE, mode, st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        return Node(parts, Kind.SYMLINK, mode, st.st_mtime_ns)
    return None


def _stage_file(path: bytes, stager: Stager) -> tuple[bytes, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return stager.stage(lambda size: os.read(fd, size))
    finally:
        os.close(fd)


@contextlib.contextmanager
def source_errors() -> Iterator[None]:
    """Turn an OS error while reading the input (or staging it) into one line."""
    try:
        yield
    except OSError as exc:
        where = os.fsdecode(exc.filename) if exc.filename is not None else "the input"
        raise UserError(f"cannot import {where}: {exc.strerror or exc}", 1) from None


# -- reading an export archive -------------------------------------------------------------


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


class _ZstdInput(io.RawIOBase):
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
        while self.read(_CHUNK):
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
            if raw.get("version") != EXPORT_VERSION:
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


def scan_archive(path: Path, stager: Stager, progress: Progress) -> tuple[Plan, ExportMeta]:
    """Stage every file of an export and describe its tree; refuse anything incomplete."""
    try:
        with open(path, "rb") as raw:
            source = _ZstdInput(raw)
            plan, meta = _read_tar(source, stager, progress)
            source.finish()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", 1) from None
    except (BadArchive, tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise UserError(f"{path} is not a valid mithrilfs export: {exc}", 2) from None
    found = (len(plan.nodes), plan.file_bytes)
    if found != (meta.entries, meta.file_bytes):
        raise UserError(
            f"{path} is not a valid mithrilfs export: it holds {found[0]} entries and "
            f"{found[1]} bytes, its header says {meta.entries} and {meta.file_bytes} "
            "(truncated?)",
            2,
        )
    return plan, meta


def _read_tar(source: _ZstdInput, stager: Stager, progress: Progress) -> tuple[Plan, ExportMeta]:
    plan = Plan()
    meta: ExportMeta | None = None
    with tarfile.open(fileobj=source, mode="r|", encoding=_TAR_ENCODING, errors=_TAR_ERRORS) as tar:
        for member in tar:
            if meta is None:
                meta = _read_meta(tar, member)
                progress.total_items, progress.total_bytes = meta.entries, meta.file_bytes
                continue
            node = _node_from_member(tar, member, stager)
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


def _node_from_member(tar: tarfile.TarFile, member: tarfile.TarInfo, stager: Stager) -> Node:
    """Every header field is checked here, before anything of the member is
    staged, and staging is the only write before the commit: a bad archive is
    refused before the store changes."""
    parts = archive_parts(member.name)
    if not isinstance(member.mode, int) or not 0 <= member.mode <= 0o7777:
        raise BadArchive(f"member {member.name!r} has an invalid mode")
    mode = _imported_mode(member.mode)
    mtime_ns = _member_mtime_ns(member)
    if member.isdir():
        return Node(parts, Kind.DIR, mode, mtime_ns)
    if member.issym():
        target = member.linkname.encode(_TAR_ENCODING, _TAR_ERRORS)
        if not target or b"\0" in target or len(target) > SYMLINK_MAX:
            raise BadArchive(f"symlink {member.name!r} has an invalid target")
        return Node(parts, Kind.SYMLINK, mode, mtime_ns, target=target)
    if member.isreg():
        if not 0 <= member.size <= _INT64_MAX:
            raise BadArchive(f"member {member.name!r} has an invalid size {member.size}")
        reader = tar.extractfile(member)
        assert reader is not None
        digest, size = stager.stage(reader.read)
        if size != member.size:
            raise BadArchive(f"{member.name!r} is cut short")
        return Node(parts, Kind.FILE, mode, mtime_ns, size=size, digest=digest)
    raise BadArchive(f"{member.name!r} is neither a file, a directory nor a symlink")


def archive_parts(name: str) -> tuple[bytes, ...]:
    """The path components of a member name; anything that could escape is refused."""
    raw = name.encode(_TAR_ENCODING, _TAR_ERRORS)
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


def _imported_mode(mode: int) -> int:
    """Permission bits, less set-user-ID and set-group-ID: an import installs
    files as the importer, and must not hand out their privileges."""
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _member_mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns, refused unless it fits the index (signed 64 bits)."""
    # tarfile turns the PAX mtime into a float, which cannot hold nanoseconds
    # since 1970; the raw header string can.
    text = member.pax_headers.get("mtime")
    if text is None:
        mtime = member.mtime
        ns = int(mtime) * _NS if isinstance(mtime, int) or math.isfinite(mtime) else None
    else:
        match = _PAX_TIME.fullmatch(text)
        ns = None
        if match is not None and len(match.group(2)) <= 20:  # more digits are out of range
            ns = int(match.group(2)) * _NS + int((match.group(3) or "").ljust(9, "0")[:9])
            if match.group(1) == "-":
                ns = -ns
    if ns is None or not -_INT64_MAX <= ns <= _INT64_MAX:
        shown = text if text is not None else member.mtime
        raise BadArchive(f"member {member.name!r} has an invalid mtime {str(shown)[:40]!r}")
    return ns


def _ns_to_decimal(ns: int) -> str:
    seconds, fraction = divmod(abs(ns), _NS)
    return f"{'-' if ns < 0 else ''}{seconds}.{fraction:09d}"


# -- writing the plan into the index ---------------------------------------------------------


def check_conflicts(index: Index, target: tuple[bytes, ...], plan: Plan) -> None:
    """Refuse, before any change, an import that would turn a directory into a leaf or back."""
    base = _existing_dir(index, target)
    if base is None:
        return  # the target does not exist yet: nothing can conflict
    dirs: dict[tuple[bytes, ...], int | None] = {(): base}
    for node in sorted(plan.nodes.values(), key=lambda n: n.parts):
        parent = dirs.get(node.parts[:-1])
        existing = index.lookup(parent, node.parts[-1]) if parent is not None else None
        if existing is not None and existing.is_dir != (node.kind is Kind.DIR):
            where = b"/".join((*target, *node.parts)).decode(errors="replace")
            have = "a directory" if existing.is_dir else "not a directory"
            raise UserError(
                f"cannot import: {where} is {have} in the store but not in the source; "
                "remove it through a mount first",
                1,
            )
        if node.kind is Kind.DIR:
            dirs[node.parts] = existing.id if existing is not None else None


def _existing_dir(index: Index, parts: tuple[bytes, ...]) -> int | None:
    """The directory at *parts* from the super-root, None if absent."""
    ino = SUPER_ROOT
    for depth, name in enumerate(parts, 1):
        node = index.lookup(ino, name)
        if node is None:
            return None
        if not node.is_dir:
            where = b"/".join(parts[:depth]).decode(errors="replace")
            raise UserError(f"cannot import: {where} in the store is not a directory", 1)
        ino = node.id
    return ino


def add_missing_parents(plan: Plan) -> None:
    """An archive may list a file without its directories; create them, and refuse files
    that an archive also uses as a directory."""
    for parts in list(plan.nodes):
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            parent = plan.nodes.get(prefix)
            if parent is None:
                plan.add(Node(prefix, Kind.DIR, 0o755, time.time_ns()))
            elif parent.kind is not Kind.DIR:
                raise UserError(
                    f"cannot import: {b'/'.join(prefix).decode(errors='replace')} is both a "
                    "file and a directory in the source",
                    2,
                )


@dataclass
class _Commit:
    """The state of one commit: directories created so far, objects to drop at the end."""

    repo: Repository
    report: ImportReport
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)
    dirs: dict[tuple[bytes, ...], int] = field(default_factory=dict)
    new_dirs: list[tuple[int, int]] = field(default_factory=list)  # (inode, mtime_ns)
    unused: set[bytes] = field(default_factory=set)

    @property
    def index(self) -> Index:
        return self.repo.index


def commit(
    repo: Repository,
    target: tuple[bytes, ...],
    plan: Plan,
    stager: Stager,
    report: ImportReport,
    progress: Progress,
) -> None:
    """Publish the staged objects, then write the plan's rows in batches (see module doc)."""
    state = _Commit(repo, report)
    repo.mark_in_use()
    _publish(repo.content, plan, stager, report)
    with repo.index.transaction():
        state.dirs[()] = _ensure_target(state, target)
    nodes = sorted(plan.nodes.values(), key=lambda node: node.parts)
    for start in range(0, len(nodes), BATCH):
        with repo.index.transaction():
            for node in nodes[start : start + BATCH]:
                _apply(state, node)
                progress.advance(1, node.size)
    with repo.index.transaction():
        # Last, because adding children moved every directory's mtime.
        for ino, mtime_ns in state.new_dirs:
            repo.index.set_attrs(ino, mtime_ns=mtime_ns)
    for digest in state.unused:
        # Another imported file may have taken the content back since.
        if repo.index.object_size(digest) is None:
            repo.content.delete(digest)


def _publish(content: ContentStore, plan: Plan, stager: Stager, report: ImportReport) -> None:
    wanted = {node.digest for node in plan.nodes.values() if node.kind is Kind.FILE}
    for digest, path in stager.staged.items():
        if digest in wanted:
            content.publish(path, digest)
            report.new_objects += 1
        else:
            path.unlink()  # a duplicate archive member replaced the file that had it
    stager.staged.clear()


def _ensure_target(state: _Commit, target: tuple[bytes, ...]) -> int:
    ino = SUPER_ROOT
    for name in target:
        ino = state.index.ensure_dir(ino, name, 0o755, state.uid, state.gid).id
    return ino


def _apply(state: _Commit, node: Node) -> None:
    parent = state.dirs[node.parts[:-1]]
    name = node.parts[-1]
    existing = state.index.lookup(parent, name)
    if node.kind is Kind.DIR:
        _apply_dir(state, node, parent, existing)
    elif node.kind is Kind.FILE:
        _apply_file(state, node, parent, existing)
    else:
        _apply_symlink(state, node, parent, existing)


def _apply_dir(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    state.report.dirs += 1
    if existing is not None:
        state.dirs[node.parts] = existing.id
        return
    created = state.index.make_node(
        parent, node.parts[-1], stat.S_IFDIR | node.mode, state.uid, state.gid
    )
    state.dirs[node.parts] = created.id
    state.new_dirs.append((created.id, node.mtime_ns))


def _apply_file(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    assert node.digest is not None
    state.report.files += 1
    state.report.bytes += node.size
    if existing is not None and existing.is_file:
        if existing.object == node.digest:
            state.report.unchanged += 1
            return
        ino = existing.id
        state.report.replaced += 1
    else:
        if existing is not None:
            _drop_leaf(state, parent, node.parts[-1])
            state.report.replaced += 1
        ino = state.index.make_node(
            parent, node.parts[-1], stat.S_IFREG | node.mode, state.uid, state.gid
        ).id
    unused = state.index.set_content(ino, node.digest, node.size, node.mtime_ns)
    if unused is not None:
        state.unused.add(unused)
    state.index.set_attrs(ino, mode=stat.S_IFREG | node.mode, mtime_ns=node.mtime_ns)


def _apply_symlink(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    assert node.target is not None
    state.report.symlinks += 1
    if existing is not None:
        if stat.S_ISLNK(existing.mode) and existing.target == node.target:
            state.report.unchanged += 1
            return
        _drop_leaf(state, parent, node.parts[-1])
        state.report.replaced += 1
    created = state.index.make_node(
        parent,
        node.parts[-1],
        stat.S_IFLNK | node.mode,
        state.uid,
        state.gid,
        target=node.target,
    )
    state.index.set_attrs(created.id, mtime_ns=node.mtime_ns)


def _drop_leaf(state: _Commit, parent: int, name: bytes) -> None:
    # Offline, no kernel can hold the inode: free it now rather than at forget.
    dropped = state.index.unlink(parent, name)
    unused = state.index.free_inode(dropped.id)
    if unused is not None:
        state.unused.add(unused)


# -- the commands ----------------------------------------------------------------------

# What an input scan returns: the plan, and the target path from the super-root.
Scan = Callable[[Stager], tuple[Plan, tuple[bytes, ...]]]


def import_directory(
    store: Path,
    src: Path,
    layout: str | None,
    device_class: str | None,
    *,
    progress_stream: IO[str] | None = None,
) -> ImportReport:
    """`mithrilfs import DIR --layout L`: merge a cache directory into <class>/<layout>/."""
    if layout not in LAYOUT_ROOTS:
        raise UserError(
            f"--layout must be one of {', '.join(LAYOUT_ROOTS)} when importing a directory"
            + (f" (got {layout!r})" if layout else ""),
            2,
        )
    if not src.is_dir():
        raise UserError(f"{src} is not a directory or a .tar.zst export", 2)
    target = (resolve_class(device_class or "auto").encode(), layout.encode())
    progress = Progress(f"import {src}", stream=progress_stream)

    def scan(stager: Stager) -> tuple[Plan, tuple[bytes, ...]]:
        return scan_directory(src, stager, progress), target

    hint = f"copy through the mount instead (cp -a {src}/. MOUNTPOINT/{layout}/)"
    return _run_import(store, scan, progress, hint)


def import_archive(
    store: Path,
    archive: Path,
    device_class: str | None,
    *,
    progress_stream: IO[str] | None = None,
) -> ImportReport:
    """`mithrilfs import FILE.tar.zst`: merge an export into a class (its own by default)."""
    override = resolve_class(device_class) if device_class else None
    progress = Progress(f"import {archive.name}", stream=progress_stream)

    def scan(stager: Stager) -> tuple[Plan, tuple[bytes, ...]]:
        plan, meta = scan_archive(archive, stager, progress)
        return plan, ((override or meta.device_class).encode(),)

    hint = f"extract it into the mount instead (tar --zstd -xf {archive} -C MOUNTPOINT)"
    return _run_import(store, scan, progress, hint)


def _run_import(store: Path, scan: Scan, progress: Progress, hint: str) -> ImportReport:
    repo = open_offline(store, create=True, hint=hint)
    committing = False
    try:
        repo.recover()
        stager = Stager(repo.index, repo.content)
        try:
            plan, target = scan(stager)
            add_missing_parents(plan)
            check_conflicts(repo.index, target, plan)
        except BaseException:
            stager.discard()
            raise
        finally:
            progress.finish()
        report = ImportReport(b"/".join(target).decode(errors="replace"))
        report.deduplicated, report.skipped = stager.deduplicated, len(plan.skipped)
        commit_progress = Progress("commit", len(plan.nodes), plan.file_bytes, progress.stream)
        committing = True
        commit(repo, target, plan, stager, report, commit_progress)
        commit_progress.finish()
    except BaseException:
        # A failed commit leaves the store marked in use: the next open's
        # recovery removes the objects that no committed row refers to.
        repo.close(clean=False if committing else None)
        raise
    repo.close(clean=True)
    return report


def export_class(
    store: Path,
    device_class: str,
    output: Path,
    *,
    progress_stream: IO[str] | None = None,
) -> ExportReport:
    """`mithrilfs export`: stream a class's tree into a zstd-compressed PAX tar."""
    class_name = resolve_class(device_class)
    hint = f"archive the mount instead (tar --zstd -cf {output} -C MOUNTPOINT .)"
    repo = open_offline(store, create=False, hint=hint)
    try:
        root = repo.index.lookup(SUPER_ROOT, class_name.encode())
        if root is None or not root.is_dir:
            known = ", ".join(n.decode(errors="replace") for n in class_names(repo.index))
            raise UserError(
                f"store {store} has no device class {class_name} (it has: {known or 'none'})", 1
            )
        # FIFOs, sockets and device nodes are no cache content (import skips them too).
        nodes = [(p, n) for p, n in walk_tree(repo.index, root.id) if not n.is_special]
        report = ExportReport(class_name, os.fspath(output), len(nodes))
        report.bytes = sum(node.size for _parts, node in nodes if node.is_file)
        meta = ExportMeta(class_name, report.entries, report.bytes, __version__)
        progress = Progress(f"export {class_name}", report.entries, report.bytes, progress_stream)
        with _output(output) as out:
            _write_archive(out, repo.content, meta, nodes, progress)
        progress.finish()
    finally:
        repo.close()
    return report


def class_names(index: Index) -> list[bytes]:
    rows = index.db.execute(
        "SELECT name FROM entries WHERE parent=? ORDER BY name", (SUPER_ROOT,)
    ).fetchall()
    return [row[0] for row in rows]


def walk_tree(index: Index, root: int) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
    """Every entry below *root*, each directory before its children, names sorted."""
    pending: list[tuple[tuple[bytes, ...], int]] = [((), root)]
    while pending:
        parts, ino = pending.pop()
        children = index.db.execute(
            "SELECT name, inode FROM entries WHERE parent=? ORDER BY name DESC", (ino,)
        ).fetchall()
        # Depth-first, in name order: push in reverse, pop in order.
        for name, child in children:
            pending.append(((*parts, name), child))
        if parts:
            yield parts, index.get(ino)


@contextlib.contextmanager
def _output(output: Path) -> Iterator[BinaryIO]:
    """The archive's destination: written beside it and renamed, so a failed export
    never leaves a partial file under the final name ('-' is stdout)."""
    if os.fspath(output) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}", 1) from None
    finally:
        partial.unlink(missing_ok=True)


def _write_archive(
    out: BinaryIO,
    content: ContentStore,
    meta: ExportMeta,
    nodes: list[tuple[tuple[bytes, ...], Inode]],
    progress: Progress,
) -> None:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    with (
        compressor.stream_writer(out, closefd=False) as compressed,
        tarfile.open(
            fileobj=compressed,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding=_TAR_ENCODING,
            errors=_TAR_ERRORS,
        ) as tar,
    ):
        header = meta.to_json()
        info = tarfile.TarInfo(EXPORT_META_NAME)
        # mtime 0 and a fixed member order: exports of the same tree are
        # byte-identical, so container image layers built from them cache.
        info.size, info.mode, info.mtime = len(header), 0o644, 0
        tar.addfile(info, io.BytesIO(header))
        for parts, node in nodes:
            _add_member(tar, content, parts, node)
            progress.advance(1, node.size if node.is_file else 0)


def _add_member(
    tar: tarfile.TarFile, content: ContentStore, parts: tuple[bytes, ...], node: Inode
) -> None:
    name = b"/".join(parts).decode(_TAR_ENCODING, _TAR_ERRORS)
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(node.mode)
    info.uid, info.gid = node.uid, node.gid
    info.mtime = node.mtime_ns // _NS
    info.pax_headers = {"mtime": _ns_to_decimal(node.mtime_ns)}
    if node.is_dir:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISLNK(node.mode):
        assert node.target is not None
        info.type = tarfile.SYMTYPE
        info.linkname = node.target.decode(_TAR_ENCODING, _TAR_ERRORS)
        tar.addfile(info)
    else:
        assert node.object is not None
        info.size = node.size
        _add_object(tar, content, info, node.object)


def _add_object(
    tar: tarfile.TarFile, content: ContentStore, info: tarfile.TarInfo, digest: bytes
) -> None:
    """Stream an object into the archive, checking its hash on the way out."""
    try:
        fd = content.open_object(digest)
    except FileNotFoundError:
        raise UserError(
            f"object {digest.hex()} of {info.name!r} is missing; run 'mithrilfs fsck --repair'",
            3,
        ) from None
    reader = _HashingReader(fd)
    try:
        tar.addfile(info, reader)
    except OSError as exc:  # tarfile: the object is shorter than its row says
        raise UserError(
            f"object {digest.hex()} of {info.name!r} is damaged ({exc}); "
            "run 'mithrilfs fsck --repair'",
            3,
        ) from None
    finally:
        os.close(fd)
    if reader.digest() != digest:
        raise UserError(
            f"object {digest.hex()} of {info.name!r} does not match its hash; "
            "run 'mithrilfs fsck --repair'",
            3,
        )


class _HashingReader:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hasher = blake3.blake3()

    def read(self, size: int = _CHUNK) -> bytes:
        data = os.read(self._fd, size if size >= 0 else _CHUNK)
        self._hasher.update(data)
        return data

    def digest(self) -> bytes:
        result: bytes = self._hasher.digest()
        return result
