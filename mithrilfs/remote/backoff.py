"""Remembering failures and misses: skip a tier that is down, and names it lacks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mithrilfs.remote.config import BACKOFF_INITIAL, BACKOFF_MAX
from mithrilfs.stats import Stats

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """After a failure, skip the tier for a growing interval; a success resets it."""

    initial: float = BACKOFF_INITIAL
    maximum: float = BACKOFF_MAX
    interval: float = 0.0
    until: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.until

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)

    def failed(self, now: float) -> float | None:
        """Record a failure; return the new interval, or None if one was already running.

        Failures of requests that were in flight together count once.
        """
        if now < self.until:
            return None
        self.interval = min(self.maximum, 2 * self.interval if self.interval else self.initial)
        self.until = now + self.interval
        return self.interval

    def succeeded(self) -> bool:
        """Reset; True when this ends a period of failures."""
        recovered = self.interval > 0
        self.interval = 0.0
        self.until = 0.0
        return recovered


class NegativeCache:
    """Keys the tier recently said it does not have, forgotten after *ttl* seconds."""

    def __init__(self, ttl: float, max_size: int = 100_000) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self._expiry: dict[object, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def hit(self, key: object, now: float) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[key]
            return False
        return True

    def add(self, key: object, now: float) -> None:
        if len(self._expiry) >= self.max_size:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            if len(self._expiry) >= self.max_size:
                # Insertion order is expiry order: keep the newer half.
                keep = list(self._expiry.items())[self.max_size // 2 :]
                self._expiry = dict(keep)
        self._expiry.pop(key, None)
        self._expiry[key] = now + self.ttl

    def forget(self, key: object) -> None:
        self._expiry.pop(key, None)


class Health:
    """Whether the tier answers, as lookups and the publisher both learn it.

    A failure counts as an error and starts (or continues) the backoff; the
    first success after failures is logged once.
    """

    def __init__(self, backoff: Backoff, stats: Stats, display: str) -> None:
        self.backoff = backoff
        self.stats = stats
        self.display = display

    def failed(self, reason: str) -> None:
        self.stats.inc("remote_errors_total")
        interval = self.backoff.failed(time.monotonic())
        if interval is not None:
            log.warning(
                "shared tier %s failed (%s); serving locally, retrying in %.1fs",
                self.display,
                reason,
                interval,
            )

    def succeeded(self) -> None:
        if self.backoff.succeeded():
            log.info("shared tier %s is reachable again", self.display)
