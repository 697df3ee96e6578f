"""Fetching (on a local miss, in the lookup handler).

One round trip asks whether the path is a known directory and for the
manifests it could belong to (read up to `MAX_MANIFEST_BYTES`); a directory
is created locally (a known directory always wins over a manifest for the
same path), an entry has the sizes of its missing objects checked, then
their bytes streamed to staging files (`RedisTier.fetch`), each verified
against its blake3 name (a mismatch refuses the whole entry), moved into the
object store and linked into the index in one transaction: an entry arrives
whole or not at all.  The budget for one lookup is ``remote_timeout`` (0.2 s
by default) plus one second per `FETCH_FLOOR_RATE` bytes being fetched.
Answers of "not there" are remembered for `NEGATIVE_TTL` seconds.  Names an
install creates besides the one looked up (the ``.cpp`` that comes with a
``.so``) are reported to the name listener: the kernel may still hold a negative
entry for them.  What is fetched belongs to the tree's owner, with modes no
one else may write through (`SAFE_MODE`).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass

import trio

from mithrilfs.errors import FsError
from mithrilfs.index import Inode
from mithrilfs.interfaces import Growth, NameListener
from mithrilfs.layouts import entry_rule, is_scratch
from mithrilfs.remote.backoff import NegativeCache
from mithrilfs.remote.client import (
    IntegrityError,
    Probe,
    RemoteUnavailable,
    StagedObjects,
)
from mithrilfs.remote.keys import namespace
from mithrilfs.remote.local import Tree
from mithrilfs.remote.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError
from mithrilfs.remote.part import TierPart
from mithrilfs.store import EMPTY_DIGEST

log = logging.getLogger(__name__)

FETCH_FLOOR_RATE = 50 * 1024 * 1024  # bytes/s the budget assumes for fetching objects
SAFE_MODE = 0o755  # what a fetched node may keep: no group/other write, setuid, setgid


@dataclass(frozen=True)
class Query:
    """What a local miss can be in the tier."""

    tree: Tree
    local: tuple[bytes, ...]  # the missing name's path from the class root
    path: tuple[bytes, ...]  # ... and from its tree's root, as the tier knows it
    entries: list[tuple[bytes, ...]]  # entry paths (in the tree) whose manifest could hold it


class Fetcher(TierPart):
    """Answers local misses from the tier, installing what it fetches."""

    def setup(self) -> None:
        self.negative = NegativeCache(self.config.negative_ttl)
        self._inflight: dict[tuple[bytes, ...], trio.Event] = {}
        # Set by `Remote.attach` before the mount serves (services.build_services).
        self.growth: Growth
        self.names: NameListener
        self.cap: int | None = None

    def _query(self, parent: int, name: bytes) -> Query | None:
        if is_scratch(name):
            return None
        where = self.local.dir_path(parent)
        if where is None:
            return None
        parent_parts, inodes = where
        local = (*parent_parts, name)
        placed = self.local.place(local, inodes)
        if placed is None:
            return None
        tree, path = placed
        as_file = entry_rule(list(path))
        if as_file.depth is not None and as_file.depth < len(path):
            return None  # inside an entry directory this node already has
        entries = [path]
        if as_file.stem is not None:
            entries.append((*path[:-1], as_file.stem))
        return Query(tree, local, path, entries)

    async def lookup(self, parent: int, name: bytes) -> Inode | None:
        """Answer a local miss from the tier: the inode now created locally, or None.

        What is fetched comes from the namespace of the tree *parent* is in
        and belongs to that tree's owner, whoever asked.
        """
        now = time.monotonic()
        if not self.health.backoff.ready(now):
            return None
        query = self._query(parent, name)
        if query is None or self.negative.hit(query.local, now):
            return None
        running = self._inflight.get(query.local)
        if running is not None:
            await running.wait()  # the same name, asked by another process
            return self.index.lookup(parent, name)
        done = self._inflight[query.local] = trio.Event()
        try:
            await self._consult(parent, name, query)
        except Exception:
            # A bug here must not fail the compile: log it, answer locally, and
            # do not pay for it again on every lookup of the name.
            self.stats.inc("remote_errors_total")
            self.negative.add(query.local, time.monotonic())
            log.exception("shared tier lookup of %s failed", os.fsdecode(b"/".join(query.local)))
        finally:
            del self._inflight[query.local]
            done.set()
        return self.index.lookup(parent, name)

    async def _consult(self, parent: int, name: bytes, query: Query) -> None:
        budget = self.config.timeout
        owner = query.tree.owner
        try:
            with trio.fail_after(budget):
                probe = await trio.to_thread.run_sync(
                    self.tier.probe,
                    namespace(self.device_class, query.tree.uid),
                    query.path,
                    query.entries,
                    limiter=self.threads,
                    abandon_on_cancel=True,
                )
            # A directory above published entries is never an entry itself:
            # if a manifest says otherwise, the directory wins.
            manifest = None if probe.is_dir else self._pick(probe, query)
            if probe.is_dir:
                fetched = self._install_dir(parent, name, owner)
            elif manifest is not None:
                fetched = await self._fetch_and_install(parent, name, manifest, budget, owner)
            else:
                fetched = None
        except trio.TooSlowError:
            self.health.failed(f"no answer within {budget:.3g}s")
            return
        except RemoteUnavailable as exc:
            self.health.failed(str(exc))
            return
        except IntegrityError as exc:
            self.refused.update(exc.digests)
            self.stats.inc("integrity_failures_total", len(exc.digests))
            self._refuse(
                query, "refused %s from the shared tier: objects do not match their hash: %s", exc
            )
            return
        except ManifestError as exc:
            self._refuse(query, "ignored the shared tier's entry for %s: %s", exc)
            return
        self.health.succeeded()
        if fetched is None:
            self.stats.inc("remote_misses_total")
            self.negative.add(query.local, time.monotonic())
            return
        self.stats.inc("remote_hits_total")
        if fetched:
            self.stats.inc("remote_fetched_bytes_total", fetched)
            self.growth.grew()

    def _refuse(self, query: Query, message: str, exc: Exception) -> None:
        """An entry the tier holds but this node will not take: one error, a remembered miss."""
        self.stats.inc("remote_errors_total")
        self.negative.add(query.local, time.monotonic())
        log.warning(message, os.fsdecode(b"/".join(query.local)), exc)

    def _pick(self, probe: Probe, query: Query) -> Manifest | None:
        """The manifest that answers the lookup, if any."""
        for entry in query.entries:
            data = probe.manifests.get(entry)
            if data is None:
                continue
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest of over {MAX_MANIFEST_BYTES} bytes")
            manifest = Manifest.from_json(data, entry)
            if manifest.kind == "stem" and not any(
                f.path == query.path[-1:] for f in manifest.files
            ):
                continue  # the stem is known, but not this file of it
            return manifest
        return None

    async def _fetch_and_install(
        self,
        parent: int,
        name: bytes,
        manifest: Manifest,
        budget: float,
        owner: tuple[int, int],
    ) -> int | None:
        """Fetch what the store lacks, then link the entry; bytes fetched, or None."""
        if self._conflicts(parent, manifest):
            return None  # created here meanwhile: the local entry wins
        wanted: dict[bytes, int] = {}
        for f in manifest.files:
            local_size = self.index.object_size(f.digest)
            if local_size is None:
                wanted[f.digest] = f.size
            elif local_size != f.size:
                raise ManifestError(f"object {f.digest.hex()} is {local_size} bytes here")
        incoming = sum(wanted.values())
        if self.cap is not None and incoming > self.cap:
            log.info("not fetching %s: larger than the cap", os.fsdecode(b"/".join(manifest.entry)))
            return None
        staged = StagedObjects()
        try:
            if wanted:
                with trio.fail_after(budget + incoming / FETCH_FLOOR_RATE):
                    await trio.to_thread.run_sync(
                        self.tier.fetch,
                        wanted,
                        staged,
                        limiter=self.threads,
                        abandon_on_cancel=True,
                    )
            installed = self._install(parent, name, manifest, staged, owner)
        except BaseException:
            with staged.lock:
                staged.abandoned = True
                if staged.done:
                    staged.discard()
            self.tier.budget.wake()  # the thread may wait for bytes it no longer needs
            raise
        return staged.fetched_bytes if installed else None

    def _conflicts(self, parent: int, manifest: Manifest) -> bool:
        if manifest.kind == "stem":
            return bool(self.index.names_with_prefix(parent, manifest.entry[-1] + b".", limit=1))
        return self.index.lookup(parent, manifest.entry[-1]) is not None

    def _parent_alive(self, parent: int) -> bool:
        try:
            node = self.index.get(parent)
        except FsError:
            return False
        return node.is_dir and node.nlink > 0

    def _install(
        self,
        parent: int,
        name: bytes,
        manifest: Manifest,
        staged: StagedObjects,
        owner: tuple[int, int],
    ) -> bool:
        """Link a fetched entry into the index, whole, in one transaction.

        Runs without an await, so no request sees it half done.  Objects are
        moved into the store first and rows written second; a crash between
        the two leaves orphan objects that recovery removes.
        """
        index, store = self.index, self.store
        try:
            if not self._parent_alive(parent) or self._conflicts(parent, manifest):
                return False
            for f in manifest.files:
                if (
                    f.digest not in staged.paths
                    and f.digest != EMPTY_DIGEST
                    and (index.object_size(f.digest) is None)
                ):
                    return False  # a local copy it relied on was evicted meanwhile
            moved: list[bytes] = []
            try:
                for digest, path in list(staged.paths.items()):
                    if store.publish(path, digest):
                        moved.append(digest)
                    del staged.paths[digest]
                with index.transaction():
                    self._link(parent, manifest, owner)
            except BaseException:
                for digest in moved:
                    if index.object_size(digest) is None:
                        store.delete(digest)
                raise
            if manifest.kind != "dir":
                # Siblings of the name looked up (the .cpp of a .so): the kernel
                # may hold a negative entry for them from before.
                for f in manifest.files:
                    if f.path[-1] != name:
                        self.names.name_appeared(parent, f.path[-1])
            return True
        finally:
            staged.discard()

    def _link(self, parent: int, manifest: Manifest, owner: tuple[int, int]) -> None:
        """Create the entry's nodes as *owner*'s, with modes no one else may write through."""
        index = self.index
        base = parent
        dirs: dict[tuple[bytes, ...], int] = {(): parent}
        if manifest.kind == "dir":
            root = index.make_node(parent, manifest.entry[-1], stat.S_IFDIR | 0o755, *owner)
            dirs[()] = base = root.id
            for path, mode in sorted(manifest.dirs, key=lambda item: len(item[0])):
                node = index.make_node(
                    dirs[path[:-1]], path[-1], stat.S_IFDIR | (mode & SAFE_MODE), *owner
                )
                dirs[path] = node.id
        for f in manifest.files:
            node = index.make_node(
                dirs[f.path[:-1]] if manifest.kind == "dir" else base,
                f.path[-1],
                stat.S_IFREG | (f.mode & SAFE_MODE),
                *owner,
            )
            index.set_content(node.id, f.digest, f.size, f.mtime_ns)
            index.set_attrs(node.id, mtime_ns=f.mtime_ns, ctime_ns=f.mtime_ns)

    def _install_dir(self, parent: int, name: bytes, owner: tuple[int, int]) -> int | None:
        """A directory the tier knows above some entry: create it, empty, as *owner*'s."""
        if not self._parent_alive(parent) or self.index.lookup(parent, name) is not None:
            return None
        with self.index.transaction():
            self.index.make_node(parent, name, stat.S_IFDIR | 0o755, *owner)
        return 0
