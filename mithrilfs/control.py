"""Eviction on demand (`mithrilfs gc`, `mithrilfs evict`) and the daemon's admin requests.

Offline, the command takes the store lock itself (`Repository.open`) and runs
the same `Evictor` a daemon runs.  While a daemon serves the store the lock is
taken, so the command asks the daemon through its admin socket
(`adminsock`), found from the mountpoint (``gc MOUNT``) or, for ``--store``,
from the mount table entry whose source is the store.  The daemon answers
with the mount's own Evictor, so the kernel is told about every name removed.

`AdminService` is the daemon's side: for each request it asks `authorize`
for the caller's scope (`access.Scope`, from SO_PEERCRED) and runs the
request within it.  A caller limited to one private tree sees stats of that
tree only (its usage and the counters labelled with it), may evict only
entries below ``users/<name>/`` (a selection naming any other path is
refused), and may not run gc, which evicts from every tree.  Every
mutating request is logged with the caller's uid and pid.

An eviction runs in bounded batches between which the mount serves
requests; one that outlasts the command's timeout is stopped between two
batches (each batch is one transaction), so nothing happens after the
command has given up.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.lowlevel

from mithrilfs import adminsock, stats
from mithrilfs.access import EVERYTHING, Authorize, Scope
from mithrilfs.adminsock import Peer, RequestError
from mithrilfs.classes import TreeUsage, tree_usage
from mithrilfs.clock import SYSTEM_CLOCK, Clock
from mithrilfs.errors import UserError
from mithrilfs.eviction import (
    BATCH_ENTRIES,
    LOW_WATERMARK,
    NS,
    Candidate,
    EvictionResult,
    Evictor,
    Selection,
    check_path_pattern,
    plan,
    select_entries,
)
from mithrilfs.index import EvictedEntry, Index
from mithrilfs.mounts import FSTYPE, mount_table
from mithrilfs.repository import LOCK_NAME, Repository, holder_pid, store_in_use
from mithrilfs.stats import Stats
from mithrilfs.units import format_duration, format_size

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
COMMANDS = ("gc", "evict")
OPS = ("whoami", "stats", *COMMANDS)
# The command waits this much longer than the daemon's own bound on the work,
# so that the daemon's answer (stopped, or done) still reaches it.
ANSWER_MARGIN = 5.0
# Durations beyond this (about 146 years) do not fit the nanosecond clock; NaN fails too.
MAX_SECONDS = float((1 << 62) // NS)

T = TypeVar("T")


@dataclass
class Request:
    """What `mithrilfs gc` or `mithrilfs evict` asks for."""

    command: str
    to: int | None = None  # gc: usage to get down to (default: the cap's low watermark)
    older_than: float | None = None  # evict: seconds since the last read
    device_class: str | None = None  # evict: one class tree, whole
    path: str | None = None  # evict: fnmatch pattern relative to the class root
    dry_run: bool = False

    def selection(self) -> Selection:
        return Selection(self.older_than, self.device_class, self.path)

    def validate(self) -> None:
        """Refuse what cannot be run, before anything is removed (exit 2)."""
        if self.command not in COMMANDS:
            raise UserError(f"unknown control command '{self.command}'", 2)
        if self.to is not None and self.to < 1:
            raise UserError(f"invalid size {self.to}: must be at least 1 byte", 2)
        if self.older_than is not None and not 0 <= self.older_than < MAX_SECONDS:
            raise UserError("invalid duration: must be a number of seconds, not negative", 2)
        if self.path is not None:
            check_path_pattern(self.path)
        if self.command == "evict" and self.selection() == Selection():
            raise UserError(
                "choose the entries to evict with --older-than, --device-class and/or --path", 2
            )

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Request:
        """The request in an admin message; `RequestError` for a field of the wrong type."""
        return cls(
            command=_typed(data, "op", str),
            to=_optional(data, "to", int),
            older_than=_optional(data, "older_than", float),
            device_class=_optional(data, "device_class", str),
            path=_optional(data, "path", str),
            dry_run=_optional(data, "dry_run", bool) or False,
        )


@dataclass
class Outcome:
    """What a request did (or, for a dry run, would do)."""

    dry_run: bool = False
    entries: int = 0
    bytes_freed: int = 0
    skipped: int = 0  # entries being written, left alone
    usage_before: int = 0
    usage_after: int = 0
    cap: int | None = None
    target: int | None = None  # gc
    now: int = 0  # unix ns, the clock the ages are measured against
    listed: list[tuple[str, int, int]] = field(default_factory=list)  # location, bytes, last_read
    served_by: str = ""  # "offline" or "daemon pid N"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Outcome:
        outcome = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        outcome.listed = [(str(a), int(b), int(c)) for a, b, c in outcome.listed]
        return outcome


def _typed(data: dict[str, Any], key: str, kind: type[T]) -> T:
    value = data.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RequestError(f"'{key}' must be {_KIND_NAMES[kind]}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type[T]) -> T | None:
    return None if data.get(key) is None else _typed(data, key, kind)


_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
}


# -- running a request: the same steps offline and in the daemon ---------------------


def execute(
    request: Request, evictor: Evictor, scope: Scope = EVERYTHING
) -> Generator[None, None, Outcome]:
    """Run *request* within *scope*; yields between batches so that a daemon can let requests in."""
    request.validate()
    if not scope.trusted and request.command == "gc":
        raise UserError(
            "gc evicts from every tree, so only root and trusted writers may run it; "
            f"evict from your own tree with: mithrilfs evict MOUNT --path '{scope.path}/*'",
            1,
        )
    index = evictor.index
    evictor.recency.flush(index)
    cap = evictor.cap or None
    outcome = Outcome(
        dry_run=request.dry_run, usage_before=evictor.usage(), cap=cap, now=evictor.clock.now_ns()
    )
    planned: list[tuple[Candidate, int]] = []
    result = EvictionResult()
    if request.command == "gc":
        if request.to is not None:
            outcome.target = request.to
        elif cap is not None:
            outcome.target = int(cap * LOW_WATERMARK)
        else:
            raise UserError(
                "no cap is on record for this store (it was never mounted); pass --to SIZE", 2
            )
        if request.dry_run:
            planned = evictor.plan_until_below(outcome.target)
        else:
            yield from evictor.batches(outcome.target, evictor.usage, "gc", result)
    else:
        selection = within(request.selection(), scope)
        candidates = [
            c
            for c in select_entries(index, selection, outcome.now)
            if scope.trusted or _below(c.location, scope)
        ]
        if request.dry_run:
            planned = plan(index, candidates)
        else:
            for start in range(0, len(candidates), BATCH_ENTRIES):
                chunk = candidates[start : start + BATCH_ENTRIES]
                done = evictor.remove_entries((c.entry_id for c in chunk), "evict")
                result.entries += done.entries
                result.bytes_freed += done.bytes_freed
                result.skipped += done.skipped
                yield
    if request.dry_run:
        outcome.listed = [(c.location, freed, c.last_read) for c, freed in planned]
        outcome.entries = len(planned)
        outcome.bytes_freed = sum(freed for _c, freed in planned)
    else:
        outcome.entries, outcome.bytes_freed = result.entries, result.bytes_freed
        outcome.skipped = result.skipped
    outcome.usage_after = evictor.usage()
    return outcome


def within(selection: Selection, scope: Scope) -> Selection:
    """*selection* limited to *scope*'s tree; a path naming another tree is refused."""
    if scope.trusted:
        return selection
    prefix = glob.escape(f"{scope.path}/")
    if selection.path is None:
        return replace(selection, path=f"{prefix}*")
    if not selection.path.startswith(prefix):
        raise UserError(
            f"you may evict only in your own tree: --path must start with '{scope.path}/' "
            f"('{selection.path}' names entries outside it)",
            1,
        )
    return selection


def _below(location: str, scope: Scope) -> bool:
    """Whether an entry's location ('class/path') lies in *scope*'s tree (the final guard)."""
    _class, _, path = location.partition("/")
    return path.startswith(f"{scope.path}/")


def _run_sync(steps: Generator[None, None, T]) -> T:
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def _run_async(steps: Generator[None, None, T]) -> T:
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        await trio.lowlevel.checkpoint()


# -- the command's side ----------------------------------------------------------


def perform(
    store: Path, request: Request, timeout: float = DEFAULT_TIMEOUT, clock: Clock = SYSTEM_CLOCK
) -> Outcome:
    """Run *request* on *store*: through the daemon serving it if there is one, else
    offline, measuring ages against *clock* (a daemon uses its own)."""
    request.validate()
    store = store.absolute()
    mountpoint = serving_mountpoint(store)
    if mountpoint is None:
        return run_offline(store, request, clock)
    return perform_on_mount(mountpoint, request, timeout)


def perform_on_mount(mountpoint: Path, request: Request, timeout: float) -> Outcome:
    """Run *request* through the daemon serving *mountpoint*, within the caller's scope."""
    request.validate()
    fields = {k: v for k, v in asdict(request).items() if k != "command" and v is not None}
    fields["timeout"] = timeout
    result = adminsock.ask(mountpoint, request.command, fields, wait=timeout + ANSWER_MARGIN)
    return Outcome.from_fields(result)


def serving_mountpoint(store: Path) -> Path | None:
    """Where the daemon holding *store* serves it; None when no process holds the store."""
    try:
        if not store_in_use(store):
            return None
    except OSError as exc:
        raise UserError(f"cannot read {store / LOCK_NAME}: {exc.strerror}", 2) from None
    served = [
        entry.mountpoint
        for entry in mount_table()
        if entry.fstype == FSTYPE and entry.source == os.fspath(store)
    ]
    if not served:
        pid = holder_pid(store)
        holder = f"mithrilfs pid {pid}" if pid else "another process"
        raise UserError(
            f"store {store} is in use by {holder}, which takes no eviction requests "
            "(a daemon still starting, or another command); try again when it is done",
            1,
        )
    return Path(served[-1])


class _Tally:
    """Offline removals per (device class, reason): [entries, bytes freed]."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.tallies: dict[tuple[str, str], list[int]] = {}

    def entry_removed(self, removed: EvictedEntry, reason: str) -> None:
        parent = removed.names[0][0]
        device_class = os.fsdecode(self.index.class_of(parent) or b"")
        tally = self.tallies.setdefault((device_class, reason), [0, 0])
        tally[0] += 1
        tally[1] += removed.bytes_freed


def run_offline(store: Path, request: Request, clock: Clock = SYSTEM_CLOCK) -> Outcome:
    repo = Repository.open(store, create=False)
    try:
        repo.recover()
        index = repo.index
        saved_cap = index.get_meta("gauge.cap_bytes")
        tally = _Tally(index)
        tallies = tally.tallies
        cap = int(saved_cap) if isinstance(saved_cap, int | str) and saved_cap else 0
        if cap:
            index.limit_wal(cap)  # the WAL's room, as the daemon reserves it
        evictor = Evictor(index, repo.content, cap, listeners=[tally], clock=clock)
        outcome = _run_sync(execute(request, evictor))
        if tallies:
            _record_offline(evictor, tallies)
    finally:
        repo.close()
    outcome.served_by = "offline"
    return outcome


def _record_offline(evictor: Evictor, tallies: dict[tuple[str, str], list[int]]) -> None:
    """Count offline evictions where `mithrilfs stats` and the next daemon find them."""
    index = evictor.index
    for device_class in {c for c, _reason in tallies}:
        counts = Stats(device_class)
        counts.load_rows(iter(index.load_counters()))
        for (c, reason), (entries, freed) in tallies.items():
            if c == device_class:
                counts.inc("evictions_total", entries, reason=reason)
                counts.inc("evicted_bytes_total", freed)
        index.save_counters(counts.rows(), {})
    index.save_counters(
        [],
        {
            "logical_bytes": index.logical_bytes,
            "store_bytes": evictor.footprint(),  # as the daemon reports it: what du sees
            "object_bytes": index.stored_bytes,
            "objects": index.object_count,
            "entries": index.entry_count(),
        },
    )


# -- the daemon's side -------------------------------------------------------------


class AdminService:
    """The daemon's answers on its admin socket (`adminsock.serve` calls `handle`)."""

    def __init__(
        self,
        evictor: Evictor,
        class_root: int,
        authorize: Authorize,
        current: Callable[[], stats.Snapshot],
    ) -> None:
        self.evictor = evictor
        self.class_root = class_root
        self.authorize = authorize
        # The daemon's counters as of this request (the saved rows lag by up
        # to a housekeeping round).
        self.current = current

    async def handle(self, peer: Peer, message: dict[str, Any]) -> dict[str, Any]:
        scope = self.authorize(peer.uid, peer.gid, peer.pid)
        op = message["op"]
        try:
            if op == "whoami":
                return {"uid": peer.uid, "trusted": scope.trusted, "tree": scope.path}
            if op == "stats":
                return self.stats(scope)
            if op in COMMANDS:
                return asdict(await self.evict(Request.from_fields(message), scope, peer, message))
        except UserError as exc:
            raise RequestError(str(exc), exc.exit_code) from None
        raise RequestError(f"unknown op '{op}' (known: {', '.join(OPS)})")

    def stats(self, scope: Scope) -> dict[str, Any]:
        saved = self.current()
        if scope.tree is not None:
            usage = self._usage_of(scope)
            saved = stats.of_tree(
                saved,
                scope.tree,
                {
                    "logical_bytes": usage.logical_bytes,
                    "store_bytes": usage.stored_bytes,
                    "objects": usage.objects,
                    "entries": usage.entries,
                },
            )
        return {"tree": scope.path, **stats.summarize(saved)}

    def _usage_of(self, scope: Scope) -> TreeUsage:
        directory = self.class_root
        for name in scope.path.split("/"):
            node = self.evictor.index.lookup(directory, os.fsencode(name))
            if node is None:
                return TreeUsage()  # nothing written there yet
            directory = node.id
        return tree_usage(self.evictor.index, directory)

    async def evict(
        self, request: Request, scope: Scope, peer: Peer, message: dict[str, Any]
    ) -> Outcome:
        timeout = _optional(message, "timeout", float) or DEFAULT_TIMEOUT
        if not 0 < timeout < MAX_SECONDS:
            raise RequestError("'timeout' must be a positive number of seconds")
        with trio.move_on_after(timeout) as bounded:
            outcome = await _run_async(execute(request, self.evictor, scope))
        if bounded.cancelled_caught:
            raise UserError(
                f"the {request.command} did not finish within {timeout:g}s and was stopped "
                "between two batches; what it had evicted stays evicted",
                1,
            )
        outcome.served_by = f"daemon pid {os.getpid()}"
        if not request.dry_run:
            log.info(
                "%s for uid %d (pid %d, tree %s): evicted %d entries (%d bytes)",
                request.command,
                peer.uid,
                peer.pid,
                scope.path or "all",
                outcome.entries,
                outcome.bytes_freed,
            )
        return outcome


# -- showing an outcome ------------------------------------------------------------


def render_text(outcome: Outcome) -> str:
    lines = []
    if outcome.dry_run:
        for location, freed, last_read in outcome.listed:
            lines.append(
                f"would evict {location}  ({format_size(freed)} freed, "
                f"last read {format_duration((outcome.now - last_read) / NS)} ago)"
            )
        verb = f"would evict {outcome.entries} entries, freeing"
        after = outcome.usage_before - outcome.bytes_freed
    else:
        verb = f"evicted {outcome.entries} entries, freed"
        after = outcome.usage_after
    summary = (
        f"{verb} {format_size(outcome.bytes_freed)} ({outcome.bytes_freed} bytes); "
        f"usage {format_size(outcome.usage_before)} -> {format_size(after)}"
    )
    if outcome.cap:
        summary += f" of a {format_size(outcome.cap)} cap"
    if outcome.skipped:
        summary += f"; {outcome.skipped} entries being written were left alone"
    lines.append(summary)
    return "\n".join(lines) + "\n"
