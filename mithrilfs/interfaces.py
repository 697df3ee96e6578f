"""The small interfaces through which the services tell each other things.

The daemon builds the services (services.py) and connects them through
these, so that no service holds a callback into the request handlers: a
request goes down (fs -> remote/openfiles -> eviction -> index/store) and
what happens on the way is announced to listeners that live beside it
(stats, the kernel's caches), never back up to fs.
"""

from __future__ import annotations

from typing import Protocol

from mithrilfs.index import EvictedEntry


class Writers(Protocol):
    """Which inodes have a file being written (never evicted, never published half-done)."""

    def is_being_written(self, ino: int) -> bool: ...


class Staging(Writers, Protocol):
    """What the files being written take on disk, for the cap."""

    def staged_bytes(self) -> int: ...

    def largest_staged(self) -> int: ...


class Holders(Protocol):
    """Whether anyone (the kernel, an open handle) still holds an inode whose names go."""

    def is_held(self, ino: int) -> bool: ...


class Growth(Protocol):
    """Told when the store took in content (a seal, a fetch from the shared tier)."""

    def grew(self) -> None: ...


class SealListener(Protocol):
    """Told when a file's content was sealed into an object."""

    def file_sealed(self, ino: int, size: int, new_object: bool) -> None: ...


class VerificationListener(Protocol):
    """Told when an object without a valid verification mark was hashed before serving it."""

    def hashed_before_serving(self, size: int) -> None: ...


class RemovalListener(Protocol):
    """Told about every cache entry removed (cap, max_age, gc, evict, integrity)."""

    def entry_removed(self, removed: EvictedEntry, reason: str) -> None: ...


class NameListener(Protocol):
    """Told about a name that appeared without passing through the kernel."""

    def name_appeared(self, parent: int, name: bytes) -> None: ...


class NothingStaged:
    """Staging for offline commands: no daemon, so no file is being written."""

    def is_being_written(self, ino: int) -> bool:
        return False

    def staged_bytes(self) -> int:
        return 0

    def largest_staged(self) -> int:
        return 0


class NothingHeld:
    """Holders for offline commands: no kernel and no open handles."""

    def is_held(self, ino: int) -> bool:
        return False
