"""The `mithrilfs` command line.

Exit codes: 0 success; 1 the operation failed (or fsck found problems);
2 bad usage or input; 3 the store needs repair.  Failures print one line on
stderr, never a traceback.

Besides the subcommands, mount(8) calls helpers as
``mithrilfs STORE MOUNTPOINT -o OPTIONS`` (through mount.fuse3, for
``mount -t fuse.mithrilfs`` and fstab lines); that form is accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mithrilfs import __version__, control, device, fsck, hooks
from mithrilfs.clock import clock_from
from mithrilfs.errors import UserError
from mithrilfs.eviction import check_path_pattern
from mithrilfs.metrics import parse_listen
from mithrilfs.mounts import FSTYPE, find_mount, fusermount_unmount
from mithrilfs.repository import (
    Repository,
    default_store_dir,
    holder_pid,
    store_in_use,
)
from mithrilfs.tenancy import Trust
from mithrilfs.units import parse_duration, parse_size

if TYPE_CHECKING:
    from mithrilfs.remote import RemoteConfig
    from mithrilfs.scrub import ScrubConfig

T = TypeVar("T")
# What pyproject.toml's `daemon` extra installs (mount, import, export import
# them when they run): a job's environment has only the base distribution.
_DAEMON_EXTRA_MODULES = frozenset({"pyfuse3", "redis", "zstandard"})
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
DEFAULT_MOUNTPOINT = Path(hooks.DEFAULT_MOUNT)
# --readahead: at least a page; at most what a sane reader would want in flight.
READAHEAD_MIN = 4 << 10
READAHEAD_MAX = 256 << 20

# Options that mount(8) and fstab pass along and that mean nothing here.
_IGNORED_MOUNT_OPTIONS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "_netdev",
        "nofail",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "rw",
        "async",
        "atime",
        "noatime",
        "relatime",
        "nodiratime",
    }
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if _is_helper_form(args, _subcommands(parser)):
        args = _helper_form(args)
    options = parser.parse_args(args)
    if not hasattr(options, "command"):
        parser.print_help()
        return 2
    try:
        return int(options.command(options))
    except UserError as exc:
        print(f"mithrilfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`mithrilfs stats | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if isinstance(exc, ModuleNotFoundError) and exc.name in _DAEMON_EXTRA_MODULES:
            command = options.command.__name__.removeprefix("_cmd_")
            print(
                f"mithrilfs: {command} needs the daemon's packages (no module {exc.name}): "
                "pip install 'mithrilfs[daemon]'",
                file=sys.stderr,
            )
            return 2
        if os.environ.get("MITHRILFS_DEBUG"):
            raise
        print(
            f"mithrilfs: internal error: {type(exc).__name__}: {exc} "
            "(set MITHRILFS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _is_helper_form(args: list[str], subcommands: set[str]) -> bool:
    """mount.fuse3 passes a store path, a mountpoint, then options; a mistyped
    command with two arguments must still get argparse's 'invalid choice'."""
    if len(args) < 2 or args[0] in subcommands or args[0].startswith("-"):
        return False
    return "/" in args[0] or args[2:3] == ["-o"]


def _helper_form(args: list[str]) -> list[str]:
    """Turn ``STORE MOUNTPOINT [-o OPTS]`` (mount.fuse3) into a mount command line."""
    store, mountpoint, *rest = args
    return ["mount", mountpoint, "--store", store, *rest]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mithrilfs",
        description="A content-addressed, size-capped FUSE filesystem for the Triton and "
        "PyTorch inductor compiler caches.",
        epilog="Typical use: 'mithrilfs mount /var/cache/mithril', then "
        "'eval \"$(mithrilfs env /var/cache/mithril)\"' in job scripts.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    mount = sub.add_parser(
        "mount",
        help="mount a store (daemonizes once the mount is ready)",
        description="Mount the store at MOUNTPOINT. Returns once the mount serves requests; "
        "--foreground keeps the daemon attached (systemd, tests).",
    )
    mount.add_argument(
        "mountpoint",
        type=Path,
        nargs="?",
        default=DEFAULT_MOUNTPOINT,
        help=f"where to mount (default {DEFAULT_MOUNTPOINT})",
    )
    _store_argument(mount)
    mount.add_argument(
        "--device-class",
        default="auto",
        help="tree to serve: auto (detect this node's accelerator) or a name "
        "such as cuda-sm90, rocm-gfx942, cpu-x86_64-avx2 (default auto)",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached and log to stderr"
    )
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let users other than the one mounting use the mount",
    )
    mount.add_argument(
        "--read-only", action="store_true", help="serve hits but refuse every write with EROFS"
    )
    mount.add_argument(
        "--xattrs",
        action="store_true",
        help="keep extended attributes in the user. namespace (costs one more request "
        "per write: the kernel then asks for security.capability on every write)",
    )
    mount.add_argument(
        "--cap",
        metavar="SIZE",
        help="the store's size cap, e.g. 500M, 50G, 1T (default: 10%% of the store's "
        "filesystem, between 1G and 100G); least recently read entries are evicted "
        "to stay under it",
    )
    mount.add_argument(
        "--max-age",
        metavar="DURATION",
        help="also drop entries not read for this long, e.g. 7d, 12h",
    )
    mount.add_argument(
        "--scrub-period",
        metavar="DURATION",
        help="re-verify every stored object in the background once per DURATION, "
        "e.g. 7d (the default), 12h",
    )
    mount.add_argument(
        "--scrub-rate",
        metavar="SIZE",
        help="the background scrub reads at most SIZE bytes per second, e.g. 32M "
        "(the default); 0 turns it off",
    )
    mount.add_argument(
        "--readahead",
        metavar="SIZE",
        help="how far the kernel reads ahead of a sequential reader, e.g. 1M; wider "
        "means fewer, larger requests for big artifacts (default 4M, set only when "
        "the daemon runs as root; between 4K and 256M)",
    )
    mount.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    mount.add_argument(
        "--remote",
        metavar="URL",
        help="share entries with other nodes of this device class through Redis/Valkey: "
        "redis://HOST:PORT/DB, rediss://... (TLS), redis+cluster://HOST:PORT (Redis "
        "Cluster; or ?cluster=1); see docs/remote.md",
    )
    mount.add_argument(
        "--remote-password-file",
        metavar="FILE",
        help="the shared tier's password, read from FILE (which must not be readable by "
        "group or others); or set MITHRILFS_REMOTE_PASSWORD. Never put it in the URL",
    )
    mount.add_argument(
        "--remote-timeout",
        metavar="SECONDS",
        help="time a lookup may wait for the shared tier before answering locally "
        "(default 0.2; plus fetch time for large entries)",
    )
    mount.add_argument(
        "--trust",
        metavar="USER|@GROUP,...",
        help="who besides root and the mounting user may write the shared tree "
        "(MOUNT/triton, MOUNT/inductor): user and @group names, separated by commas "
        "or colons (fstab: trust=alice:@mlops); everyone else writes only their own "
        "tree, MOUNT/users/NAME (docs/security.md)",
    )
    mount.add_argument(
        "-o",
        dest="mount_options",
        default="",
        help="comma-separated mount options: allow_other, ro, "
        "device_class=NAME, store=DIR, log_level=LEVEL, remote=URL, "
        "remote_timeout=SECONDS, remote_password_file=FILE, trust=USER:@GROUP, "
        "scrub_period=DURATION, scrub_rate=SIZE, readahead=SIZE (fstab form)",
    )
    mount.add_argument(
        "--log-level",
        default="INFO",
        choices=_LOG_LEVELS,
        help="logging threshold (default INFO)",
    )
    mount.add_argument(
        "--log-file", type=Path, help="log here instead of stderr (foreground) or syslog (daemon)"
    )
    # Test-only and hidden (docs/eviction.md): read once, at startup.
    _clock_offset_argument(mount)
    mount.add_argument("--expiry-interval", type=float, help=argparse.SUPPRESS)
    mount.add_argument("--tree-usage-interval", type=float, help=argparse.SUPPRESS)
    mount.set_defaults(command=_cmd_mount)

    for name in ("umount", "unmount"):
        umount = sub.add_parser(
            name,
            help="unmount and wait for the daemon to close the store",
            description="Unmount MOUNTPOINT and wait until its daemon has closed the store.",
        )
        umount.add_argument("mountpoint", type=Path)
        umount.add_argument(
            "--lazy",
            action="store_true",
            help="detach now even if files are still open (umount -l)",
        )
        umount.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="seconds to wait for the daemon to exit (default 60)",
        )
        umount.set_defaults(command=_cmd_umount)

    check = sub.add_parser(
        "fsck",
        help="check (and repair) a store's invariants",
        description="Check every invariant of an unmounted store. Exits 0 when clean, "
        "1 when problems remain.",
    )
    _store_argument(check)
    check.add_argument("--repair", action="store_true", help="fix what is found")
    check.add_argument(
        "--quick",
        action="store_true",
        help="check that objects exist but do not re-hash their bytes",
    )
    check.add_argument("--json", action="store_true", help="print a JSON report")
    check.set_defaults(command=_cmd_fsck)

    env = sub.add_parser(
        "env",
        help="print the export lines that point the compilers at a mount",
        description="Print shell export lines for TRITON_CACHE_DIR and "
        "TORCHINDUCTOR_CACHE_DIR in the caller's tree; use as: "
        'eval "$(mithrilfs env MOUNTPOINT)"',
    )
    env.add_argument(
        "mountpoint",
        type=Path,
        nargs="?",
        default=None,
        help=f"the mount (default $MITHRILFS_MOUNT or {DEFAULT_MOUNTPOINT})",
    )
    env.add_argument(
        "--tree",
        choices=hooks.TREES,
        default=None,
        help="shared: MOUNT/{triton,inductor} (trusted pre-warm jobs); private: "
        "MOUNT/users/NAME/{triton,inductor}. Default: shared for root and the mount's "
        "owner, private for everyone else (or $MITHRILFS_TREE)",
    )
    env.set_defaults(command=_cmd_env)

    classes = sub.add_parser("classes", help="list the device classes in a store")
    _store_argument(classes)
    classes.add_argument("--json", action="store_true", help="print JSON")
    classes.set_defaults(command=_cmd_classes)

    _add_operations_parsers(sub)
    _add_eviction_parsers(sub)

    stats = sub.add_parser(
        "stats",
        help="hit rate, dedup, usage against the cap, evictions",
        description="Show a store's counters and gauges: from a mount (MOUNTPOINT, asked "
        "of its daemon; a user who is not trusted sees their own tree only) or a store "
        "directory (--store). Values are saved by the daemon every second; reading them "
        "never disturbs it.",
    )
    stats.add_argument(
        "mountpoint",
        type=Path,
        nargs="?",
        default=None,
        help="a mithrilfs mount (default: the store given by --store)",
    )
    _store_argument(stats)
    stats.add_argument("--json", action="store_true", help="print the stable JSON form")
    stats.set_defaults(command=_cmd_stats)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(command=lambda _options: print(f"mithrilfs {__version__}") or 0)
    return parser


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", type=Path, default=None, help=f"store directory (default {default_store_dir()})"
    )


def _store(options: argparse.Namespace) -> Path:
    return Path(options.store if options.store is not None else default_store_dir()).absolute()


# -- mount ---------------------------------------------------------------------


def _cmd_mount(options: argparse.Namespace) -> int:
    # imports pyfuse3: only when mounting
    from mithrilfs.daemon import DEFAULT_READAHEAD, MountConfig, run_mount

    settings = _parse_mount_options(options.mount_options)
    store = Path(settings.pop("store", "") or _store(options)).absolute()
    requested_class = settings.pop("device_class", options.device_class)
    try:
        device_class = device.resolve(requested_class)
    except device.DeviceClassError as exc:
        raise UserError(str(exc), 2) from None
    config = MountConfig(
        mountpoint=options.mountpoint.absolute(),
        store=store,
        device_class=device_class,
        foreground=options.foreground or "foreground" in settings,
        allow_other=options.allow_other or "allow_other" in settings,
        read_only=options.read_only or "ro" in settings,
        xattrs=options.xattrs or "xattrs" in settings,
        log_level=_log_level(settings.get("log_level", options.log_level)),
        # Absolute: the daemon changes to / before it opens the file.
        log_file=options.log_file.absolute() if options.log_file else None,
        cap=_optional(settings.get("cap", options.cap), parse_size),
        max_age=_optional(settings.get("max_age", options.max_age), parse_duration),
        metrics_listen=settings.get("metrics_listen", options.metrics_listen),
        remote=_remote(settings, options),
        trust=Trust.parse(settings.get("trust", options.trust), os.geteuid()),
        clock_offset_file=options.clock_offset_file,
        scrub=_scrub(settings, options),
        readahead=_readahead(settings.get("readahead", options.readahead), DEFAULT_READAHEAD),
    )
    if options.expiry_interval is not None:
        config.expiry_seconds = options.expiry_interval
    if options.tree_usage_interval is not None:
        config.tree_usage_seconds = options.tree_usage_interval
    if config.metrics_listen:
        parse_listen(config.metrics_listen)  # refuse a bad address before mounting
    return run_mount(config)


def _remote(settings: dict[str, str], options: argparse.Namespace) -> RemoteConfig | None:
    from mithrilfs.remote import PASSWORD_ENV, parse_remote, parse_timeout, read_password_file

    url = settings.get("remote", options.remote)
    timeout = _optional(settings.get("remote_timeout", options.remote_timeout), parse_timeout)
    password_file = settings.get("remote_password_file", options.remote_password_file)
    # Read once, here, and kept out of the environment the daemon passes on.
    password = os.environ.pop(PASSWORD_ENV, None) or None
    if url is None:
        if timeout is not None or password_file is not None:
            raise UserError("--remote-timeout and --remote-password-file need --remote", 2)
        return None
    config = parse_remote(url, timeout)
    if password_file is not None:
        password = read_password_file(Path(password_file))
    return dataclasses.replace(config, password=password) if password else config


def _scrub(settings: dict[str, str], options: argparse.Namespace) -> ScrubConfig:
    from mithrilfs.scrub import DEFAULT_PERIOD, DEFAULT_RATE, ScrubConfig

    period = _optional(settings.get("scrub_period", options.scrub_period), parse_duration)
    rate = _optional(settings.get("scrub_rate", options.scrub_rate), _scrub_rate)
    if period is not None and period <= 0:
        raise UserError("--scrub-period must be longer than 0 (--scrub-rate 0 turns it off)", 2)
    return ScrubConfig(
        period=DEFAULT_PERIOD if period is None else period,
        rate=DEFAULT_RATE if rate is None else rate,
    )


def _readahead(text: str | None, default: int) -> int:
    if text is None:
        return default
    size = parse_size(text)
    if not READAHEAD_MIN <= size <= READAHEAD_MAX:
        raise UserError(f"invalid readahead '{text}': must be between 4K and 256M", 2)
    return size


def _scrub_rate(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise UserError(f"invalid log level '{text}': expected one of {', '.join(_LOG_LEVELS)}", 2)
    return level


def _optional(text: str | None, parse: Callable[[str], T]) -> T | None:
    return None if text is None else parse(text)


def _parse_mount_options(text: str) -> dict[str, str]:
    known_flags = {"allow_other", "ro", "foreground", "xattrs"}
    known_values = {
        "device_class",
        "store",
        "log_level",
        "cap",
        "max_age",
        "metrics_listen",
        "remote",
        "remote_timeout",
        "remote_password_file",
        "trust",
        "scrub_period",
        "scrub_rate",
        "readahead",
    }
    settings: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = item.partition("=")
        if key in _IGNORED_MOUNT_OPTIONS or key.startswith("x-"):
            continue
        if key in known_flags and not has_value:
            settings[key] = ""
        elif key in known_values and has_value and value:
            settings[key] = value
        else:
            raise UserError(f"unknown or malformed mount option '{item}'", 2)
    return settings


def _cmd_umount(options: argparse.Namespace) -> int:
    mountpoint = options.mountpoint.absolute()
    entry = find_mount(mountpoint)
    if entry is None:
        raise UserError(f"{mountpoint} is not mounted", 1)
    if entry.fstype != FSTYPE:
        raise UserError(f"{mountpoint} is not a mithrilfs mount ({entry.fstype})", 1)
    store = Path(entry.source)
    pid = holder_pid(store)
    result = fusermount_unmount(mountpoint, lazy=options.lazy)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        if "busy" in reason.lower():
            raise UserError(
                f"{mountpoint} is busy: files are still open there "
                "(see 'fuser -vm'; or pass --lazy)",
                1,
            )
        raise UserError(f"cannot unmount {mountpoint}: {reason or 'fusermount3 failed'}", 1)
    if pid is not None and not _wait_for_store_release(store, options.timeout):
        raise UserError(
            f"unmounted {mountpoint}, but daemon pid {pid} has not closed the "
            f"store after {options.timeout:.0f}s",
            1,
        )
    return 0


def _wait_for_store_release(store: Path, timeout: float) -> bool:
    """Poll the store lock until the daemon lets go of it, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while store_in_use(store):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- offline store commands ------------------------------------------------------


def _cmd_fsck(options: argparse.Namespace) -> int:
    store = _store(options)
    repo = Repository.open(store, create=False)
    verify = not options.quick
    try:
        from mithrilfs.progress import Progress  # tqdm: only for the commands that show progress

        shown = Progress("fsck: checking objects")
        first = report = fsck.check(
            repo.index, repo.content, verify_hashes=verify, progress=shown.update_to
        )
        shown.finish()
        found = len(report.problems)
        if options.repair and found:
            fsck.repair(report)
            report = fsck.check(repo.index, repo.content, verify_hashes=verify)
    finally:
        repo.close()
    repaired = [p for p in first.problems if p.repaired] if options.repair else []
    if options.json:
        print(
            json.dumps(
                {
                    "store": str(store),
                    "clean": report.clean,
                    "found": found,
                    "repaired": [{"kind": p.kind, "detail": p.detail} for p in repaired],
                    "problems": [{"kind": p.kind, "detail": p.detail} for p in report.problems],
                    "objects_checked": report.objects_checked,
                    "inodes_checked": report.inodes_checked,
                },
                indent=2,
            )
        )
    else:
        for problem in repaired:
            print(f"repaired {problem.kind}: {problem.detail}")
        for problem in report.problems:
            print(f"{problem.kind}: {problem.detail}")
        if options.repair and found:
            print(f"{store}: repaired {found - len(report.problems)} of {found} problems")
        status = "clean" if report.clean else f"{len(report.problems)} problems"
        print(
            f"{store}: {status} ({report.objects_checked} objects, "
            f"{report.inodes_checked} inodes checked)"
        )
    return 0 if report.clean else 1


def _cmd_stats(options: argparse.Namespace) -> int:
    from mithrilfs import adminsock, stats
    from mithrilfs.repository import INDEX_NAME

    if options.mountpoint is not None:
        # Through the daemon, for everyone: it knows who asks (the store is root's).
        mountpoint = options.mountpoint.absolute()
        entry = find_mount(mountpoint)
        if entry is None or entry.fstype != FSTYPE:
            raise UserError(f"{mountpoint} is not a mithrilfs mount", 1)
        store = Path(entry.source)
        summary = adminsock.ask(mountpoint, "stats", wait=control.DEFAULT_TIMEOUT)
    else:
        store = _store(options)
        index_path = store / INDEX_NAME
        if not index_path.exists():
            raise UserError(f"{store} is not a mithrilfs store (no {INDEX_NAME})", 2)
        try:
            summary = {"tree": "", **stats.summarize(stats.read_saved(index_path))}
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot read {index_path}: {exc}", 3) from None
    summary = {"store": str(store), **summary}
    if options.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        head = f"store         {store}\n"
        if summary["tree"]:
            head += f"tree          {summary['tree']} (yours; the rest of the store is not shown)\n"
        sys.stdout.write(head + stats.render_text(summary))
    return 0


def _cmd_env(options: argparse.Namespace) -> int:
    mountpoint = options.mountpoint or Path(os.environ.get("MITHRILFS_MOUNT") or DEFAULT_MOUNTPOINT)
    try:
        lines = hooks.env_lines(os.fspath(mountpoint.absolute()), options.tree)
    except hooks.UnknownTree as exc:
        raise UserError(f"{exc} (from --tree or ${hooks.TREE_ENV})", 2) from None
    sys.stdout.write(lines)
    return 0


def _cmd_classes(options: argparse.Namespace) -> int:
    from mithrilfs.classes import class_usage

    repo = Repository.open(_store(options), create=False)
    try:
        usage = class_usage(repo.index)
    finally:
        repo.close()
    if options.json:
        print(json.dumps([u.__dict__ for u in usage], indent=2))
    else:
        print(f"{'CLASS':<24} {'FILES':>10} {'BYTES':>14}")
        for u in usage:
            print(f"{u.name:<24} {u.files:>10} {u.bytes:>14}")
    return 0


# -- eviction on demand: gc, evict (offline, or through the serving daemon) ---------


def _add_eviction_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = sub.add_parser(
        "gc",
        help="evict least recently read entries now, down to a size",
        description="Evict the least recently read cache entries, whole, until the store "
        "uses at most SIZE (default: the low watermark, 90% of the cap it was last mounted "
        "with). Works on an unmounted store, and on a mounted one through its daemon.",
    )
    _mount_argument(gc)
    _store_argument(gc)
    gc.add_argument("--to", metavar="SIZE", help="usage to get down to, e.g. 500M or 20G")
    _eviction_common(gc, control.DEFAULT_TIMEOUT)
    gc.set_defaults(command=_cmd_gc)

    evict = sub.add_parser(
        "evict",
        help="remove chosen cache entries (by age, device class, path)",
        description="Remove every cache entry that matches all the criteria given, whole "
        "(a Triton kernel directory, an inductor entry). Works on an unmounted store, and "
        "on a mounted one through its daemon, which also tells the kernel. A user who "
        "is not trusted may evict only below users/NAME/ of a mount.",
    )
    _mount_argument(evict)
    _store_argument(evict)
    evict.add_argument(
        "--older-than", metavar="DURATION", help="entries not read for this long, e.g. 7d, 12h"
    )
    evict.add_argument(
        "--device-class", metavar="CLASS", help="entries of this class tree, e.g. cuda-sm80"
    )
    evict.add_argument(
        "--path",
        metavar="GLOB",
        help="entries whose path (or a file's path) below the class root matches, "
        "e.g. 'triton/*' after a Triton upgrade (fnmatch: * also crosses /)",
    )
    _eviction_common(evict, control.DEFAULT_TIMEOUT)
    evict.set_defaults(command=_cmd_evict)


def _mount_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mountpoint",
        type=Path,
        nargs="?",
        default=None,
        help="a mithrilfs mount: ask its daemon (default: the store given by --store)",
    )


def _clock_offset_argument(parser: argparse.ArgumentParser) -> None:
    """Tests only: seconds in FILE are added to the clock that recency and ages use."""
    parser.add_argument(
        "--clock-offset-file",
        type=lambda text: Path(text).absolute(),  # the daemon changes to / first
        help=argparse.SUPPRESS,
    )


def _eviction_common(parser: argparse.ArgumentParser, timeout: float) -> None:
    _clock_offset_argument(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would go and the bytes freed"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds to wait for a serving daemon's answer (default {timeout:g})",
    )


def _cmd_gc(options: argparse.Namespace) -> int:
    request = control.Request("gc", to=_optional(options.to, parse_size), dry_run=options.dry_run)
    return _run_eviction(options, request)


def _cmd_evict(options: argparse.Namespace) -> int:
    request = control.Request(
        "evict",
        older_than=_optional(options.older_than, parse_duration),
        device_class=options.device_class,
        path=_optional(options.path, check_path_pattern),
        dry_run=options.dry_run,
    )
    return _run_eviction(options, request)


def _run_eviction(options: argparse.Namespace, request: control.Request) -> int:
    if options.mountpoint is not None:
        if options.store is not None:
            raise UserError("give a mountpoint or --store, not both", 2)
        outcome = control.perform_on_mount(
            options.mountpoint.absolute(), request, timeout=options.timeout
        )
    else:
        outcome = control.perform(
            _store(options),
            request,
            timeout=options.timeout,
            clock=clock_from(options.clock_offset_file),
        )
    if options.json:
        print(outcome.to_json())
    else:
        sys.stdout.write(control.render_text(outcome))
    return 0


# -- operations: doctor, import, export ---------------------------------------------


def _add_operations_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check that this node can serve the compiler caches",
        description="Check FUSE, the store's filesystem, the mount, the job environment "
        "and the compilers. One line per check: ok, warn or FAIL, with a fix. "
        "Exits 1 when a check fails.",
    )
    doctor.add_argument(
        "--mountpoint",
        type=Path,
        default=None,
        help=f"the mount to check (default $MITHRILFS_MOUNT or {DEFAULT_MOUNTPOINT})",
    )
    _store_argument(doctor)
    doctor.add_argument(
        "--allow-other", action="store_true", help="also check that allow_other is permitted"
    )
    doctor.add_argument("--json", action="store_true", help="print a JSON report")
    doctor.set_defaults(command=_cmd_doctor)

    source = sub.add_parser(
        "import",
        help="bring a cache directory or an export into a store (offline)",
        description="Import SRC into the store: a cache directory (with --layout) goes to "
        "<class>/<layout>/, a .tar.zst export to its class. Content is deduplicated; "
        "files already present with the same content are left alone, different content "
        "is replaced. The store must not be mounted.",
    )
    source.add_argument("source", type=Path, metavar="SRC", help="directory or .tar.zst export")
    source.add_argument("--layout", help="triton or inductor (directory imports)")
    _store_argument(source)
    source.add_argument(
        "--device-class",
        default=None,
        help="class to import into (default: auto for directories, the archive's own class "
        "for exports)",
    )
    source.set_defaults(command=_cmd_import)

    export = sub.add_parser(
        "export",
        help="write a device class's tree to a .tar.zst (offline)",
        description="Stream a class's tree into a zstd-compressed PAX tar that "
        "'mithrilfs import' brings into another store. The store must not be mounted.",
    )
    export.add_argument(
        "--device-class", default="auto", help="class to export (default: this node's)"
    )
    export.add_argument(
        "-o", "--output", type=Path, required=True, help="FILE.tar.zst, or - for stdout"
    )
    export.add_argument(
        "--special-nodes",
        action="store_true",
        help="also write FIFOs and device nodes (tar's own types; sockets are always left out)",
    )
    _store_argument(export)
    export.set_defaults(command=_cmd_export)


def _cmd_doctor(options: argparse.Namespace) -> int:
    from mithrilfs import doctor

    mountpoint = options.mountpoint or Path(os.environ.get("MITHRILFS_MOUNT") or DEFAULT_MOUNTPOINT)
    checks = doctor.run_checks(
        doctor.Host(), doctor.Options(mountpoint, options.store, options.allow_other)
    )
    if options.json:
        print(doctor.render_json(checks))
    else:
        sys.stdout.write(doctor.render_text(checks))
    return doctor.exit_code(checks)


def _cmd_import(options: argparse.Namespace) -> int:
    from mithrilfs import transfer

    source: Path = options.source
    if not source.exists():
        raise UserError(f"{source} does not exist", 2)
    if source.is_file() and transfer.is_archive(source):
        if options.layout:
            raise UserError("--layout applies to directory imports, not to exports", 2)
        report = transfer.import_archive(_store(options), source, options.device_class)
    else:
        report = transfer.import_directory(
            _store(options), source, options.layout, options.device_class
        )
    print(report.summary())
    return 0


def _cmd_export(options: argparse.Namespace) -> int:
    from mithrilfs import transfer

    report = transfer.export_class(
        _store(options),
        options.device_class,
        options.output,
        special_nodes=options.special_nodes,
    )
    # stdout may be the archive itself.
    print(report.summary(), file=sys.stderr if str(options.output) == "-" else sys.stdout)
    return 0
