"""Building the services a mount serves with, and connecting them.

The daemon (and tests that call the handlers directly) build every service
here, once, and hand them to `fs.Operations`: the index and content store,
the open files, the evictor, the tenancy trees, the shared tier, the
counters, the kernel's caches and the clock.  They are connected through
the small interfaces of interfaces.py, so that a request's work flows down
and its consequences (a seal, a removal, a name from the shared tier) are
announced to listeners beside it, never back up into the handlers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mithrilfs.clock import SYSTEM_CLOCK, Clock
from mithrilfs.eviction import Evictor
from mithrilfs.index import EvictedEntry, Index
from mithrilfs.kernel import KernelCaches
from mithrilfs.openfiles import OpenFiles
from mithrilfs.remote import Remote, RemoteConfig
from mithrilfs.stats import Stats
from mithrilfs.store import ContentStore
from mithrilfs.tenancy import Trust
from mithrilfs.trees import Trees


@dataclass
class Services:
    index: Index
    content: ContentStore
    root: int  # the class root the mount serves
    stats: Stats
    clock: Clock
    trust: Trust
    files: OpenFiles
    evictor: Evictor
    trees: Trees
    kernel: KernelCaches
    remote: Remote | None


class Counting:
    """The counters of seals, verifications on the request path and removals."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def file_sealed(self, ino: int, size: int, new_object: bool) -> None:
        self.stats.inc("files_sealed_total")
        if not new_object:
            self.stats.inc("dedup_hits_total")

    def hashed_before_serving(self, size: int) -> None:
        self.stats.inc("request_verifications_total")
        self.stats.inc("request_verified_bytes_total", size)

    def entry_removed(self, removed: EvictedEntry, reason: str) -> None:
        self.stats.inc("evictions_total", reason=reason)
        self.stats.inc("evicted_bytes_total", removed.bytes_freed)


class Publishing:
    """Queues every sealed file for the shared tier."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def file_sealed(self, ino: int, size: int, new_object: bool) -> None:
        self.remote.notify(ino)


class Holding:
    """Who holds an inode whose names eviction drops: an open handle or the kernel."""

    def __init__(self, files: OpenFiles, kernel: KernelCaches) -> None:
        self.files = files
        self.kernel = kernel

    def is_held(self, ino: int) -> bool:
        if self.files.is_open(ino):
            self.files.pin(ino)  # an open file keeps reading after its object is deleted
            return True
        return self.kernel.holds(ino)


def build_services(
    index: Index,
    content: ContentStore,
    root: int,
    *,
    stats: Stats,
    cap: int,
    max_age: float | None = None,
    remote_config: RemoteConfig | None = None,
    trust: Trust | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Services:
    """Every service of a mount of the class tree *root*, connected.

    *trust* defaults to root and the user running this process.
    """
    trust = trust if trust is not None else Trust(frozenset({0, os.geteuid()}))
    counting = Counting(stats)
    # A file that can never fit under the cap is refused (EFBIG) rather than
    # evicting everything else and failing anyway.
    files = OpenFiles(index, content, max_file_size=cap, verifications=counting)
    trees = Trees(index, root, trust, stats, is_busy=files.is_being_written)
    kernel = KernelCaches(root, trees)
    evictor = Evictor(
        index,
        content,
        cap,
        max_age=max_age,
        staging=files,
        holders=Holding(files, kernel),
        listeners=[counting, kernel],
        clock=clock,
    )
    remote = None
    files.listeners.append(counting)
    if remote_config is not None:
        remote = Remote(remote_config, index, content, stats, stats.device_class, root)
        remote.attach(writers=files, growth=evictor, names=kernel, cap=cap)
        files.listeners.append(Publishing(remote))
    # Last: the counters and the shared tier see a seal before any eviction it causes.
    files.listeners.append(evictor)
    return Services(
        index=index,
        content=content,
        root=root,
        stats=stats,
        clock=clock,
        trust=trust,
        files=files,
        evictor=evictor,
        trees=trees,
        kernel=kernel,
        remote=remote,
    )
