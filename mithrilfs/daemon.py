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
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from mithrilfs.errors import UserError
from mithrilfs.fs import Operations
from mithrilfs.index import SUPER_ROOT
from mithrilfs.layouts import LAYOUT_ROOTS
from mithrilfs.mounts import find_mount, fusermount_unmount, is_stale
from mithrilfs.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    mountpoint: Path
    store: Path
    device_class: str
    foreground: bool = False
    allow_other: bool = False
    read_only: bool = False
    log_level: str = "INFO"
    log_file: Path | None = None
    extra_fuse_options: set[str] = field(default_factory=set)


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
    if not mountpoint.exists():
        raise UserError(f"mountpoint {mountpoint} does not exist", 2)
    if not mountpoint.is_dir():
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
    }
    if config.allow_other:
        options.add("allow_other")
    if config.read_only:
        options.add("ro")
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
    repo = Repository.open(config.store)
    clean = False
    try:
        repo.recover()
        root = _prepare_tree(repo, config)
        ops = Operations(repo.index, repo.content, root, read_only=config.read_only)
        repo.mark_in_use()
        try:
            pyfuse3.init(ops, os.fspath(config.mountpoint), fuse_options(config))
        except RuntimeError as exc:
            raise UserError(f"cannot mount {config.mountpoint}: {exc}", 1) from None
        log.info(
            "serving store %s (class %s) at %s",
            config.store,
            config.device_class,
            config.mountpoint,
        )
        unmounted = False
        try:
            trio.run(_serve_until_stopped, ready)
            unmounted = True
        finally:
            ops.forget_all()
            pyfuse3.close(unmount=not unmounted)
        clean = True
    finally:
        repo.close(clean=clean)
        log.info("store %s closed %s", config.store, "cleanly" if clean else "after an error")


async def _serve_until_stopped(ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _prepare_tree(repo: Repository, config: MountConfig) -> int:
    """The class root this mount serves, with the layout roots in it."""
    index = repo.index
    owner = (os.geteuid(), os.getegid())
    class_root = index.ensure_dir(SUPER_ROOT, config.device_class.encode(), 0o755, *owner)
    for name in LAYOUT_ROOTS:
        index.ensure_dir(class_root.id, name.encode(), 0o755, *owner)
    return class_root.id


def _setup_logging(config: MountConfig, *, daemon: bool) -> None:
    handler: logging.Handler
    if config.log_file is not None:
        handler = logging.FileHandler(config.log_file)
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.ident = "mithrilfs: "
    elif daemon:
        handler = logging.FileHandler(config.store / "mithrilfs.log")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


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
