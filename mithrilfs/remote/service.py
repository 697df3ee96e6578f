"""`Remote`: the shared tier as the filesystem sees it, lookups on a miss, publishing on seal.

It builds the parts (the Redis client, the local tree view, the fetcher and
the publisher), shares what they both need (the backoff, the objects the
tier served with the wrong bytes) and is what fs.py and the daemon call.
"""

from __future__ import annotations

import logging

import trio

from mithrilfs.index import Index, Inode
from mithrilfs.interfaces import Growth, NameListener, Writers
from mithrilfs.remote.backoff import Backoff, Health
from mithrilfs.remote.client import RedisTier, RemoteUnavailable
from mithrilfs.remote.config import RemoteConfig
from mithrilfs.remote.fetch import Fetcher
from mithrilfs.remote.local import LocalTree
from mithrilfs.remote.publish import Publisher
from mithrilfs.stats import Stats
from mithrilfs.store import ContentStore

log = logging.getLogger(__name__)

CONNECT_SECONDS = 2.0  # at mount, time given to reach the tier before serving
LOOKUP_THREADS = 8
PUBLISH_THREADS = 2


class Remote:
    """The shared tier as the filesystem sees it: lookups on a miss, publishing on seal."""

    def __init__(
        self,
        config: RemoteConfig,
        index: Index,
        store: ContentStore,
        stats: Stats,
        device_class: str,
        root: int,
    ) -> None:
        self.config = config
        self.tier = RedisTier(config, store.staging_dir)
        backoff = Backoff(config.backoff_initial, config.backoff_max)
        self.health = Health(backoff, stats, config.display)
        self._lookup_threads = trio.CapacityLimiter(LOOKUP_THREADS)
        local = LocalTree(index, root)
        refused: set[bytes] = set()
        shared = (config, index, store, stats, device_class, local, self.tier, self.health)
        self.fetcher = Fetcher(*shared, self._lookup_threads, refused)
        self.publisher = Publisher(*shared, trio.CapacityLimiter(PUBLISH_THREADS), refused)

    def attach(
        self,
        *,
        writers: Writers,
        growth: Growth,
        names: NameListener,
        cap: int,
    ) -> None:
        """Connect to the open-file layer, the evictor and the kernel's caches.

        *names* is told about every name an install creates besides the one
        being looked up: the kernel may still cache a negative entry for it.
        """
        self.publisher.writers = writers
        self.fetcher.growth = growth
        self.fetcher.names = names
        self.fetcher.cap = cap

    @property
    def negative_ttl(self) -> float:
        return self.config.negative_ttl

    @property
    def backlog(self) -> int:
        """Inodes queued or being published."""
        return self.publisher.backlog

    def close(self) -> None:
        self.tier.close()

    async def connect(self) -> None:
        """At mount, before serving: reach the tier once (bounded by CONNECT_SECONDS).

        The first lookups then find a connection (a cluster client has also
        learnt the cluster's shape) instead of spending their budget on it.
        A tier that is down only starts the backoff.
        """
        try:
            with trio.fail_after(CONNECT_SECONDS):
                await trio.to_thread.run_sync(
                    self.tier.ping, limiter=self._lookup_threads, abandon_on_cancel=True
                )
        except RemoteUnavailable as exc:
            self.health.failed(str(exc))
        except trio.TooSlowError:
            self.health.failed(f"no answer within {CONNECT_SECONDS:g}s")
        else:
            log.info("shared tier %s is reachable", self.config.display)

    async def lookup(self, parent: int, name: bytes) -> Inode | None:
        """A local miss: the inode the tier's entry created locally, or None."""
        return await self.fetcher.lookup(parent, name)

    def notify(self, ino: int) -> None:
        """A file was sealed or renamed (or a directory renamed): publish its entry soon."""
        self.publisher.notify(ino)

    def notify_renamed(self, parent: int, name: bytes) -> None:
        """A name was renamed or linked into place: publish the entries it is in."""
        self.publisher.notify_renamed(parent, name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background task: publish queued entries, backing off while the tier is down."""
        await self.publisher.run(task_status=task_status)

    async def drain(self) -> None:
        """At unmount: publish what is queued, for a bounded time."""
        await self.publisher.drain()
