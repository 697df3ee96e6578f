"""The Redis side: redis-py's synchronous client, run only in worker threads.

Calls go through `trio.to_thread.run_sync` with a `CapacityLimiter`, socket
timeouts and no client-side retries; they get paths and bytes, never index
state.  Any Redis or socket failure is `RemoteUnavailable`.  Fetched objects
are streamed into staging files in bounded rounds (`FETCH_WINDOW`, under a
`ByteBudget` shared by all fetches of a mount) and verified against their
blake3 names.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3

from mithrilfs.remote.config import RemoteConfig
from mithrilfs.remote.keys import dirs_key, entry_key, object_key
from mithrilfs.remote.manifest import MAX_MANIFEST_BYTES, MAX_OBJECT_BYTES, ManifestError
from mithrilfs.store import StagingWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

SOCKET_TIMEOUT = 5.0  # a stuck socket ends an (abandoned) worker thread after this
PIPELINE_BYTES = 8 * 1024 * 1024  # objects sent per round trip when publishing
FETCH_WINDOW = 4 * 1024 * 1024  # object bytes one fetch asks for per round trip
FETCH_IN_FLIGHT = 16 * 1024 * 1024  # object bytes all fetches of a mount hold at once


class RemoteUnavailable(Exception):
    """The tier could not be reached or did not answer in time."""


class IntegrityError(Exception):
    """Objects from the tier whose bytes do not match their blake3 name."""

    def __init__(self, digests: list[bytes]) -> None:
        super().__init__(", ".join(d.hex() for d in digests))
        self.digests = digests


@dataclass
class Probe:
    """What one lookup round trip learned."""

    is_dir: bool
    manifests: dict[tuple[bytes, ...], bytes | None]


@dataclass
class PublishJob:
    """One entry ready to publish: built on the trio thread, sent from a worker thread."""

    key: bytes
    manifest: bytes
    objects: dict[bytes, tuple[Path, int]]  # digest -> (object file, size)
    dirs_key: bytes  # the set of directories of the entry's namespace
    dirs: list[bytes]  # directories above the entry, from its tree's root


@dataclass
class PublishResult:
    uploaded: int = 0  # objects sent
    uploaded_bytes: int = 0
    published: list[bytes] = field(default_factory=list)  # entry keys
    skipped: int = 0  # entries whose local objects vanished or did not verify


class StagedObjects:
    """Objects fetched into staging files, handed from a worker thread to the trio thread.

    A lookup that runs out of time abandons its thread and sets `abandoned`:
    the thread stops at its next round trip, and whichever side finishes last
    deletes the files, so nothing is left in staging/.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.paths: dict[bytes, Path] = {}
        self.fetched_bytes = 0
        self.done = False
        self.abandoned = False

    def discard(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        self.paths.clear()


class FetchAbandoned(Exception):
    """The lookup that wanted these objects gave up: stop reading."""


class ByteBudget:
    """Object bytes that fetch threads may hold at once, shared by every fetch of a mount.

    A round trip takes its bytes before it is sent and gives them back once
    they are on disk, so a burst of large fetches waits here instead of
    holding whole entries in memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, amount: int, staged: StagedObjects) -> int:
        """Take *amount* bytes (at most the limit), waiting for them; FetchAbandoned when
        *staged* is abandoned meanwhile.  Returns what was taken, for `release`."""
        amount = min(amount, self.limit)
        with self._cond:
            while not staged.abandoned and self.used + amount > self.limit:
                self._cond.wait()
            if staged.abandoned:
                raise FetchAbandoned
            self.used += amount
            self.peak = max(self.peak, self.used)
        return amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()

    def wake(self) -> None:
        """A fetch was abandoned: let its thread stop waiting."""
        with self._cond:
            self._cond.notify_all()


def fetch_rounds(
    sizes: dict[bytes, int], window: int = FETCH_WINDOW
) -> Iterator[list[tuple[bytes, int, int]]]:
    """(digest, offset, length) pieces of every object, in rounds of at most *window* bytes.

    Small objects share a round trip; a large one is read a window at a time.
    """
    batch: list[tuple[bytes, int, int]] = []
    room = window
    for digest in sorted(sizes):
        offset, size = 0, sizes[digest]
        while offset < size:
            length = min(size - offset, room)
            batch.append((digest, offset, length))
            offset += length
            room -= length
            if room == 0:
                yield batch
                batch, room = [], window
    if batch:
        yield batch


class RedisTier:
    """The synchronous redis-py client; every method runs in a worker thread."""

    def __init__(self, config: RemoteConfig, staging_dir: Path) -> None:
        self.config = config
        self.staging_dir = staging_dir
        self.budget = ByteBudget(FETCH_IN_FLIGHT)
        self.window = FETCH_WINDOW
        self._client: Any = None
        self._lock = threading.Lock()
        self._names = itertools.count()
        # At mount, not at the first lookup: importing redis-py takes ~0.1 s.
        # A plain client connects lazily; a cluster client connects when made.
        if not config.cluster:
            self._client = _make_client(config)

    def _connect(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _make_client(self.config)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a broken connection: nothing to do
                log.debug("closing the shared tier client: %s", exc)

    def _call(self, operation: Callable[[Any], T]) -> T:
        """Run *operation* with the client; any Redis or socket failure is RemoteUnavailable."""
        import redis

        try:
            return operation(self._connect())
        except (redis.RedisError, OSError) as exc:
            if self.config.cluster:
                self.close()  # the cluster's shape may have changed: rediscover it
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from None

    def ping(self) -> None:
        self._call(lambda client: client.ping())

    def probe(
        self, space: bytes, path: tuple[bytes, ...], entries: list[tuple[bytes, ...]]
    ) -> Probe:
        def run(client: Any) -> Probe:
            pipe = client.pipeline(transaction=False)
            pipe.sismember(dirs_key(space), b"/".join(path))
            for entry in entries:
                # At most one byte more than a manifest may have: no hostile
                # value is read whole.
                pipe.getrange(entry_key(space, entry), 0, MAX_MANIFEST_BYTES)
            replies = _replies(pipe)
            return Probe(
                bool(replies[0]),
                {e: v or None for e, v in zip(entries, replies[1:], strict=True)},
            )

        return self._call(run)

    def fetch(self, sizes: dict[bytes, int], staged: StagedObjects) -> None:
        """Stream objects (digest -> size) into staging files, verified, into *staged*.

        Every size is checked (STRLEN) before any body is read.  Bodies come
        in round trips of at most FETCH_WINDOW bytes (pipelined GETRANGEs),
        each holding its bytes against the budget every fetch shares, and
        go straight to staging files.  Between round trips the thread looks
        at `staged.abandoned`: a fetch whose lookup gave up stops reading.
        """
        writers: dict[bytes, StagingWriter] = {}
        try:
            digests = sorted(sizes)
            lengths = dict(
                zip(
                    digests,
                    self._call(functools.partial(_strlen_many, digests=digests)),
                    strict=True,
                )
            )
            missing = sum(1 for d in digests if sizes[d] and not lengths[d])
            if missing:
                raise ManifestError(f"{missing} of its objects are missing from the tier")
            # Not the size of the bytes named so: refused unread, and repaired
            # (overwritten) when this node publishes those bytes itself.
            wrong = [d for d in digests if lengths[d] != sizes[d]]
            if wrong:
                raise IntegrityError(wrong)
            for pieces in fetch_rounds(sizes, self.window):
                if staged.abandoned:
                    raise FetchAbandoned
                taken = self.budget.acquire(sum(length for _d, _o, length in pieces), staged)
                try:
                    replies = self._call(functools.partial(_get_ranges, pieces=pieces))
                    for (digest, offset, length), data in zip(pieces, replies, strict=True):
                        if len(data) != length:
                            raise ManifestError(f"object {digest.hex()} changed while read")
                        writer = writers.get(digest)
                        if writer is None:
                            writer = writers[digest] = StagingWriter(self._staging_path())
                        writer.write(data)
                        staged.fetched_bytes += length
                        if offset + length == sizes[digest]:
                            if writer.close() != digest:
                                raise IntegrityError([digest])
                            staged.paths[digest] = writers.pop(digest).path
                    del replies
                finally:
                    self.budget.release(taken)
        except FetchAbandoned:
            # Nobody waits for this thread any more; the files go in `finally`.
            log.info(
                "stopped an abandoned fetch after %d of %d bytes",
                staged.fetched_bytes,
                sum(sizes.values()),
            )
        except BaseException:
            staged.discard()
            raise
        finally:
            for writer in writers.values():
                writer.discard()
            with staged.lock:
                staged.done = True
                if staged.abandoned:
                    staged.discard()

    def _staging_path(self) -> Path:
        return self.staging_dir / f"remote.{os.getpid()}.{next(self._names)}"

    def publish(self, jobs: list[PublishJob], overwrite: set[bytes]) -> PublishResult:
        """Objects first (those the tier lacks), then manifests, then directories."""
        result = PublishResult()
        sizes = {d: size for job in jobs for d, (_p, size) in job.objects.items()}
        paths = {d: path for job in jobs for d, (path, _s) in job.objects.items()}
        digests = sorted(sizes)

        def exists(client: Any) -> list[int]:
            pipe = client.pipeline(transaction=False)
            for digest in digests:
                pipe.exists(object_key(digest))
            return _replies(pipe)

        present = self._call(exists) if digests else []
        wanted = [
            d for d, there in zip(digests, present, strict=True) if not there or d in overwrite
        ]
        unusable: set[bytes] = set()
        batch: list[tuple[bytes, bytes]] = []
        batch_bytes = 0

        def send(items: list[tuple[bytes, bytes]]) -> None:
            def run(client: Any) -> None:
                pipe = client.pipeline(transaction=False)
                for digest, data in items:
                    # NX: objects are immutable; a refused copy is overwritten.
                    pipe.set(object_key(digest), data, nx=digest not in overwrite)
                _replies(pipe)

            self._call(run)
            result.uploaded += len(items)
            result.uploaded_bytes += sum(len(data) for _d, data in items)

        for digest in wanted:
            data = _read_verified(paths[digest], digest, sizes[digest])
            if data is None:
                unusable.add(digest)
                continue
            batch.append((digest, data))
            batch_bytes += len(data)
            if batch_bytes >= PIPELINE_BYTES:
                send(batch)
                batch, batch_bytes = [], 0
        if batch:
            send(batch)

        ready = [job for job in jobs if not unusable & job.objects.keys()]
        result.skipped = len(jobs) - len(ready)

        def manifests(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for job in ready:
                pipe.set(job.key, job.manifest)
                if job.dirs:
                    pipe.sadd(job.dirs_key, *job.dirs)
            _replies(pipe)

        if ready:
            self._call(manifests)
        result.published = [job.key for job in ready]
        return result


def _replies(pipe: Any) -> list[Any]:
    """Send a Redis pipeline's commands in one round trip; their replies, in order."""
    return list(pipe.execute())


def _make_client(config: RemoteConfig) -> Any:
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry

    # No client-side retries: the budget is ours, and a failure means back off.
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": max(config.timeout, 0.5),
        "retry": Retry(NoBackoff(), 0),
    }
    if config.password is not None:
        options["password"] = config.password
    if config.cluster:
        return RedisCluster.from_url(config.client_url, **options)
    return Redis.from_url(config.client_url, health_check_interval=0, **options)


def _strlen_many(client: Any, digests: list[bytes]) -> list[int]:
    # Pipelines rather than multi-key commands: in a cluster the keys live in many slots.
    pipe = client.pipeline(transaction=False)
    for digest in digests:
        pipe.strlen(object_key(digest))
    return [int(n) for n in _replies(pipe)]


def _get_ranges(client: Any, pieces: list[tuple[bytes, int, int]]) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for digest, offset, length in pieces:
        pipe.getrange(object_key(digest), offset, offset + length - 1)
    return _replies(pipe)


def _read_verified(path: Path, digest: bytes, size: int) -> bytes | None:
    """A local object's bytes, or None when it is gone or no longer matches its name."""
    if size > MAX_OBJECT_BYTES:
        log.info("not publishing object %s: %d bytes is over the limit", digest.hex(), size)
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None  # evicted since the entry was resolved
    if len(data) != size or blake3.blake3(data).digest() != digest:
        log.warning("not publishing object %s: it does not match its hash", digest.hex())
        return None
    return data
