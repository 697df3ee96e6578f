"""The shared tier: cache entries published to, and fetched from, Redis or Valkey.

A mount started with ``--remote URL`` publishes every cache entry it seals
and, when a name is missing locally, asks the shared tier for it before
answering "no such file".  The tier is optional and never fails a compile:
any error, timeout or refused object is a local miss, and the compiler
builds the entry as it would without the tier.

Keys (``<class>`` is the device class, paths are relative to their tree's root)::

    mithrilfs:v1:obj:<64 hex>                      an object's bytes, named by blake3
    mithrilfs:v1:<class>:entry:<path>              the shared tree: one entry's manifest (JSON)
    mithrilfs:v1:<class>:dirs                      a set: every directory above an entry
    mithrilfs:v1:<class>:user:<uid>:entry:<path>   the same for the private tree of <uid>
    mithrilfs:v1:<class>:user:<uid>:dirs

Trees: the class root's ``triton/`` and ``inductor/`` are the shared tree,
``users/<name>/{triton,inductor}`` the private tree of the user who owns
``users/<name>`` (and whom <name> names).  A tree publishes to and fetches
from its own namespace only, and what is fetched belongs to the tree's
owner, with modes that no one else may write through (`SAFE_MODE`).  A
shared entry that not every local user may read is not published.

A cache entry is what `layouts.entry_rule` says (a Triton key directory, an
FX graph or AOTAutograd key directory, the code-cache files sharing a stem,
or a single file); its manifest lists each file's path relative to the
entry's base (the entry directory, or for stem and single-file entries the
directory holding them), mode, size, blake3 digest and mtime.

Publishing (background, never on the request path): sealing a file, or
renaming one into place (compilers write under a temporary name first),
queues its inode in a bounded queue (oldest dropped when full, counted).  A
task takes inodes that have been quiet for `PUBLISH_SETTLE` seconds,
resolves each to its entry *as it is now*, and publishes the entry's objects
(those Redis lacks), then its manifest (last writer wins; re-published
whenever a file of the entry changes), then its parent directories.  A
Triton entry is published only once its ``__grp__*.json`` exists: Triton
writes that file last, so a published Triton entry is always complete.

Fetching (on a local miss, in the lookup handler): one round trip asks
whether the path is a known directory and for the manifests it could belong
to (read up to `MAX_MANIFEST_BYTES`); a directory is created locally (a
known directory always wins over a manifest for the same path), an entry
has the sizes of its missing objects checked, then their bytes streamed to
staging files in bounded rounds (`FETCH_WINDOW`, under a `ByteBudget`
shared by all fetches), each verified against its blake3 name (a mismatch
refuses the whole entry), moved into the object store and linked into the
index in one transaction: an entry arrives whole or not at all.  The budget for one
lookup is ``remote_timeout`` (0.2 s by default) plus one second per
`FETCH_FLOOR_RATE` bytes being fetched; after a failure the tier is skipped
for a growing interval (`Backoff`).  Answers of "not there" are remembered
for `NEGATIVE_TTL` seconds, and the kernel is told to cache negative lookups
no longer than that.  Names an install creates besides the one looked up
(the ``.cpp`` that comes with a ``.so``) are invalidated in the kernel, which
may still hold a negative entry for them.

Lifecycle: at mount the daemon reaches the tier once (`connect`, bounded)
before it serves; at unmount it publishes what is queued (`drain`, bounded).

Threads: redis-py's synchronous client runs only in worker threads
(`trio.to_thread.run_sync` with a `CapacityLimiter`, socket timeouts, no
client-side retries) and gets paths and bytes, never index state.  SQLite,
the store's renames and the counters stay on the trio thread.

Credentials: a password never comes in the URL (`parse_remote` refuses
it) but from a private file or the environment, and is kept out of reprs
and logs.

Trust: objects are verified by hash, so a tampered object is refused.
Manifests are trusted as far as their shape allows: they are checked to
describe only files inside their own entry, but whoever can write the
Redis keys decides which (valid) objects a name refers to.  See
docs/remote.md.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3
import trio

from mithrilfs import layouts
from mithrilfs.errors import FsError, UserError
from mithrilfs.index import Index, Inode, check_name
from mithrilfs.layouts import LAYOUT_ROOTS, entry_rule
from mithrilfs.stats import Stats
from mithrilfs.store import DIGEST_SIZE, EMPTY_DIGEST, ContentStore, StagingWriter
from mithrilfs.tenancy import tree_owner
from mithrilfs.units import parse_duration

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX = b"mithrilfs:v1:"
MANIFEST_FORMAT = 1

DEFAULT_TIMEOUT = 0.2  # seconds a lookup may spend on the tier (plus fetch time)
NEGATIVE_TTL = 30.0  # seconds a "not there" answer is remembered
FETCH_FLOOR_RATE = 50 * 1024 * 1024  # bytes/s the budget assumes for fetching objects
SOCKET_TIMEOUT = 5.0  # a stuck socket ends an (abandoned) worker thread after this
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
PUBLISH_QUEUE = 10_000  # inodes waiting to be published
PUBLISH_SETTLE = 0.25  # seconds an inode stays quiet before it is published
PUBLISH_BATCH = 256  # inodes resolved per publishing round
PUBLISH_TIMEOUT = 60.0  # one publishing round (objects included)
PIPELINE_BYTES = 8 * 1024 * 1024  # objects sent per round trip when publishing
DRAIN_SECONDS = 5.0  # at unmount, time given to publish what is still queued
CONNECT_SECONDS = 2.0  # at mount, time given to reach the tier before serving
MAX_ENTRY_FILES = 4096
MAX_OBJECT_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a longer manifest is refused unread
MAX_NS = (1 << 63) - 1  # the largest timestamp SQLite and the kernel take
FETCH_WINDOW = 4 * 1024 * 1024  # object bytes one fetch asks for per round trip
FETCH_IN_FLIGHT = 16 * 1024 * 1024  # object bytes all fetches of a mount hold at once
SAFE_MODE = 0o755  # what a fetched node may keep: no group/other write, setuid, setgid
PASSWORD_ENV = "MITHRILFS_REMOTE_PASSWORD"
LOOKUP_THREADS = 8
PUBLISH_THREADS = 2
_REMEMBERED_MANIFESTS = 100_000
_REMEMBERED_OWNERS = 10_000
_WALK_LIMIT = 100_000

_KINDS = ("dir", "stem", "file")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_TRUE = {"1", "true", "yes", "on"}


class RemoteUnavailable(Exception):
    """The tier could not be reached or did not answer in time."""


class ManifestError(Exception):
    """A manifest from the tier that is malformed or describes files outside its entry."""


class IntegrityError(Exception):
    """Objects from the tier whose bytes do not match their blake3 name."""

    def __init__(self, digests: list[bytes]) -> None:
        super().__init__(", ".join(d.hex() for d in digests))
        self.digests = digests


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteConfig:
    """Where the tier is and how long it may take; built by `parse_remote`."""

    url: str  # as the operator gave it; never holds a password
    client_url: str  # what redis-py gets: scheme, host, port, db, its own query options
    cluster: bool = False
    timeout: float = DEFAULT_TIMEOUT
    negative_ttl: float = NEGATIVE_TTL
    queue_size: int = PUBLISH_QUEUE
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    # Passed to redis-py apart from the URL, and kept out of every repr and log.
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The URL as logs show it (`parse_remote` refuses one with a password)."""
        return self.url


def parse_remote(
    url: str, timeout: float | None = None, password: str | None = None
) -> RemoteConfig:
    """Validate a ``--remote`` URL.

    ``redis://`` and ``rediss://`` (TLS) name one server; Redis Cluster is
    selected by the scheme ``redis+cluster://`` / ``rediss+cluster://`` or
    by the query option ``cluster=1``.  Other query options go to redis-py.
    A password inside the URL is refused: command lines and fstab are
    readable by every user of the node.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        has_password = parts.password is not None
    except ValueError as exc:
        raise UserError(f"--remote: invalid URL: {exc}", 2) from None
    if has_password or "password" in urllib.parse.parse_qs(parts.query):
        raise UserError(
            "--remote: the URL must not hold a password (every user can read command lines "
            "and fstab): put it in a file only root can read and pass --remote-password-file "
            f"FILE (fstab: remote_password_file=FILE), or set {PASSWORD_ENV}",
            2,
        )
    scheme = parts.scheme.lower()
    cluster = scheme in _CLUSTER_SCHEMES
    scheme = _CLUSTER_SCHEMES.get(scheme, scheme)
    if scheme not in ("redis", "rediss"):
        raise UserError(
            f"--remote: unsupported URL '{url}': expected redis://HOST:PORT/DB, "
            "rediss://... (TLS) or redis+cluster://HOST:PORT",
            2,
        )
    if not parts.hostname:
        raise UserError(f"--remote: no host in '{url}'", 2)
    query = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "cluster":
            cluster = cluster or value.lower() in _TRUE
        else:
            query.append((key, value))
    path = parts.path
    if path.strip("/") and not path.strip("/").isdigit():
        raise UserError(f"--remote: the database in '{url}' must be a number", 2)
    if cluster and path.strip("/") not in ("", "0"):
        raise UserError("--remote: Redis Cluster has only database 0", 2)
    if timeout is not None and not 0 < timeout <= 60:
        raise UserError("--remote-timeout must be between 0 and 60 seconds", 2)
    netloc = parts.netloc if port is not None else f"{parts.netloc}:6379"
    client_url = urllib.parse.urlunsplit((scheme, netloc, path, urllib.parse.urlencode(query), ""))
    return RemoteConfig(
        url=url,
        client_url=client_url,
        cluster=cluster,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        password=password,
    )


def read_password_file(path: Path) -> str:
    """The tier's password from *path*, which no one but its owner may read."""
    what = f"--remote-password-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UserError(f"{what}: no such file", 2) from None
    except OSError as exc:
        raise UserError(f"{what}: {exc.strerror}", 2) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what}: not a regular file", 2)
        if info.st_mode & 0o044:
            raise UserError(
                f"{what}: readable by group or others; make it private (chmod 600 {path})", 2
            )
        data = file.read(64 * 1024)
    try:
        password = data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise UserError(f"{what}: not UTF-8 text", 2) from None
    if not password or "\n" in password:
        raise UserError(f"{what}: expected one line holding the password", 2)
    return password


def parse_timeout(text: str) -> float:
    """'0.2', '200ms', '1s' -> seconds (units.parse_duration), at most a minute."""
    seconds = parse_duration(text, "--remote-timeout")
    if not 0 < seconds <= 60:
        raise UserError("--remote-timeout must be between 0 and 60 seconds", 2)
    return seconds


# -- keys and manifests -------------------------------------------------------------


def object_key(digest: bytes) -> bytes:
    return KEY_PREFIX + b"obj:" + digest.hex().encode()


def namespace(device_class: str, uid: int | None) -> bytes:
    """The key prefix of one tree's entries: the class's cluster-wide namespace
    (the shared tree) or the one of the user with this uid (their private tree)."""
    shared = KEY_PREFIX + device_class.encode() + b":"
    return shared if uid is None else shared + b"user:%d:" % uid


def entry_key(space: bytes, path: tuple[bytes, ...]) -> bytes:
    return space + b"entry:" + b"/".join(path)


def dirs_key(space: bytes) -> bytes:
    return space + b"dirs"


def is_temporary(name: bytes) -> bool:
    """Names compilers write under before renaming into place, and per-node lock files."""
    return name.startswith((b".", b"tmp")) or name.endswith(b".lock")


@dataclass(frozen=True)
class FileSpec:
    path: tuple[bytes, ...]  # relative to the entry's base directory
    mode: int  # permission bits
    size: int
    digest: bytes
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    """One cache entry as published: the unit that is fetched whole or not at all."""

    entry: tuple[bytes, ...]  # the entry's path from the class root
    kind: str  # "dir": a directory entry; "stem": files <stem>.*; "file": one file
    files: tuple[FileSpec, ...]
    dirs: tuple[tuple[tuple[bytes, ...], int], ...] = ()  # "dir" entries: (path, mode)

    @property
    def mtime_ns(self) -> int:
        return max((f.mtime_ns for f in self.files), default=0)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self, device_class: str) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "class": device_class,
                "entry": os.fsdecode(b"/".join(self.entry)),
                "kind": self.kind,
                "mtime_ns": self.mtime_ns,
                "dirs": [
                    {"path": os.fsdecode(b"/".join(path)), "mode": mode} for path, mode in self.dirs
                ],
                "files": [
                    {
                        "path": os.fsdecode(b"/".join(f.path)),
                        "mode": f.mode,
                        "size": f.size,
                        "blake3": f.digest.hex(),
                        "mtime_ns": f.mtime_ns,
                    }
                    for f in self.files
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, entry: tuple[bytes, ...]) -> Manifest:
        """Parse and check a manifest fetched for *entry*; raise ManifestError."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                raise ManifestError("unknown manifest format")
            if _split(doc["entry"]) != entry:
                raise ManifestError(f"manifest is for {doc['entry']!r}")
            kind = doc["kind"]
            if kind not in _KINDS:
                raise ManifestError(f"unknown entry kind {kind!r}")
            _int(doc.get("mtime_ns", 0), MAX_NS)
            files = tuple(
                FileSpec(
                    path=_split(item["path"]),
                    mode=_int(item["mode"], 0o7777),
                    size=_int(item["size"], MAX_OBJECT_BYTES),
                    digest=_digest(item["blake3"]),
                    mtime_ns=_int(item["mtime_ns"], MAX_NS),
                )
                for item in doc["files"]
            )
            dirs = tuple(
                (_split(item["path"]), _int(item["mode"], 0o7777)) for item in doc.get("dirs", [])
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from None
        manifest = cls(entry, kind, files, dirs)
        manifest.check()
        return manifest

    def check(self) -> None:
        """Every file must belong to this entry by the layout's own rule."""
        if not self.files or len(self.files) > MAX_ENTRY_FILES:
            raise ManifestError(f"{len(self.files)} files")
        if len({f.path for f in self.files}) != len(self.files):
            raise ManifestError("a path is listed twice")
        sizes: dict[bytes, int] = {EMPTY_DIGEST: 0}
        for f in self.files:
            if f.size == 0 and f.digest != EMPTY_DIGEST:
                raise ManifestError(f"object {f.digest.hex()} listed as empty")
            if sizes.setdefault(f.digest, f.size) != f.size:
                raise ManifestError(f"object {f.digest.hex()} listed with two sizes")
        if self.kind == "dir":
            depth = len(self.entry)
            known = {()} | {path for path, _mode in self.dirs}
            if len(known) != len(self.dirs) + 1:
                raise ManifestError("a directory is listed twice")
            for path, _mode in self.dirs:
                if path[:-1] not in known:
                    raise ManifestError("a directory's parent is not listed")
            for f in self.files:
                if f.path[:-1] not in known or f.path in known:
                    raise ManifestError("a file's directory is not listed")
                if entry_rule([*self.entry, *f.path]).depth != depth:
                    raise ManifestError(f"{f.path!r} is not part of a directory entry")
            return
        if self.dirs:
            raise ManifestError("only directory entries list directories")
        base, last = self.entry[:-1], self.entry[-1]
        for f in self.files:
            if len(f.path) != 1:
                raise ManifestError("files of a stem or single-file entry must be names")
            rule = entry_rule([*base, f.path[0]])
            if self.kind == "stem" and (rule.stem != last or rule.depth is not None):
                raise ManifestError(f"{f.path[0]!r} is not part of stem {last!r}")
            if self.kind == "file" and (
                f.path[0] != last or rule.stem is not None or rule.depth is not None
            ):
                raise ManifestError(f"{f.path[0]!r} is not a single-file entry")


def _split(text: object) -> tuple[bytes, ...]:
    if not isinstance(text, str):
        raise ManifestError("a path is not a string")
    parts = tuple(os.fsencode(part) for part in text.split("/"))
    for part in parts:
        try:
            check_name(part)
        except FsError:
            raise ManifestError(f"invalid path {text!r}") from None
    return parts


def _int(value: object, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ManifestError(f"invalid number {value!r}")
    return value


def _digest(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * DIGEST_SIZE:
        raise ManifestError(f"invalid digest {value!r}")
    return bytes.fromhex(value)


# -- small policies -------------------------------------------------------------------


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


# -- the Redis side (worker threads only) ----------------------------------------------


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
            replies = pipe.execute()
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
            return list(pipe.execute())

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
                pipe.execute()

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
            pipe.execute()

        if ready:
            self._call(manifests)
        result.published = [job.key for job in ready]
        return result


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
    return [int(n) for n in pipe.execute()]


def _get_ranges(client: Any, pieces: list[tuple[bytes, int, int]]) -> list[bytes]:
    pipe = client.pipeline(transaction=False)
    for digest, offset, length in pieces:
        pipe.getrange(object_key(digest), offset, offset + length - 1)
    return list(pipe.execute())


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


# -- the trio side: lookups, installs and the publisher --------------------------------


def split_tree(parts: tuple[bytes, ...]) -> tuple[int, bytes | None] | None:
    """Which tree a path from the class root is in, as the tier sees it: (how many
    leading components name the tree, its owner's name or None for the shared
    tree), or None for a path outside the compilers' layouts."""
    skip, tree = layouts.split_tree(list(parts))
    rest = parts[skip:]
    if not rest or rest[0].decode(errors="replace") not in LAYOUT_ROOTS:
        return None
    return (0, None) if skip == 0 else (skip, parts[1])


def names_user(name: bytes, uid: int) -> bool:
    """Whether a private tree called *name* belongs to *uid*."""
    try:
        return tree_owner(os.fsdecode(name)) == uid
    except ValueError:
        return False


@dataclass(frozen=True)
class _Tree:
    """A tree as the tier sees it: its namespace and who owns what lands in it."""

    prefix: int  # leading path components naming the tree (0: shared, 2: users/<name>)
    uid: int | None  # the namespace: None for the cluster-wide one, else the owner's uid
    owner: tuple[int, int]  # uid and gid of every node fetched into it


@dataclass(frozen=True)
class _Query:
    """What a local miss can be in the tier."""

    tree: _Tree
    local: tuple[bytes, ...]  # the missing name's path from the class root
    path: tuple[bytes, ...]  # ... and from its tree's root, as the tier knows it
    entries: list[tuple[bytes, ...]]  # entry paths (in the tree) whose manifest could hold it


@dataclass(frozen=True)
class _Location:
    """A local cache entry: its tree, path and what is needed to list its files."""

    tree: _Tree
    path: tuple[bytes, ...]  # from the tree's root
    kind: str
    base: int  # the directory holding the entry's files (the entry directory for "dir")
    root: int | None = None  # "dir" entries: the entry directory


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
        self.index = index
        self.store = store
        self.stats = stats
        self.device_class = device_class
        self.root = root
        self.tier = RedisTier(config, store.staging_dir)
        self.backoff = Backoff(config.backoff_initial, config.backoff_max)
        self.negative = NegativeCache(config.negative_ttl)
        self._lookup_threads = trio.CapacityLimiter(LOOKUP_THREADS)
        self._publish_threads = trio.CapacityLimiter(PUBLISH_THREADS)
        self._inflight: dict[tuple[bytes, ...], trio.Event] = {}
        self._top_dirs: set[int] = set()  # directories known to sit right below the root
        self._owners: dict[tuple[bytes, int], bool] = {}  # (tree name, uid) -> names_user
        # inode -> when it was last queued; insertion order is publishing order.
        self._queue: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._publishing = 0
        self._wake = trio.Event()
        self._publish_lock = trio.Lock()
        # entry key -> blake3 of the manifest last published from here
        self._published: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        # Objects the tier served with the wrong bytes: overwritten when published.
        self._refused: set[bytes] = set()
        self._is_busy: Callable[[int], bool] = lambda ino: False
        self._stored: Callable[[], None] = lambda: None
        self._appeared: Callable[[int, bytes], None] = lambda parent, name: None
        self._cap: int | None = None

    def attach(
        self,
        *,
        is_busy: Callable[[int], bool],
        stored: Callable[[], None],
        appeared: Callable[[int, bytes], None],
        cap: int,
    ) -> None:
        """Connect to the open-file layer, the evictor and the kernel (by `Operations`).

        *appeared* is told about every name an install creates besides the one
        being looked up: the kernel may still cache a negative entry for it.
        """
        self._is_busy = is_busy
        self._stored = stored
        self._appeared = appeared
        self._cap = cap

    @property
    def negative_ttl(self) -> float:
        return self.config.negative_ttl

    @property
    def backlog(self) -> int:
        """Inodes queued or being published."""
        return len(self._queue) + self._publishing

    def close(self) -> None:
        self.tier.close()

    # -- where things are in the local tree --------------------------------------------

    def _dir_path(self, ino: int) -> tuple[tuple[bytes, ...], list[int]] | None:
        """Names and inodes from the class root to directory *ino*; None if not in this tree."""
        if ino == self.root:
            return (), []
        names, inodes = self.index._path_to(ino)
        if not inodes:
            return None  # detached
        top = inodes[0]
        if top not in self._top_dirs:
            # Inode numbers are never reused and no rename moves a directory
            # to another class: a directory that heads a path from the root
            # once is below this root whenever it heads one again.
            if self.index.parent_of(top) != self.root:
                return None
            self._top_dirs.add(top)
        return tuple(names), inodes

    def _tree(self, path: tuple[bytes, ...], inodes: list[int]) -> _Tree | None:
        """The tree of *path* (whose directories are *inodes*), or None: not in one, or a
        private tree whose root is not owned by the user it is named after."""
        split = split_tree(path)
        if split is None or len(inodes) <= split[0]:
            return None
        prefix, name = split
        if name is None:
            layout_root = self.index.get(inodes[0])
            return _Tree(0, None, (layout_root.uid, layout_root.gid))
        root = self.index.get(inodes[1])
        known = self._owners.get((name, root.uid))
        if known is None:
            if len(self._owners) > _REMEMBERED_OWNERS:
                self._owners.clear()
            known = self._owners[(name, root.uid)] = names_user(name, root.uid)
        return _Tree(prefix, root.uid, (root.uid, root.gid)) if known else None

    def _location_of(self, ino: int) -> tuple[int, bytes] | None:
        # Read-only queries on the index's tables, as fsck makes; Index has no
        # "name of an inode" or "names with a prefix" query of its own yet.
        row = self.index.db.execute(
            "SELECT parent, name FROM entries WHERE inode=? LIMIT 1", (ino,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def _stem_files(self, parent: int, stem: bytes) -> list[tuple[bytes, int]]:
        rows = self.index.db.execute(
            "SELECT name, inode FROM entries WHERE parent=? AND name>=? AND name<? ORDER BY name",
            (parent, stem + b".", stem + b"/"),
        ).fetchall()
        return [(name, ino) for name, ino in rows]

    def _walk(self, directory: int) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
        """Everything below *directory* (temporary names skipped), parents first."""
        pending: list[tuple[tuple[bytes, ...], int]] = [((), directory)]
        seen = 0
        while pending:
            prefix, ino = pending.pop()
            after = 0
            while True:
                batch = self.index.readdir(ino, after, 256)
                for entry_id, name, node in batch:
                    after = entry_id
                    if is_temporary(name):
                        continue
                    seen += 1
                    if seen > _WALK_LIMIT:
                        return
                    yield (*prefix, name), node
                    if node.is_dir:
                        pending.append(((*prefix, name), node.id))
                if len(batch) < 256:
                    break

    # -- lookups ---------------------------------------------------------------------

    def _query(self, parent: int, name: bytes) -> _Query | None:
        if is_temporary(name):
            return None
        where = self._dir_path(parent)
        if where is None:
            return None
        parent_parts, inodes = where
        local = (*parent_parts, name)
        tree = self._tree(local, inodes)
        if tree is None:
            return None
        path = local[tree.prefix :]
        if len(path) < 2 or any(is_temporary(part) for part in path):
            return None
        as_file = entry_rule(list(path))
        if as_file.depth is not None and as_file.depth < len(path):
            return None  # inside an entry directory this node already has
        entries = [path]
        if as_file.stem is not None:
            entries.append((*path[:-1], as_file.stem))
        return _Query(tree, local, path, entries)

    async def lookup(self, parent: int, name: bytes) -> Inode | None:
        """Answer a local miss from the tier: the inode now created locally, or None.

        What is fetched comes from the namespace of the tree *parent* is in
        and belongs to that tree's owner, whoever asked.
        """
        now = time.monotonic()
        if not self.backoff.ready(now):
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

    async def _consult(self, parent: int, name: bytes, query: _Query) -> None:
        budget = self.config.timeout
        owner = query.tree.owner
        try:
            with trio.fail_after(budget):
                probe = await trio.to_thread.run_sync(
                    self.tier.probe,
                    namespace(self.device_class, query.tree.uid),
                    query.path,
                    query.entries,
                    limiter=self._lookup_threads,
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
            self._failed(f"no answer within {budget:.3g}s")
            return
        except RemoteUnavailable as exc:
            self._failed(str(exc))
            return
        except IntegrityError as exc:
            self._refused.update(exc.digests)
            self.stats.inc("remote_errors_total")
            self.stats.inc("integrity_failures_total", len(exc.digests))
            self.negative.add(query.local, time.monotonic())
            log.warning(
                "refused %s from the shared tier: objects do not match their hash: %s",
                os.fsdecode(b"/".join(query.local)),
                exc,
            )
            return
        except ManifestError as exc:
            self.stats.inc("remote_errors_total")
            self.negative.add(query.local, time.monotonic())
            log.warning(
                "ignored the shared tier's entry for %s: %s",
                os.fsdecode(b"/".join(query.local)),
                exc,
            )
            return
        if self.backoff.succeeded():
            log.info("shared tier %s is reachable again", self.config.display)
        if fetched is None:
            self.stats.inc("remote_misses_total")
            self.negative.add(query.local, time.monotonic())
            return
        self.stats.inc("remote_hits_total")
        if fetched:
            self.stats.inc("remote_fetched_bytes_total", fetched)
            self._stored()

    def _pick(self, probe: Probe, query: _Query) -> Manifest | None:
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

    def _failed(self, reason: str) -> None:
        self.stats.inc("remote_errors_total")
        interval = self.backoff.failed(time.monotonic())
        if interval is not None:
            log.warning(
                "shared tier %s failed (%s); serving locally, retrying in %.1fs",
                self.config.display,
                reason,
                interval,
            )

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
        if self._cap is not None and incoming > self._cap:
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
                        limiter=self._lookup_threads,
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
            return bool(self._stem_files(parent, manifest.entry[-1]))
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
                        self._appeared(parent, f.path[-1])
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

    # -- publishing ----------------------------------------------------------------------

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
        if node is not None and (node.is_file or node.is_dir) and not is_temporary(name):
            self.notify(node.id)

    def _dropped(self, count: int) -> None:
        self.stats.inc("remote_errors_total", count)
        log.warning("shared tier publish queue full: dropped %d oldest", count)

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
            self._failed(str(exc))
        except trio.TooSlowError:
            self._failed(f"no answer within {CONNECT_SECONDS:g}s")
        else:
            log.info("shared tier %s is reachable", self.config.display)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background task: publish queued entries, backing off while the tier is down."""
        task_status.started()
        while True:
            if not self._queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            now = time.monotonic()
            wait = self.backoff.remaining(now)
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
                while self._queue and (attempt == 0 or self.backoff.ready(time.monotonic())):
                    attempt += 1
                    await self.publish_pending(0.0)
            except Exception:
                log.exception("publishing to the shared tier at unmount failed")
        if self._queue:
            log.info("unmounting with %d files not published to the shared tier", self.backlog)

    async def publish_pending(self, settle: float) -> None:
        """One round: inodes quiet for *settle* seconds, resolved to entries and sent."""
        async with self._publish_lock:
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
        refused = self._refused & {digest for job in jobs for digest in job.objects}
        try:
            with trio.fail_after(PUBLISH_TIMEOUT):
                result = await trio.to_thread.run_sync(
                    self.tier.publish,
                    jobs,
                    refused,
                    limiter=self._publish_threads,
                    abandon_on_cancel=True,
                )
        except (RemoteUnavailable, trio.TooSlowError) as exc:
            reason = str(exc) or "publishing timed out"
            self._failed(reason)
            self._requeue(batch)
            return
        if self.backoff.succeeded():
            log.info("shared tier %s is reachable again", self.config.display)
        self._refused -= refused
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

    def _locations(self, inodes: list[int]) -> Iterator[_Location]:
        for ino in inodes:
            try:
                node = self.index.get(ino)
            except FsError:
                continue
            if node.nlink == 0:
                continue
            where = self._location_of(ino)
            if where is None:
                continue
            parent_path = self._dir_path(where[0])
            if parent_path is None:
                continue
            if node.is_file:
                location = self._entry_location(where[0], (*parent_path[0], where[1]))
                if location is not None:
                    yield location
            elif node.is_dir:
                # A directory renamed into place: every entry below it.
                path = (*parent_path[0], where[1])
                for relative, child in self._walk(node.id):
                    if child.is_file:
                        child_where = self._location_of(child.id)
                        if child_where is not None:
                            location = self._entry_location(child_where[0], (*path, *relative))
                            if location is not None:
                                yield location

    def _entry_location(self, parent: int, local: tuple[bytes, ...]) -> _Location | None:
        """The entry of the file at *local* (in directory *parent*), if it is publishable."""
        _names, inodes = self.index._path_to(parent)
        tree = self._tree(local, inodes)
        if tree is None:
            return None
        path = local[tree.prefix :]
        if len(path) < 2 or any(is_temporary(part) for part in path):
            return None
        rule = entry_rule(list(path))
        if rule.depth is not None:
            # The entry directory is on the way from the tree's root to *parent*.
            if len(inodes) < tree.prefix + rule.depth:
                return None
            root = inodes[tree.prefix + rule.depth - 1]
            return _Location(tree, path[: rule.depth], "dir", base=root, root=root)
        if rule.stem is not None:
            return _Location(tree, (*path[:-1], rule.stem), "stem", parent)
        return _Location(tree, path, "file", parent)

    def _manifest(self, location: _Location) -> Manifest | None:
        """The entry as it is in the local index, or None if it is not ready to publish."""
        files: list[FileSpec] = []
        dirs: list[tuple[tuple[bytes, ...], int]] = []
        if location.kind == "dir":
            assert location.root is not None
            for relative, node in self._walk(location.root):
                if node.is_dir:
                    dirs.append((relative, stat.S_IMODE(node.mode)))
                elif node.is_file:
                    spec = self._file_spec(relative, node)
                    if spec is None:
                        return None
                    files.append(spec)
            is_triton = location.path[0] == b"triton" or location.path[:2] == (
                b"inductor",
                b"triton",
            )
            # Triton writes the group file last: without it the entry is unfinished.
            if is_triton and not any(
                len(f.path) == 1 and f.path[0].startswith(b"__grp__") for f in files
            ):
                return None
        else:
            if location.kind == "stem":
                names = self._stem_files(location.base, location.path[-1])
            else:
                found = self.index.lookup(location.base, location.path[-1])
                names = [(location.path[-1], found.id)] if found is not None else []
            for name, ino in names:
                if is_temporary(name):
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
        _names, inodes = self.index._path_to(base)
        if any(not self.index.get(ino).mode & 0o001 for ino in (self.root, *inodes)):
            return False
        return all(f.mode & 0o004 for f in manifest.files) and all(
            mode & 0o001 for _path, mode in manifest.dirs
        )

    def _file_spec(self, relative: tuple[bytes, ...], node: Inode) -> FileSpec | None:
        """A sealed file as published; None while it is being written (it will be queued)."""
        if self._is_busy(node.id) or node.object is None:
            return None
        return FileSpec(relative, stat.S_IMODE(node.mode), node.size, node.object, node.mtime_ns)
