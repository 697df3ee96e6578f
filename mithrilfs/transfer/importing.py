"""`mithrilfs import`: a cache directory or an export archive, merged into a class's tree.

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
   transactions of `BATCH` entries, parents before children, hard links
   last.  Objects that a replaced file no longer needs are deleted after the
   last commit.

Crash states during the commit: objects published but not yet referenced are
orphans, removed by the recovery that the next mount, import or
``fsck --repair`` runs (the store was marked in use).  Batches already
committed stay: the tree is consistent but partly imported, and running the
same import again completes it, because unchanged files are skipped.

Names that already exist in the target (an import merges into a live tree):

- a file with the same content is left alone (its mode, mtime and extended
  attributes included); a file with different content gets the imported
  content, mode, mtime and attributes (a new inode if the old one had other
  names, so that those keep their content);
- a symlink with the same target, a FIFO or device node of the same type
  and number, a hard link already naming the same inode: left alone; a
  different one replaced; a file, a symlink and a special node replace each
  other;
- an existing directory is merged into and keeps its own mode;
- a directory where the import has a file or symlink (or the reverse) is
  refused before anything changes: mithrilfs never deletes a subtree to make
  room for an import.

Hard links come back as one inode with as many names (from an archive, and
from a directory where names share an inode).  Extended attributes of the
``user.`` namespace come with files and directories.  From a directory,
FIFOs, sockets and device nodes are skipped and counted: in a cache
directory they belong to the tools that made them, not to the cache.  From
an archive, FIFOs are imported, and device nodes too but only by root, the
rule mknod(2) applies; the mount is always ``nodev``, so a device node in it
is a name with attributes, never a device.

Imported entries belong to the user who runs the import (as ``cp`` without
``-p`` would make them): run it as the user the compilers run as, or as the
daemon's user for a shared ``allow_other`` mount.  Exports record the owner
but imports do not apply it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

from mithrilfs.errors import UserError
from mithrilfs.index import SUPER_ROOT, Index, Inode
from mithrilfs.layouts import LAYOUT_ROOTS
from mithrilfs.progress import Progress
from mithrilfs.repository import Repository
from mithrilfs.store import EMPTY_DIGEST, ContentStore
from mithrilfs.transfer.archive import BadArchive, ExportMeta, read_archive
from mithrilfs.transfer.offline import open_offline, resolve_class
from mithrilfs.transfer.plan import Kind, Node, Plan, add_missing_parents, imported_mode
from mithrilfs.units import format_size
from mithrilfs.xattrs import INODE_XATTR_BYTES, USER_PREFIX

# Index rows per transaction: big enough that the commit costs little, small
# enough that a crash loses (and a re-run redoes) little.
BATCH = 512


@dataclass
class ImportReport:
    target: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    links: int = 0  # further names of an inode imported before (hard links)
    special: int = 0  # FIFOs and device nodes
    bytes: int = 0
    new_objects: int = 0
    deduplicated: int = 0  # files whose content was already stored or seen
    unchanged: int = 0  # names already in the target with the same content
    replaced: int = 0  # names already in the target, given the imported content
    skipped: int = 0  # special files in the source, not imported

    def summary(self) -> str:
        text = (
            f"imported {self.files} files ({format_size(self.bytes)}), {self.dirs} directories, "
            f"{self.symlinks} symlinks"
        )
        if self.links:
            text += f", {self.links} hard links"
        if self.special:
            text += f", {self.special} FIFOs and device nodes"
        text += (
            f" into {self.target}: {self.new_objects} new objects, "
            f"{self.deduplicated} deduplicated, {self.unchanged} unchanged, "
            f"{self.replaced} replaced"
        )
        if self.skipped:
            text += f"; skipped {self.skipped} special files (sockets, fifos, devices)"
        return text


# -- staging content -------------------------------------------------------------


class Stager:
    """Copies content into staging/ while hashing it; keeps only what the store lacks."""

    def __init__(self, index: Index, content: ContentStore) -> None:
        self.index = index
        self.content = content
        self.staged: dict[bytes, Path] = {}
        self.deduplicated = 0

    def stage(self, read: Callable[[int], bytes]) -> tuple[bytes, int]:
        """Copy everything *read* yields into staging; return its digest and size."""
        staged = self.content.stage(read, "import")
        if self._already_stored(staged.digest):
            staged.path.unlink()
            self.deduplicated += 1
        else:
            self.staged[staged.digest] = staged.path
        return staged.digest, staged.size

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
    progress.set_totals(
        len(listing), sum(st.st_size for _parts, st in listing if stat.S_ISREG(st.st_mode))
    )
    plan = Plan()
    # (st_dev, st_ino) -> the first name seen, for the names that share an inode
    first_names: dict[tuple[int, int], tuple[bytes, ...] | None] = {}
    with source_errors():
        for parts, st in listing:
            _scan_entry(plan, root, parts, st, stager, first_names)
            progress.advance(1, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return plan


def _scan_entry(
    plan: Plan,
    root: bytes,
    parts: tuple[bytes, ...],
    st: os.stat_result,
    stager: Stager,
    first_names: dict[tuple[int, int], tuple[bytes, ...] | None],
) -> None:
    path = os.path.join(root, *parts)
    shared = not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
    if shared and (st.st_dev, st.st_ino) in first_names:
        first = first_names[(st.st_dev, st.st_ino)]
        if first is None:  # the first name was skipped: so are the others
            plan.skipped.append(path)
        else:
            plan.add(Node(parts, Kind.HARDLINK, 0, st.st_mtime_ns, link=first))
        return
    node = _node_from_stat(parts, st)
    if shared:
        first_names[(st.st_dev, st.st_ino)] = None if node is None else parts
    if node is None:
        plan.skipped.append(path)
        return
    if node.kind is Kind.FILE:
        # The size is what was copied: a file still being written is
        # imported as it was when read, consistent with its hash.
        node.digest, node.size = _stage_file(path, stager)
    elif node.kind is Kind.SYMLINK:
        node.target = os.readlink(path)
    if node.kind is not Kind.SYMLINK:
        node.xattrs = _user_xattrs(path)
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
    mode = imported_mode(st.st_mode)
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


def _user_xattrs(path: bytes) -> dict[bytes, bytes]:
    """The ``user.`` attributes of a file or directory; none where the source has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    found: dict[bytes, bytes] = {}
    for name in names:
        raw = os.fsencode(name)
        if raw.startswith(USER_PREFIX):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile (ENODATA)
                found[raw] = os.getxattr(path, name, follow_symlinks=False)
    return found


@contextlib.contextmanager
def source_errors() -> Iterator[None]:
    """Turn an OS error while reading the input (or staging it) into one line."""
    try:
        yield
    except OSError as exc:
        where = os.fsdecode(exc.filename) if exc.filename is not None else "the input"
        raise UserError(f"cannot import {where}: {exc.strerror or exc}", 1) from None


# -- reading an export archive -------------------------------------------------------------


def scan_archive(path: Path, stager: Stager, progress: Progress) -> tuple[Plan, ExportMeta]:
    """Stage every file of an export and describe its tree; refuse anything incomplete."""
    try:
        with open(path, "rb") as raw:
            return read_archive(raw, stager.stage, progress)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", 1) from None
    except (BadArchive, tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise UserError(f"{path} is not a valid mithrilfs export: {exc}", 2) from None


def check_devices(plan: Plan, euid: int) -> None:
    """Device nodes only for root, as mknod(2) has it: refused before any change."""
    devices = [node for node in plan.nodes.values() if node.is_device]
    if devices and euid != 0:
        shown = b"/".join(devices[0].parts).decode(errors="replace")
        raise UserError(
            f"cannot import: {len(devices)} device nodes (such as {shown}) may be imported "
            "only by root, as mknod(2) allows",
            2,
        )


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


@dataclass
class _Commit:
    """The state of one commit: what was created so far, objects to drop at the end."""

    repo: Repository
    report: ImportReport
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)
    dirs: dict[tuple[bytes, ...], int] = field(default_factory=dict)
    inodes: dict[tuple[bytes, ...], int] = field(default_factory=dict)  # what links may name
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
    nodes = plan.in_commit_order()
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
    elif node.kind is Kind.SYMLINK:
        _apply_symlink(state, node, parent, existing)
    elif node.kind is Kind.SPECIAL:
        _apply_special(state, node, parent, existing)
    else:
        _apply_link(state, node, parent, existing)


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
    _set_xattrs(state, created.id, node)


def _apply_file(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    assert node.digest is not None
    state.report.files += 1
    state.report.bytes += node.size
    if existing is not None and existing.is_file and existing.object == node.digest:
        state.report.unchanged += 1
        state.inodes[node.parts] = existing.id
        return
    if existing is not None and existing.is_file and existing.nlink == 1:
        ino = existing.id
        state.report.replaced += 1
    else:
        # A leaf of another type, or a file with other names that keep their content.
        if existing is not None:
            _drop_leaf(state, parent, node.parts[-1])
            state.report.replaced += 1
        ino = state.index.make_node(
            parent, node.parts[-1], stat.S_IFREG | node.mode, state.uid, state.gid
        ).id
    unused = state.index.set_content(ino, node.digest, node.size, node.mtime_ns)
    if unused is not None:
        state.unused.add(unused)
    _set_xattrs(state, ino, node)
    state.index.set_attrs(ino, mode=stat.S_IFREG | node.mode, mtime_ns=node.mtime_ns)
    state.inodes[node.parts] = ino


def _apply_symlink(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    assert node.target is not None
    state.report.symlinks += 1
    same = existing is not None and stat.S_ISLNK(existing.mode) and existing.target == node.target
    mode = stat.S_IFLNK | node.mode
    state.inodes[node.parts] = _put_leaf(
        state, node, parent, existing, same, mode, target=node.target
    )


def _apply_special(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    state.report.special += 1
    same = (
        existing is not None
        and stat.S_IFMT(existing.mode) == node.file_type
        and existing.rdev == node.rdev
    )
    mode = node.file_type | node.mode
    state.inodes[node.parts] = _put_leaf(state, node, parent, existing, same, mode, rdev=node.rdev)


def _put_leaf(
    state: _Commit,
    node: Node,
    parent: int,
    existing: Inode | None,
    same: bool,
    mode: int,
    *,
    target: bytes | None = None,
    rdev: int = 0,
) -> int:
    """A symlink or special node: left alone when the same one is there, else made
    (in place of what is there); returns its inode."""
    if existing is not None:
        if same:
            state.report.unchanged += 1
            return existing.id
        _drop_leaf(state, parent, node.parts[-1])
        state.report.replaced += 1
    created = state.index.make_node(
        parent, node.parts[-1], mode, state.uid, state.gid, target=target, rdev=rdev
    )
    state.index.set_attrs(created.id, mtime_ns=node.mtime_ns)
    return created.id


def _apply_link(state: _Commit, node: Node, parent: int, existing: Inode | None) -> None:
    assert node.link is not None
    state.report.links += 1
    ino = state.inodes[node.link]
    if existing is not None:
        if existing.id == ino:
            state.report.unchanged += 1
            return
        _drop_leaf(state, parent, node.parts[-1])
        state.report.replaced += 1
    state.index.link(ino, parent, node.parts[-1])


def _set_xattrs(state: _Commit, ino: int, node: Node) -> None:
    for name, value in sorted(node.xattrs.items()):
        state.index.set_xattr(ino, name, value, INODE_XATTR_BYTES)


def _drop_leaf(state: _Commit, parent: int, name: bytes) -> None:
    # Offline, no kernel can hold the inode: free it now rather than at forget
    # (free_inode leaves one that other names still hold).
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
    progress = Progress(f"import {src}:", unit="entries", stream=progress_stream)

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
    progress = Progress(f"import {archive.name}:", unit="entries", stream=progress_stream)

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
            check_devices(plan, os.geteuid())
            check_conflicts(repo.index, target, plan)
        except BaseException:
            stager.discard()
            raise
        finally:
            progress.finish()
        report = ImportReport(b"/".join(target).decode(errors="replace"))
        report.deduplicated, report.skipped = stager.deduplicated, len(plan.skipped)
        commit_progress = Progress(
            "commit:", len(plan.nodes), plan.file_bytes, unit="entries", stream=progress.stream
        )
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
