"""The mount lifecycle: open the store, mount, serve, and shut down cleanly.

`run_mount` either serves in the foreground or forks a daemon and returns
only once the daemon reports that the mount is ready (or why it is not).
The daemon holds the store lock for as long as it serves; SIGTERM, SIGINT
and SIGHUP unmount and close the store cleanly.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from mithrilfs import access, adminsock, control
from mithrilfs.clock import clock_from
from mithrilfs.errors import UserError
from mithrilfs.eviction import default_cap
from mithrilfs.fs import Operations
from mithrilfs.index import SUPER_ROOT, Index, WalCheckpointer
from mithrilfs.layouts import LAYOUT_ROOTS, USERS_DIR, USERS_MODE
from mithrilfs.metrics import SnapshotCollector, serve_metrics
from mithrilfs.mounts import find_mount, fusermount_unmount, is_stale, set_readahead
from mithrilfs.remote import RemoteConfig
from mithrilfs.repository import INDEX_NAME, Repository
from mithrilfs.scrub import Scrubber, ScrubConfig
from mithrilfs.services import Services, build_services
from mithrilfs.stats import Snapshot, Stats, read_tree_usage
from mithrilfs.tenancy import Trust
from mithrilfs.units import format_size

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
# How soon after a commit its WAL frames are checkpointed (WalCheckpointer):
# soon enough that a burst of writes never reaches the backstop in a request.
CHECKPOINT_SECONDS = 0.1
# Per-tree usage for /metrics walks every tree: a slow pace, off the request path.
TREE_USAGE_SECONDS = 60.0
SYSLOG_SOCKET = "/dev/log"
# How often max_age is enforced.
EXPIRY_SECONDS = 60.0
# The kernel's readahead window for the mount (--readahead; mounts.py says
# why it matters): four of the largest READ requests libfuse negotiates, so a
# sequential reader keeps the daemon busy while it copies what arrived.
DEFAULT_READAHEAD = 4 << 20


@dataclass
class MountConfig:
    mountpoint: Path
    store: Path
    device_class: str
    foreground: bool = False
    allow_other: bool = False
    read_only: bool = False
    xattrs: bool = False  # user. extended attributes (--xattrs)
    log_level: str = "INFO"
    log_file: Path | None = None
    cap: int | None = None  # None: default_cap() of the store's filesystem
    max_age: float | None = None
    metrics_listen: str | None = None
    remote: RemoteConfig | None = None  # the shared tier (--remote)
    trust: Trust | None = None  # writers of the shared tree; None: root and the mounting user
    extra_fuse_options: set[str] = field(default_factory=set)
    # Test-only settings, from hidden options (docs/eviction.md): tests shorten
    # the intervals and age entries by days without waiting days.
    tree_usage_seconds: float = TREE_USAGE_SECONDS
    expiry_seconds: float = EXPIRY_SECONDS
    clock_offset_file: Path | None = None
    scrub: ScrubConfig = field(default_factory=ScrubConfig)  # --scrub-period, --scrub-rate
    readahead: int = DEFAULT_READAHEAD  # bytes (--readahead)


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mountpoint that cannot be used; clear one left stale by a dead daemon."""
    if is_stale(mountpoint):
        log.warning("%s is a stale mount (daemon gone); unmounting it", mountpoint)
        result = fusermount_unmount(mountpoint, lazy=True)
        if result.returncode != 0 or is_stale(mountpoint):
            raise UserError(
                f"{mountpoint} is a stale mount and could not be cleared: "
                f"{result.stderr.strip() or 'fusermount3 failed'}",
                1,
            )
    try:
        mode = mountpoint.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"mountpoint {mountpoint} does not exist", 2) from None
    except OSError as exc:
        raise UserError(f"cannot reach mountpoint {mountpoint}: {exc.strerror}", 2) from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"mountpoint {mountpoint} is not a directory", 2)
    existing = find_mount(mountpoint)
    if existing is not None:
        raise UserError(
            f"{mountpoint} is already a mount point ({existing.fstype} from {existing.source}); "
            "unmount it first",
            1,
        )
    if not os.access(mountpoint, os.W_OK | os.X_OK) and os.geteuid() != 0:
        raise UserError(f"mountpoint {mountpoint} is not writable by this user", 2)


def fuse_options(config: MountConfig) -> set[str]:
    options = {
        f"fsname={config.store}",
        "subtype=mithrilfs",
        # The kernel enforces modes and ownership; handlers need not.
        "default_permissions",
        "noatime",
        # Device nodes are names with attributes here, never devices.
        "nodev",
    }
    if config.allow_other:
        options.add("allow_other")
    # A read-only mount is enforced by the handlers, not by the kernel's "ro":
    # that would also refuse opening existing lock files O_RDWR, which
    # inductor does on every cache hit.
    return options | config.extra_fuse_options


def run_mount(config: MountConfig) -> int:
    check_mountpoint(config.mountpoint)
    if config.foreground:
        _setup_logging(config, daemon=False)
        serve(config, ready=lambda: None)
        return 0
    return _daemonize(config)


def serve(config: MountConfig, ready: Callable[[], None]) -> None:
    """Open the store, mount it, and serve until unmounted or signalled."""
    # mithrilfs before the admin socket asked with SIGUSR1; its default would kill us.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    repo = Repository.open(config.store)
    clean = False
    admin_socket: adminsock.Listening | None = None
    try:
        repo.recover()
        root = prepare_tree(repo.index, config.device_class)
        cap = config.cap if config.cap is not None else _default_cap(config.store)
        repo.index.limit_wal(cap)
        stats = Stats(config.device_class)
        stats.load_rows(iter(repo.index.load_counters()))
        services = build_services(
            repo.index,
            repo.content,
            root,
            stats=stats,
            cap=cap,
            max_age=config.max_age,
            remote_config=config.remote,
            trust=config.trust,
            clock=clock_from(config.clock_offset_file),
        )
        remote = services.remote
        if config.remote is not None:
            log.info("shared tier: %s", config.remote.display)
        ops = Operations(services, read_only=config.read_only, xattrs=config.xattrs)
        scrubber = Scrubber(
            services.index, services.content, stats, config.scrub, ops.drop_corrupt_object
        )
        collector = SnapshotCollector(config.device_class)
        # Publish before the first scrape or `stats`: not zeros (cap 0) for a second.
        _save_stats(services, collector)
        if config.metrics_listen:
            serve_metrics(config.metrics_listen, collector)
        # Bound before mounting: a command may ask as soon as the mount is ready.
        admin_socket = adminsock.Listening(adminsock.socket_path(config.mountpoint, os.geteuid()))
        admin = control.AdminService(
            services.evictor,
            root,
            access.authorize_by(services.trust),
            current=lambda: _save_stats(services, collector),
        )
        repo.mark_in_use()
        try:
            pyfuse3.init(ops, os.fspath(config.mountpoint), fuse_options(config))
        except RuntimeError as exc:
            raise UserError(f"cannot mount {config.mountpoint}: {exc}", 1) from None
        log.debug(
            "fuse options %s; cap %d bytes; max_age %s; metrics %s",
            ",".join(sorted(fuse_options(config))),
            cap,
            config.max_age,
            config.metrics_listen,
        )
        log.info(
            "serving store %s (class %s) at %s",
            config.store,
            config.device_class,
            config.mountpoint,
        )
        try:
            trio.run(
                _serve_until_stopped,
                ops,
                services,
                config,
                collector,
                ready,
                admin_socket,
                admin,
                scrubber,
            )
        finally:
            ops.forget_all()
            # Always detach: after a signal (or an error) the kernel still has
            # the mount, and leaving it would leave a stale mountpoint.
            # Unmounting one the kernel already dropped is harmless.
            pyfuse3.close(unmount=True)
            services.evictor.flush_recency()  # the reads of the last second count too
            _save_stats(services, collector)
            if remote is not None:
                remote.close()
        clean = True
    finally:
        if admin_socket is not None:
            admin_socket.close()
        repo.close(clean=clean)
        log.info("store %s closed %s", config.store, "cleanly" if clean else "after an error")


async def _serve_until_stopped(
    ops: Operations,
    services: Services,
    config: MountConfig,
    collector: SnapshotCollector,
    ready: Callable[[], None],
    admin_socket: adminsock.Listening,
    admin: control.AdminService,
    scrubber: Scrubber,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(_supervised, "eviction", services.evictor.run)
        nursery.start_soon(_supervised, "scrub", scrubber.run)
        nursery.start_soon(_housekeeping, ops, services, config, collector)
        index_path = services.content.root / INDEX_NAME
        nursery.start_soon(checkpoint_after_commits, services.index, index_path)
        # `mithrilfs stats` / `gc` / `evict` against this mount, and `whoami`.
        await nursery.start(adminsock.serve, admin_socket, admin.handle)
        if services.remote is not None:
            await services.remote.connect()  # bounded: a tier that is down only starts a backoff
            nursery.start_soon(_supervised, "shared tier publishing", services.remote.run)
        services.evictor.wake()  # the cap may have been lowered since the last mount
        nursery.start_soon(widen_readahead, config.mountpoint, config.readahead)
        ready()
        await pyfuse3.main()
        if services.remote is not None:
            await services.remote.drain()  # bounded: what was sealed last reaches the tier
        nursery.cancel_scope.cancel()


async def _housekeeping(
    ops: Operations, services: Services, config: MountConfig, collector: SnapshotCollector
) -> None:
    """Batched work kept off the request path: recency, expiry, counters, and
    freeing the unlinked inodes whose free failed (a busy or full index)."""
    evictor = services.evictor
    last_expiry = 0.0
    last_usage = -config.tree_usage_seconds
    while True:
        await trio.sleep(HOUSEKEEPING_SECONDS)
        if ops.unfreed and not ops.retry_frees():
            log.info("freed the inodes whose earlier free had failed")
        try:
            evictor.flush_recency()
            if trio.current_time() - last_usage > config.tree_usage_seconds:
                last_usage = trio.current_time()
                # A walk of every tree: in a thread, on a connection of its own,
                # so requests never wait for it.
                services.stats.tree_usage = await trio.to_thread.run_sync(
                    read_tree_usage, services.content.root / INDEX_NAME
                )
            if (
                evictor.max_age is not None
                and trio.current_time() - last_expiry > config.expiry_seconds
            ):
                last_expiry = trio.current_time()
                result = evictor.expire()
                if result.entries:
                    log.info("dropped %d entries not read within max_age", result.entries)
            _save_stats(services, collector)
        except (sqlite3.Error, OSError) as exc:
            # A full disk must not take the mount down; try again next round.
            log.warning("housekeeping failed, will retry: %s", exc)


async def widen_readahead(mountpoint: Path, size: int) -> None:
    """Set the mount's readahead window once the kernel has our INIT reply."""
    try:
        # Its stat of the mountpoint returns only after INIT was answered;
        # from then on the kernel leaves the window as set.
        applied = await trio.to_thread.run_sync(
            set_readahead, mountpoint, size, abandon_on_cancel=True
        )
    except PermissionError:
        log.info("readahead window left at the kernel's default: only root may set it")
    except OSError as exc:
        log.warning("readahead window left at the kernel's default: %s", exc.strerror or exc)
    else:
        log.debug("readahead window %s", format_size(applied))


async def checkpoint_after_commits(index: Index, path: Path) -> None:
    """Checkpoint the index's WAL shortly after commits, in a worker thread."""
    checkpointer = WalCheckpointer(path)
    failing = False
    try:
        seen = index.changes
        while True:
            await trio.sleep(CHECKPOINT_SECONDS)
            if index.changes == seen:
                continue
            seen = index.changes
            try:
                await trio.to_thread.run_sync(checkpointer.checkpoint)
            except sqlite3.Error as exc:
                # A full disk: tried again after the next commits (and by the
                # backstop in a commit); said once, not ten times a second.
                if not failing:
                    log.warning("checkpoint of the index failed, will retry: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("checkpoints of the index work again")
                failing = False
    finally:
        checkpointer.close()


async def _supervised(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a background task; if it fails, log it and start it again."""
    while True:
        try:
            await task()
            return
        except Exception:
            log.exception("background task %s failed; restarting it", name)
            await trio.sleep(1.0)


def _save_stats(services: Services, collector: SnapshotCollector) -> Snapshot:
    index, stats = services.index, services.stats
    stats.mark_saved()
    stats.set_gauge("logical_bytes", index.logical_bytes)
    stats.set_gauge("store_bytes", services.evictor.footprint())
    stats.set_gauge("object_bytes", index.stored_bytes)
    stats.set_gauge("objects", index.object_count)
    stats.set_gauge("entries", index.entry_count())
    stats.set_gauge("cap_bytes", services.evictor.cap)
    if services.remote is not None:
        stats.set_gauge("remote_publish_backlog", services.remote.backlog)
    index.save_counters(stats.rows(), stats.gauges)
    collector.snapshot = stats.snapshot()
    return collector.snapshot


def _default_cap(store: Path) -> int:
    backing = os.statvfs(store)
    return default_cap(backing.f_blocks * backing.f_frsize)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def prepare_tree(index: Index, device_class: str) -> int:
    """The class root this mount serves, with the layout roots and `users/` in it.

    `users/` is root's and 0711: anyone may pass through to their own tree,
    nobody but root may list whose trees exist (docs/security.md).  A store
    made before private trees existed gains it here and nothing else changes.
    """
    owner = (os.geteuid(), os.getegid())
    class_root = index.ensure_dir(SUPER_ROOT, device_class.encode(), 0o755, *owner)
    for name in LAYOUT_ROOTS:
        index.ensure_dir(class_root.id, name.encode(), 0o755, *owner)
    index.ensure_dir(class_root.id, USERS_DIR, USERS_MODE, 0, 0)
    return class_root.id


def _setup_logging(config: MountConfig, *, daemon: bool) -> None:
    """--log-file if given; else stderr in the foreground, syslog (or the store) as a daemon."""
    handler: logging.Handler | None = None
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_file is not None:
        handler = logging.FileHandler(config.log_file)
    elif not daemon:
        handler = logging.StreamHandler(sys.stderr)
    elif _syslog_listening(SYSLOG_SOCKET):
        syslog = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
        syslog.ident = "mithrilfs: "
        handler = syslog
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")  # syslog stamps
    if handler is None:
        log_path = config.store / "mithrilfs.log"
        os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        handler = logging.FileHandler(log_path)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def _syslog_listening(address: str) -> bool:
    """Whether a syslog daemon takes messages at *address* (SysLogHandler would not say)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
            except OSError:
                continue
            return True
    return False


def _daemonize(config: MountConfig) -> int:
    """Fork a daemon; return when it reports the mount ready, or its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as status:
            message = status.read().decode(errors="replace")
        if message == "ready":
            return 0
        if not message:
            os.waitpid(pid, 0)
            message = "1 the mithrilfs daemon exited before the mount was ready; see its log"
        # "<exit code> <message>": the caller sees the same exit code as in the
        # foreground (3 for a store that needs repair).
        code, _, text = message.partition(" ")
        raise UserError(text.strip(), int(code) if code.isdigit() else 1)

    # The daemon: its own session, no terminal, stdio on /dev/null.
    os.close(read_end)
    os.setsid()
    exit_code = 1
    # Once "ready" is sent the pipe is closed and its fd number may be reused
    # (an object or log file): a later failure must not be written to it.
    status_open = True
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir("/")
        try:
            # Without syslog the daemon logs into the store, so it must exist first.
            config.store.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create store {config.store}: {exc.strerror}", 2) from None
        _setup_logging(config, daemon=True)

        def report_ready() -> None:
            nonlocal status_open
            os.write(write_end, b"ready")
            os.close(write_end)
            status_open = False

        serve(config, ready=report_ready)
        exit_code = 0
    except UserError as exc:
        log.error("%s", exc)
        exit_code = exc.exit_code
        if status_open:
            _report(write_end, exc.exit_code, str(exc))
    except BaseException:
        log.exception("mithrilfs daemon failed")
        if status_open:
            _report(write_end, 1, "the mithrilfs daemon failed; see its log")
    finally:
        os._exit(exit_code)


def _report(fd: int, exit_code: int, message: str) -> None:
    try:
        os.write(fd, f"{exit_code} {message}".encode())
        os.close(fd)
    except OSError:
        pass  # the parent is gone; the failure is in the log
