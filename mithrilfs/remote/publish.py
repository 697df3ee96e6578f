"""Publishing (background, never on the request path).

Sealing a file, renaming one into place (compilers write under a temporary
name first) or linking one queues its inode in a bounded queue (oldest
dropped when full, counted).  A task takes inodes that have been quiet for
`PUBLISH_SETTLE` seconds, resolves each to the entries it is in *as they are
now* (every name of a hard-linked file: one manifest file per name, the
same object), and publishes each entry's objects (those Redis lacks), then
its manifest (last writer wins; re-published whenever a file of the entry
changes), then its parent directories.  Only regular files and directories
are published: FIFOs, sockets, device nodes and symlinks never are.  A
Triton entry is published only once its group file exists: Triton writes
that file last, so a published Triton entry is always complete.  A shared
entry that not every local user may read is not published.
"""

from __future__ import annotations

import collections
import logging
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

import blake3
import trio

from mithrilfs import layouts
from mithrilfs.errors import FsError
from mithrilfs.index import Inode
from mithrilfs.interfaces import Writers
from mithrilfs.layouts import entry_rule, is_scratch
from mithrilfs.remote.client import PublishJob, RemoteUnavailable
from mithrilfs.remote.keys import dirs_key, entry_key, namespace
from mithrilfs.remote.local import Tree
from mithrilfs.remote.manifest import MAX_ENTRY_FILES, FileSpec, Manifest, ManifestError
from mithrilfs.remote.part import TierPart
from mithrilfs.store import EMPTY_DIGEST

log = logging.getLogger(__name__)

PUBLISH_SETTLE = 0.25  # seconds an inode stays quiet before it is published
PUBLISH_BATCH = 256  # inodes resolved per publishing round
PUBLISH_TIMEOUT = 60.0  # one publishing round (objects included)
DRAIN_SECONDS = 5.0  # at unmount, time given to publish what is still queued
_REMEMBERED_MANIFESTS = 100_000


@dataclass(frozen=True)
class Location:
    """A local cache entry: its tree, path and what is needed to list its files."""

    tree: Tree
    path: tuple[bytes, ...]  # from the tree's root
    kind: str
    base: int  # the directory holding the entry's files (the entry directory for "dir")
    root: int | None = None  # "dir" entries: the entry directory


class Publisher(TierPart):
    """Sends the entries that sealed, renamed or linked files are in to the tier."""

    def setup(self) -> None:
        self.root = self.local.root
        # inode -> when it was last queued; insertion order is publishing order.
        self._queue: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._publishing = 0
        self._wake = trio.Event()
        self._lock = trio.Lock()
        # entry key -> blake3 of the manifest last published from here
        self._published: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        # Set by `Remote.attach` before the mount serves (services.build_services).
        self.writers: Writers

    @property
    def backlog(self) -> int:
        """Inodes queued or being published."""
        return len(self._queue) + self._publishing

    def notify(self, ino: int) -> None:
        """A file was sealed or renamed (or a directory renamed): publish its entry soon."""
        queue = self._queue
        if ino in queue:
            queue.move_to_end(ino)
        elif len(queue) >= self.config.queue_size:
            queue.popitem(last=False)
            self._dropped(1)
        queue[ino] = time.monotonic()
        self._wake.set()

    def notify_renamed(self, parent: int, name: bytes) -> None:
        node = self.index.lookup(parent, name)
        if node is not None and (node.is_file or node.is_dir) and not is_scratch(name):
            self.notify(node.id)

    def _dropped(self, count: int) -> None:
        self.stats.inc("remote_errors_total", count)
        log.warning("shared tier publish queue full: dropped %d oldest", count)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background task: publish queued entries, backing off while the tier is down."""
        task_status.started()
        while True:
            if not self._queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            now = time.monotonic()
            wait = self.health.backoff.remaining(now)
            if wait <= 0:
                oldest = next(iter(self._queue.values()))
                wait = oldest + PUBLISH_SETTLE - now
            if wait > 0:
                await trio.sleep(wait)
                continue
            await self.publish_pending(PUBLISH_SETTLE)

    async def drain(self) -> None:
        """At unmount: publish what is queued, for at most DRAIN_SECONDS."""
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                # One try even while backing off: the failure may be long gone.
                attempt = 0
                while self._queue and (attempt == 0 or self.health.backoff.ready(time.monotonic())):
                    attempt += 1
                    await self.publish_pending(0.0)
            except Exception:
                log.exception("publishing to the shared tier at unmount failed")
        if self._queue:
            log.info("unmounting with %d files not published to the shared tier", self.backlog)

    async def publish_pending(self, settle: float) -> None:
        """One round: inodes quiet for *settle* seconds, resolved to entries and sent."""
        async with self._lock:
            cutoff = time.monotonic() - settle
            batch: list[tuple[int, float]] = []
            while self._queue and len(batch) < PUBLISH_BATCH:
                ino, queued = next(iter(self._queue.items()))
                if queued > cutoff:
                    break
                self._queue.popitem(last=False)
                batch.append((ino, queued))
            self._publishing = len(batch)
            try:
                await self._publish([ino for ino, _ in batch], batch)
            finally:
                self._publishing = 0

    async def _publish(self, inodes: list[int], batch: list[tuple[int, float]]) -> None:
        jobs, fingerprints = self._jobs(inodes)
        if not jobs:
            return
        # Objects the tier served with the wrong bytes, sent this round: overwritten.
        refused = self.refused & {digest for job in jobs for digest in job.objects}
        try:
            with trio.fail_after(PUBLISH_TIMEOUT):
                result = await trio.to_thread.run_sync(
                    self.tier.publish,
                    jobs,
                    refused,
                    limiter=self.threads,
                    abandon_on_cancel=True,
                )
        except (RemoteUnavailable, trio.TooSlowError) as exc:
            reason = str(exc) or "publishing timed out"
            self.health.failed(reason)
            self._requeue(batch)
            return
        self.health.succeeded()
        self.refused.difference_update(refused)
        self.stats.inc("remote_published_total", result.uploaded)
        for key in result.published:
            self._published[key] = fingerprints[key]
            self._published.move_to_end(key)
        while len(self._published) > _REMEMBERED_MANIFESTS:
            self._published.popitem(last=False)
        log.debug(
            "published %d entries, %d objects (%d bytes)",
            len(result.published),
            result.uploaded,
            result.uploaded_bytes,
        )

    def _requeue(self, batch: list[tuple[int, float]]) -> None:
        """Put a failed batch back in front, keeping its order; the queue stays bounded."""
        for ino, queued in reversed(batch):
            if ino not in self._queue:
                self._queue[ino] = queued
                self._queue.move_to_end(ino, last=False)
        overflow = len(self._queue) - self.config.queue_size
        if overflow > 0:
            for _ in range(overflow):
                self._queue.popitem(last=False)
            self._dropped(overflow)

    def _jobs(self, inodes: list[int]) -> tuple[list[PublishJob], dict[bytes, bytes]]:
        """Resolve queued inodes to the entries they are in now, one job per changed entry."""
        jobs: dict[bytes, PublishJob] = {}
        fingerprints: dict[bytes, bytes] = {}
        for location in self._locations(inodes):
            space = namespace(self.device_class, location.tree.uid)
            key = entry_key(space, location.path)
            if key in jobs:
                continue
            manifest = self._manifest(location)
            if manifest is None:
                continue
            data = manifest.to_json(self.device_class)
            fingerprint = blake3.blake3(data).digest()
            if self._published.get(key) == fingerprint:
                continue  # unchanged since this node published it
            jobs[key] = PublishJob(
                key=key,
                manifest=data,
                objects={
                    f.digest: (self.store.object_path(f.digest), f.size)
                    for f in manifest.files
                    if f.digest != EMPTY_DIGEST
                },
                dirs_key=dirs_key(space),
                dirs=[b"/".join(location.path[:depth]) for depth in range(1, len(location.path))],
            )
            fingerprints[key] = fingerprint
        return list(jobs.values()), fingerprints

    def _locations(self, inodes: list[int]) -> Iterator[Location]:
        for ino in inodes:
            try:
                node = self.index.get(ino)
            except FsError:
                continue
            # Special nodes (FIFOs, sockets, devices) and symlinks are never published.
            if node.nlink == 0 or not (node.is_file or node.is_dir):
                continue
            # Every name of a hard-linked file: each is a plain file of its own entry.
            for parent, name in self.index.links_of(ino):
                parent_path = self.local.dir_path(parent)
                if parent_path is None:
                    continue
                path = (*parent_path[0], name)
                if node.is_file:
                    location = self._entry_location(parent, path)
                    if location is not None:
                        yield location
                    continue
                # A directory renamed into place: every entry below it.
                dirs: dict[tuple[bytes, ...], int] = {(): node.id}
                for relative, child in self.local.walk(node.id):
                    if child.is_dir:
                        dirs[relative] = child.id
                    elif child.is_file:
                        location = self._entry_location(dirs[relative[:-1]], (*path, *relative))
                        if location is not None:
                            yield location

    def _entry_location(self, parent: int, local: tuple[bytes, ...]) -> Location | None:
        """The entry of the file at *local* (in directory *parent*), if it is publishable."""
        _names, inodes = self.index.dir_path(parent)
        placed = self.local.place(local, inodes)
        if placed is None:
            return None
        tree, path = placed
        rule = entry_rule(list(path))
        if rule.depth is not None:
            # The entry directory is on the way from the tree's root to *parent*.
            if len(inodes) < tree.prefix + rule.depth:
                return None
            root = inodes[tree.prefix + rule.depth - 1]
            return Location(tree, path[: rule.depth], "dir", base=root, root=root)
        if rule.stem is not None:
            return Location(tree, (*path[:-1], rule.stem), "stem", parent)
        return Location(tree, path, "file", parent)

    def _manifest(self, location: Location) -> Manifest | None:
        """The entry as it is in the local index, or None if it is not ready to publish."""
        files: list[FileSpec] = []
        dirs: list[tuple[tuple[bytes, ...], int]] = []
        if location.kind == "dir":
            assert location.root is not None
            for relative, node in self.local.walk(location.root):
                if node.is_dir:
                    dirs.append((relative, stat.S_IMODE(node.mode)))
                elif node.is_file:
                    spec = self._file_spec(relative, node)
                    if spec is None:
                        return None
                    files.append(spec)
            # Triton writes the group file last: without it the entry is unfinished.
            if layouts.is_triton_entry(location.path) and not layouts.is_triton_complete(
                [f.path[0] for f in files if len(f.path) == 1]
            ):
                return None
        else:
            if location.kind == "stem":
                names = self.index.names_with_prefix(location.base, location.path[-1] + b".")
            else:
                found = self.index.lookup(location.base, location.path[-1])
                names = [(location.path[-1], found.id)] if found is not None else []
            for name, ino in names:
                if is_scratch(name):
                    continue
                node = self.index.get(ino)
                if not node.is_file:
                    continue
                spec = self._file_spec((name,), node)
                if spec is None:
                    return None
                files.append(spec)
        if not files or len(files) > MAX_ENTRY_FILES:
            return None
        # Directories that hold no published file are left out.
        used = {f.path[:depth] for f in files for depth in range(1, len(f.path))}
        manifest = Manifest(
            location.path,
            location.kind,
            tuple(sorted(files, key=lambda f: f.path)),
            tuple(sorted(d for d in dirs if d[0] in used)),
        )
        try:
            manifest.check()
        except ManifestError as exc:
            log.debug("not publishing %r: %s", location.path, exc)
            return None
        if location.tree.uid is None and not self._public(location.base, manifest):
            # The cluster-wide namespace serves every user of every node.
            log.debug("not publishing %r: not readable by every user", location.path)
            return None
        return manifest

    def _public(self, base: int, manifest: Manifest) -> bool:
        """Whether every user of this node can read all of the entry in directory *base*."""
        _names, inodes = self.index.dir_path(base)
        if any(not self.index.get(ino).mode & 0o001 for ino in (self.root, *inodes)):
            return False
        return all(f.mode & 0o004 for f in manifest.files) and all(
            mode & 0o001 for _path, mode in manifest.dirs
        )

    def _file_spec(self, relative: tuple[bytes, ...], node: Inode) -> FileSpec | None:
        """A sealed file as published; None while it is being written (it will be queued)."""
        if self.writers.is_being_written(node.id) or node.object is None:
            return None
        return FileSpec(relative, stat.S_IMODE(node.mode), node.size, node.object, node.mtime_ns)
