"""`mithrilfs export`: a class's tree streamed into a zstd-compressed PAX tar (archive.py).

Holds the store lock for its whole run, like a daemon: a store that a mount
is serving is refused, and the message says to archive the mount instead.
Every object is hashed on its way out; one that does not match its name
fails the export (exit 3) and no partial archive is left under the name.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import blake3
import zstandard

from mithrilfs import __version__
from mithrilfs.errors import UserError
from mithrilfs.index import SUPER_ROOT, Index, Inode
from mithrilfs.progress import Progress
from mithrilfs.store import ContentStore
from mithrilfs.transfer.archive import (
    CHUNK,
    EXPORT_META_NAME,
    NS,
    TAR_ENCODING,
    TAR_ERRORS,
    XATTR_PAX_PREFIX,
    ExportMeta,
    ns_to_decimal,
)
from mithrilfs.transfer.offline import open_offline, resolve_class
from mithrilfs.units import format_size

_SPECIAL_MEMBER_TYPES = {
    stat.S_IFIFO: tarfile.FIFOTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
}


@dataclass
class ExportReport:
    device_class: str
    output: str
    entries: int = 0
    bytes: int = 0
    skipped: int = 0  # special nodes left out (sockets always: tar has no type for them)
    special_nodes: bool = False  # FIFOs and device nodes written

    def summary(self) -> str:
        text = (
            f"exported {self.entries} entries ({format_size(self.bytes)}) of class "
            f"{self.device_class} to {self.output}"
        )
        if self.skipped:
            kinds = "sockets" if self.special_nodes else "FIFOs, sockets and device nodes"
            text += f"; left out {self.skipped} {kinds}"
        return text


def export_class(
    store: Path,
    device_class: str,
    output: Path,
    *,
    special_nodes: bool = False,
    progress_stream: IO[str] | None = None,
) -> ExportReport:
    """`mithrilfs export`: stream a class's tree into a zstd-compressed PAX tar.

    FIFOs and device nodes are no cache content: left out (and counted) unless
    *special_nodes*; sockets always are, tar having no type for them.
    """
    class_name = resolve_class(device_class)
    hint = f"archive the mount instead (tar --zstd -cf {output} -C MOUNTPOINT .)"
    repo = open_offline(store, create=False, hint=hint)
    try:
        root = repo.index.lookup(SUPER_ROOT, class_name.encode())
        if root is None or not root.is_dir:
            known = ", ".join(n.decode(errors="replace") for n, _ino in repo.index.class_roots())
            raise UserError(
                f"store {store} has no device class {class_name} (it has: {known or 'none'})", 1
            )
        listing = list(walk_tree(repo.index, root.id))
        nodes = [(p, n) for p, n in listing if _exported(n, special_nodes)]
        report = ExportReport(class_name, os.fspath(output), len(nodes))
        report.special_nodes = special_nodes
        report.skipped = len(listing) - len(nodes)
        report.bytes = sum(node.size for _parts, node in _first_names(nodes) if node.is_file)
        meta = ExportMeta(class_name, report.entries, report.bytes, __version__)
        progress = Progress(
            f"export {class_name}:",
            report.entries,
            report.bytes,
            unit="entries",
            stream=progress_stream,
        )
        with _output(output) as out:
            _write_archive(out, repo.index, repo.content, meta, nodes, progress)
        progress.finish()
    finally:
        repo.close()
    return report


def _exported(node: Inode, special_nodes: bool) -> bool:
    if not node.is_special:
        return True
    return special_nodes and not stat.S_ISSOCK(node.mode)


def walk_tree(index: Index, root: int) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
    """Every entry below *root*, each directory before its children, names sorted."""
    pending: list[tuple[tuple[bytes, ...], int]] = [((), root)]
    while pending:
        parts, ino = pending.pop()
        # Depth-first, in name order: push in reverse, pop in order.
        for name, child in reversed(index.names_in(ino)):
            pending.append(((*parts, name), child))
        if parts:
            yield parts, index.get(ino)


def _first_names(
    nodes: list[tuple[tuple[bytes, ...], Inode]],
) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
    """The nodes less the second and later names of an inode (archived as hard links)."""
    seen: set[int] = set()
    for parts, node in nodes:
        if node.nlink > 1 and not node.is_dir:
            if node.id in seen:
                continue
            seen.add(node.id)
        yield parts, node


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
    index: Index,
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
            encoding=TAR_ENCODING,
            errors=TAR_ERRORS,
        ) as tar,
    ):
        header = meta.to_json()
        info = tarfile.TarInfo(EXPORT_META_NAME)
        # mtime 0 and a fixed member order: exports of the same tree are
        # byte-identical, so container image layers built from them cache.
        info.size, info.mode, info.mtime = len(header), 0o644, 0
        tar.addfile(info, io.BytesIO(header))
        first_names: dict[int, str] = {}  # inode -> member name, for its other names
        for parts, node in nodes:
            name = b"/".join(parts).decode(TAR_ENCODING, TAR_ERRORS)
            if node.id in first_names:
                _add_hard_link(tar, name, node, first_names[node.id])
                progress.advance(1)
                continue
            if node.nlink > 1 and not node.is_dir:
                first_names[node.id] = name
            _add_member(tar, index, content, name, node)
            progress.advance(1, node.size if node.is_file else 0)


def _member_info(name: str, node: Inode) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(node.mode)
    info.uid, info.gid = node.uid, node.gid
    info.mtime = node.mtime_ns // NS
    info.pax_headers = {"mtime": ns_to_decimal(node.mtime_ns)}
    return info


def _add_hard_link(tar: tarfile.TarFile, name: str, node: Inode, first: str) -> None:
    info = _member_info(name, node)
    info.type = tarfile.LNKTYPE
    info.linkname = first
    tar.addfile(info)


def _add_member(
    tar: tarfile.TarFile, index: Index, content: ContentStore, name: str, node: Inode
) -> None:
    info = _member_info(name, node)
    if node.is_dir or node.is_file:
        info.pax_headers = {**info.pax_headers, **_xattr_records(index, node.id)}
    if node.is_dir:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISLNK(node.mode):
        assert node.target is not None
        info.type = tarfile.SYMTYPE
        info.linkname = node.target.decode(TAR_ENCODING, TAR_ERRORS)
        tar.addfile(info)
    elif node.is_special:
        info.type = _SPECIAL_MEMBER_TYPES[stat.S_IFMT(node.mode)]
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
        tar.addfile(info)
    else:
        assert node.object is not None
        info.size = node.size
        _add_object(tar, content, info, node.object)


def _xattr_records(index: Index, ino: int) -> dict[str, str]:
    """The inode's user.* attributes as PAX records (bytes carried by surrogateescape)."""
    records: dict[str, str] = {}
    for attribute in index.list_xattrs(ino):
        value = index.get_xattr(ino, attribute)
        if value is not None:
            key = XATTR_PAX_PREFIX + attribute.decode(TAR_ENCODING, TAR_ERRORS)
            records[key] = value.decode(TAR_ENCODING, TAR_ERRORS)
    return records


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

    def read(self, size: int = CHUNK) -> bytes:
        data = os.read(self._fd, size if size >= 0 else CHUNK)
        self._hasher.update(data)
        return data

    def digest(self) -> bytes:
        result: bytes = self._hasher.digest()
        return result
