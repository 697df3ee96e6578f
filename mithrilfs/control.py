"""Eviction on demand (`mithrilfs gc`, `mithrilfs evict`), with or without a daemon.

Offline, the command takes the store lock itself (`Repository.open`) and runs
the same `Evictor` a daemon runs.  While a daemon serves the store the lock is
taken, so the command asks the daemon instead:

1. it writes its request (JSON) to ``STORE/control/<id>.request`` (under a
   temporary name first, then renamed, so that the daemon never reads half
   of one) and sends the daemon SIGUSR1.  The pid is the one in
   ``STORE/lock``, and only if ``STORE/control/serving`` names the same pid:
   that file exists while the daemon takes requests, so a store held by some
   other command (fsck, a second gc) is never signalled;
2. the daemon's control task (in daemon.py's nursery, listening with
   `trio.open_signal_receiver`) answers every pending request with the
   mount's own Evictor, so the kernel is told about every name removed, and
   writes ``<id>.response`` the same way;
3. the command polls for the response until its deadline, removes it, and
   prints it.

A request carries its deadline.  The daemon drops a request past it (a
command that gave up must not see its eviction happen later), and the
command withdraws its request when it gives up.  Crash states: a request or
response left behind is harmless; expired requests are dropped and responses
older than an hour are removed the next time the daemon answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.lowlevel

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
from mithrilfs.repository import LOCK_NAME, Repository, holder_pid, store_in_use
from mithrilfs.stats import Stats

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
SERVING_NAME = "serving"
REQUEST_SUFFIX = ".request"
RESPONSE_SUFFIX = ".response"
RESPONSE_TTL = 3600.0
DEFAULT_TIMEOUT = 60.0
COMMANDS = ("gc", "evict")

_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
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
    id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex}")
    deadline: float = 0.0  # unix seconds; the daemon drops a request past it

    def selection(self) -> Selection:
        return Selection(self.older_than, self.device_class, self.path)

    def validate(self) -> None:
        """Refuse what cannot be run, before anything is removed (exit 2)."""
        if self.command not in COMMANDS:
            raise UserError(f"unknown control command '{self.command}'", 2)
        if self.to is not None and self.to < 1:
            raise UserError(f"invalid size {self.to}: must be at least 1 byte", 2)
        if self.older_than is not None and self.older_than < 0:
            raise UserError("invalid duration: must not be negative", 2)
        if self.path is not None:
            check_path_pattern(self.path)
        if self.command == "evict" and self.selection() == Selection():
            raise UserError(
                "choose the entries to evict with --older-than, --device-class and/or --path", 2
            )

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, request_id: str) -> Request:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version 1 request")
        request = cls(
            command=_typed(data, "command", str),
            to=_optional(data, "to", int),
            older_than=_optional(data, "older_than", float),
            device_class=_optional(data, "device_class", str),
            path=_optional(data, "path", str),
            dry_run=_typed(data, "dry_run", bool),
            id=request_id,
            deadline=float(_typed(data, "deadline", float)),
        )
        return request


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
    error: str | None = None
    exit_code: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        data = json.loads(text)
        outcome = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        outcome.listed = [(str(a), int(b), int(c)) for a, b, c in outcome.listed]
        return outcome


def _typed(data: dict[str, Any], key: str, kind: type[T]) -> T:
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


def _optional(data: dict[str, Any], key: str, kind: type[T]) -> T | None:
    return None if data.get(key) is None else _typed(data, key, kind)


# -- running a request: the same steps offline and in the daemon ---------------------


def execute(request: Request, evictor: Evictor) -> Generator[None, None, Outcome]:
    """Run *request*; yields between batches so that a daemon can let requests in."""
    request.validate()
    index = evictor.index
    evictor.recency.flush(index)
    cap = evictor.cap or None
    outcome = Outcome(
        dry_run=request.dry_run, usage_before=evictor.usage(), cap=cap, now=evictor.clock()
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
        candidates = select_entries(index, request.selection(), outcome.now)
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


def perform(store: Path, request: Request, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run *request* on *store*: through its daemon if one serves it, else offline."""
    request.validate()
    store = store.absolute()
    pid = serving_daemon(store)
    if pid is None:
        return run_offline(store, request)
    return run_online(store, pid, request, timeout)


def serving_daemon(store: Path) -> int | None:
    """The pid of the daemon serving *store*; None when no process holds the store."""
    try:
        if not store_in_use(store):
            return None
    except OSError as exc:
        raise UserError(f"cannot read {store / LOCK_NAME}: {exc.strerror}", 2) from None
    pid = holder_pid(store)
    if pid is None or _serving_pid(store) != pid:
        holder = f"mithrilfs pid {pid}" if pid else "another process"
        raise UserError(
            f"store {store} is in use by {holder}, which takes no eviction requests "
            "(a daemon still starting, or another command); try again when it is done",
            1,
        )
    return pid


def _serving_pid(store: Path) -> int | None:
    try:
        return int((store / CONTROL_DIR / SERVING_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def run_offline(store: Path, request: Request) -> Outcome:
    repo = Repository.open(store, create=False)
    try:
        repo.recover()
        index = repo.index
        saved_cap = index.get_meta("gauge.cap_bytes")
        tallies: dict[tuple[str, str], list[int]] = {}

        def count(removed: EvictedEntry, reason: str) -> None:
            parent = removed.names[0][0]
            device_class = os.fsdecode(index.class_of(parent) or b"")
            tally = tallies.setdefault((device_class, reason), [0, 0])
            tally[0] += 1
            tally[1] += removed.bytes_freed

        cap = int(saved_cap) if isinstance(saved_cap, int | str) and saved_cap else 0
        if cap:
            index.limit_wal(cap)  # the WAL's room, as the daemon reserves it
        evictor = Evictor(index, repo.content, cap, on_removed=count)
        outcome = _run_sync(execute(request, evictor))
        if tallies:
            _record_offline(index, tallies)
    finally:
        repo.close()
    outcome.served_by = "offline"
    return outcome


def _record_offline(index: Index, tallies: dict[tuple[str, str], list[int]]) -> None:
    """Count offline evictions where `mithrilfs stats` and the next daemon find them."""
    for device_class in {c for c, _reason in tallies}:
        stats = Stats(device_class)
        stats.load_rows(iter(index.load_counters()))
        for (c, reason), (entries, freed) in tallies.items():
            if c == device_class:
                stats.inc("evictions_total", entries, reason=reason)
                stats.inc("evicted_bytes_total", freed)
        index.save_counters(stats.rows(), {})
    index.save_counters(
        [],
        {
            "logical_bytes": index.logical_bytes,
            "store_bytes": index.stored_bytes,
            "objects": index.object_count,
            "entries": index.entry_count(),
        },
    )


def run_online(store: Path, pid: int, request: Request, timeout: float) -> Outcome:
    directory = store / CONTROL_DIR
    request.deadline = time.time() + timeout
    request_path = directory / f"{request.id}{REQUEST_SUFFIX}"
    response_path = directory / f"{request.id}{RESPONSE_SUFFIX}"
    try:
        _write_atomic(request_path, request.to_json())
    except OSError as exc:
        raise UserError(f"cannot write a request into {directory}: {exc.strerror}", 1) from None
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        request_path.unlink(missing_ok=True)
        raise UserError(f"the daemon (pid {pid}) serving {store} is gone", 1) from None
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not response_path.exists():
        if time.monotonic() > deadline or not _alive(pid):
            request_path.unlink(missing_ok=True)
            why = f"did not answer within {timeout:g}s" if _alive(pid) else "exited"
            raise UserError(
                f"the daemon (pid {pid}) serving {store} {why}; "
                "an eviction it had started may still complete",
                1,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    text = response_path.read_text()
    response_path.unlink(missing_ok=True)
    outcome = Outcome.from_json(text)
    if outcome.error is not None:
        raise UserError(outcome.error, outcome.exit_code or 1)
    return outcome


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


# -- the daemon's side -------------------------------------------------------------


def ignore_requests_until_served() -> None:
    """SIGUSR1 must never kill a daemon that does not (or no longer) take requests.

    Called first thing in the daemon; `serve_requests` handles the signal
    while it runs and the default (terminate) never comes back.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


async def serve_requests(
    evictor: Evictor, store: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer eviction requests whenever SIGUSR1 arrives (a task of the daemon's nursery)."""
    directory = store / CONTROL_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    marker = directory / SERVING_NAME
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        # Listening before advertising: a command that sees the marker may signal at once.
        _write_atomic(marker, f"{os.getpid()}\n")
        try:
            task_status.started()
            await _answer_pending_logged(evictor, directory)
            async for _signum in signals:
                await _answer_pending_logged(evictor, directory)
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()


async def _answer_pending_logged(evictor: Evictor, directory: Path) -> None:
    try:
        await answer_pending(evictor, directory)
    except OSError as exc:
        # A full or unreadable store must not take the mount down; the
        # command times out and says so.
        log.warning("could not answer eviction requests in %s: %s", directory, exc)


async def answer_pending(evictor: Evictor, directory: Path) -> None:
    """Answer every request waiting in *directory*, oldest name first."""
    for request_id, text in _take_requests(directory):
        try:
            request = Request.from_json(text, request_id)
        except (ValueError, KeyError, TypeError) as exc:
            outcome = Outcome(error=f"malformed eviction request: {exc}", exit_code=2)
        else:
            if request.deadline < time.time():
                log.warning("dropped eviction request %s: its deadline passed", request_id)
                continue
            outcome = await _answer(request, evictor)
        outcome.served_by = f"daemon pid {os.getpid()}"
        _write_atomic(directory / f"{request_id}{RESPONSE_SUFFIX}", outcome.to_json())


def _take_requests(directory: Path) -> list[tuple[str, str]]:
    """(id, text) of each pending request, removed from *directory*; stale responses go too."""
    try:
        names = sorted(path.name for path in directory.iterdir())
    except FileNotFoundError:
        return []
    taken = []
    for name in names:
        path = directory / name
        if name.endswith(RESPONSE_SUFFIX):
            _remove_if_stale(path)
            continue
        request_id = name.removesuffix(REQUEST_SUFFIX)
        if request_id == name or not _ID.fullmatch(request_id):
            continue
        try:
            text = path.read_text()
            path.unlink()
        except FileNotFoundError:
            continue  # withdrawn
        taken.append((request_id, text))
    return taken


async def _answer(request: Request, evictor: Evictor) -> Outcome:
    try:
        outcome = await _run_async(execute(request, evictor))
    except UserError as exc:
        return Outcome(error=str(exc), exit_code=exc.exit_code)
    except Exception:
        log.exception("eviction request %s failed", request.id)
        return Outcome(error="the eviction failed; see the daemon's log", exit_code=1)
    if not request.dry_run:
        log.info(
            "%s request %s: evicted %d entries (%d bytes)",
            request.command,
            request.id,
            outcome.entries,
            outcome.bytes_freed,
        )
    return outcome


def _remove_if_stale(path: Path) -> None:
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > RESPONSE_TTL:
            path.unlink()


# -- showing an outcome ------------------------------------------------------------


def render_text(outcome: Outcome) -> str:
    lines = []
    if outcome.dry_run:
        for location, freed, last_read in outcome.listed:
            lines.append(
                f"would evict {location}  ({_human(freed)} freed, "
                f"last read {_age(outcome.now - last_read)} ago)"
            )
        verb = f"would evict {outcome.entries} entries, freeing"
        after = outcome.usage_before - outcome.bytes_freed
    else:
        verb = f"evicted {outcome.entries} entries, freed"
        after = outcome.usage_after
    summary = (
        f"{verb} {_human(outcome.bytes_freed)} ({outcome.bytes_freed} bytes); "
        f"usage {_human(outcome.usage_before)} -> {_human(after)}"
    )
    if outcome.cap:
        summary += f" of a {_human(outcome.cap)} cap"
    if outcome.skipped:
        summary += f"; {outcome.skipped} entries being written were left alone"
    lines.append(summary)
    return "\n".join(lines) + "\n"


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _age(ns: int) -> str:
    seconds = max(0, ns) / NS
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
