"""What fetching and publishing both work with, handed to each by `Remote`."""

from __future__ import annotations

import trio

from mithrilfs.index import Index
from mithrilfs.remote.backoff import Health
from mithrilfs.remote.client import RedisTier
from mithrilfs.remote.config import RemoteConfig
from mithrilfs.remote.local import LocalTree
from mithrilfs.stats import Stats
from mithrilfs.store import ContentStore


class TierPart:
    """The base of `Fetcher` and `Publisher`; each adds its own state in `setup`."""

    def __init__(
        self,
        config: RemoteConfig,
        index: Index,
        store: ContentStore,
        stats: Stats,
        device_class: str,
        local: LocalTree,
        tier: RedisTier,
        health: Health,
        threads: trio.CapacityLimiter,
        refused: set[bytes],
    ) -> None:
        self.config = config
        self.index = index
        self.store = store
        self.stats = stats
        self.device_class = device_class
        self.local = local
        self.tier = tier
        self.health = health
        self.threads = threads  # worker threads this part may use at once
        # Objects the tier served with the wrong bytes: a fetch adds them, and
        # publishing overwrites them in the tier.
        self.refused = refused
        self.setup()

    def setup(self) -> None:
        """State of one part's own, made once the shared parts are in place."""
