"""`mithrilfs doctor`: is this node ready to serve the compiler caches?

Each check looks at one thing that goes wrong when a GPU node is set up (no
/dev/fuse in the container, a store on NFS, a mount left stale by a killed
daemon, a job shell whose cache variables point elsewhere) and says how to
fix it.  A check's outcome is ``ok``, ``warn`` (works, but probably not as
intended) or ``FAIL`` (a mount or the compilers will not work).

The checks read the machine only through `Host`, so tests run every branch
with a fake one; nothing here imports torch or triton (their versions come
from package metadata), and nothing is changed.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from mithrilfs import device, hooks
from mithrilfs.mounts import FSTYPE, MountEntry, mount_table
from mithrilfs.repository import INDEX_NAME, default_store_dir, holder_pid
from mithrilfs.units import format_size

Status = Literal["ok", "warn", "FAIL"]

FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
MIN_FREE_BYTES = 1 << 30
# mount(8) strips PATH from a helper's environment (util-linux sanitize_env),
# so mount.fuse3's "/bin/sh -c mithrilfs ..." searches the shell's default.
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# mount(8) finds mount.<type> helpers in /sbin and /usr/sbin, whatever PATH says.
MOUNT_HELPER_DIRS = "/sbin:/usr/sbin"
# Where a store's SQLite locking, rename atomicity or speed cannot be trusted.
NETWORK_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "virtiofs",
    }
)
VOLATILE_FSTYPES = frozenset({"tmpfs", "ramfs"})
# The compiler versions whose cache behaviour mithrilfs was measured against.
TESTED_VERSIONS = {"torch": "2.13", "triton": "3.9"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        return f"{text} [fix: {self.fix}]" if self.fix else text


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def warn(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, "FAIL", detail, fix)


class Host:
    """The machine as the checks see it; tests substitute a fake."""

    def euid(self) -> int:
        return os.geteuid()

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def probe_mount(self, path: str) -> None:
        """Raise what a request to the filesystem at *path* raises (ENOTCONN if stale).

        stat alone can be answered from the kernel's attribute cache after
        the daemon died; statfs always reaches the daemon.
        """
        os.stat(path)
        os.statvfs(path)

    def open_rw(self, path: str) -> None:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def which(self, name: str, path: str | None = None) -> str | None:
        return shutil.which(name, path=path)

    def read_text(self, path: str) -> str:
        return Path(path).read_text(errors="replace")

    def mounts(self) -> list[MountEntry]:
        return mount_table()

    def free_bytes(self, path: str) -> int:
        result = os.statvfs(path)
        return result.f_bavail * result.f_frsize

    def writable(self, path: str) -> bool:
        return os.access(path, os.W_OK | os.X_OK)

    def environ(self) -> Mapping[str, str]:
        return os.environ

    def version(self, distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def holder_pid(self, store: Path) -> int | None:
        return holder_pid(store)

    def device_class(self) -> str:
        return device.detect()

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def executable(self) -> str:
        """This mithrilfs's command, as mount(8) should run it."""
        return shutil.which("mithrilfs") or os.path.abspath(sys.argv[0])


@dataclass(frozen=True)
class Options:
    mountpoint: Path
    store: Path | None = None  # None: the store the mount serves, else the default
    allow_other: bool = False


def run_checks(host: Host, options: Options) -> list[Check]:
    mountpoint = Path(os.path.abspath(options.mountpoint))
    mounted = _mount_at(host, mountpoint)
    if options.store is not None:
        store = Path(os.path.abspath(options.store))
    elif mounted is not None and mounted.fstype == FSTYPE:
        store = Path(mounted.source)  # what the mount serves is what matters
    else:
        store = default_store_dir()
    checks: list[Check | None] = [
        check_fuse_device(host),
        check_fusermount(host),
        check_mount_fuse(host),
        check_mount_helper(host),
        check_allow_other(host, options.allow_other),
        check_store(host, store),
        check_store_space(host, store),
        check_mountpoint(host, mountpoint, options.store),
        check_cache_var(host, hooks.TRITON_VAR, mountpoint, "triton"),
        check_cache_var(host, hooks.INDUCTOR_VAR, mountpoint, "inductor"),
        check_cache_switches(host),
        check_package(host, "torch"),
        check_package(host, "triton"),
        check_device_class(host),
    ]
    return [check for check in checks if check is not None]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(check.status == "FAIL" for check in checks) else 0


def render_text(checks: list[Check]) -> str:
    return "".join(check.line() + "\n" for check in checks)


def render_json(checks: list[Check]) -> str:
    return json.dumps(
        {"ok": exit_code(checks) == 0, "checks": [asdict(check) for check in checks]}, indent=2
    )


# -- FUSE itself -------------------------------------------------------------------


def check_fuse_device(host: Host) -> Check:
    name = "fuse device"
    container_fix = "on the host: modprobe fuse; in a container: --device /dev/fuse"
    try:
        st = host.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return fail(name, f"{FUSE_DEVICE} does not exist", container_fix)
    except OSError as exc:
        return fail(name, f"cannot stat {FUSE_DEVICE}: {exc.strerror}", container_fix)
    if not stat.S_ISCHR(st.st_mode):
        return fail(name, f"{FUSE_DEVICE} is not a character device", "rm it, then modprobe fuse")
    try:
        host.open_rw(FUSE_DEVICE)
    except OSError as exc:
        if isinstance(exc, PermissionError) and host.euid() != 0:
            # Unprivileged mounts go through the setuid fusermount3, which
            # opens the device itself (see the fusermount3 check).
            return ok(name, f"{FUSE_DEVICE} exists; this user mounts through fusermount3")
        return fail(
            name,
            f"cannot open {FUSE_DEVICE}: {exc.strerror}",
            "in a container also --cap-add SYS_ADMIN (and an AppArmor profile that allows mount)",
        )
    return ok(name, f"{FUSE_DEVICE} is usable")


def check_fusermount(host: Host) -> Check:
    name = "fusermount3"
    path = host.which("fusermount3")
    if path is None:
        return fail(name, "not on PATH (needed to unmount)", "apt-get install fuse3")
    if host.euid() != 0:
        st = host.stat(path)
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
            return fail(
                name,
                f"{path} is not setuid root, so this user cannot mount",
                f"chmod u+s {path} (as root), or mount as root",
            )
    return ok(name, path)


def check_mount_fuse(host: Host) -> Check:
    name = "mount.fuse3"
    search = os.pathsep.join(filter(None, (host.environ().get("PATH"), MOUNT_HELPER_DIRS)))
    path = host.which("mount.fuse3", path=search)
    if path is None:
        return warn(
            name,
            "not found: 'mount -t fuse.mithrilfs' and fstab lines cannot work",
            "apt-get install fuse3",
        )
    return ok(name, path)


def check_mount_helper(host: Host) -> Check:
    name = "mount helper"
    this = host.executable()
    found = host.which("mithrilfs", path=HELPER_PATH)
    link_fix = f"ln -sf {this} /usr/local/bin/mithrilfs"
    if found is None:
        return warn(
            name,
            "mount(8) and fstab run 'mithrilfs' from the system PATH, where there is none",
            link_fix,
        )
    if host.realpath(found) != host.realpath(this):
        return warn(name, f"mount(8) would run {found}, not this mithrilfs ({this})", link_fix)
    return ok(name, f"mount(8) runs {found}")


def check_allow_other(host: Host, requested: bool) -> Check | None:
    if not requested:
        return None
    name = "allow_other"
    if host.euid() == 0:
        return ok(name, "root may mount with allow_other")
    try:
        lines = host.read_text(FUSE_CONF).splitlines()
    except OSError:
        lines = []
    if any(line.strip() == "user_allow_other" for line in lines):
        return ok(name, f"{FUSE_CONF} has user_allow_other")
    return fail(
        name,
        f"only root may use allow_other unless {FUSE_CONF} has 'user_allow_other'",
        f"echo user_allow_other >> {FUSE_CONF} (as root)",
    )


# -- the store -----------------------------------------------------------------------


def check_store(host: Host, store: Path) -> Check:
    name = "store"
    where = _existing_ancestor(host, store)
    entry = _filesystem_of(host, where)
    fstype = entry.fstype if entry is not None else "unknown"
    on = f"on {fstype}" + (f" ({entry.source})" if entry is not None else "")
    local_fix = "put the store on a local disk: --store /var/lib/mithril"
    try:
        st = host.stat(os.fspath(store))
    except FileNotFoundError:
        state = "does not exist yet (the first mount creates it)"
    except OSError as exc:
        return fail(name, f"cannot stat {store}: {exc.strerror}")
    else:
        if not stat.S_ISDIR(st.st_mode):
            return fail(name, f"{store} is not a directory", "choose another --store")
        state = _store_state(host, store)
    detail = f"{store} {on}; {state}"
    if fstype in NETWORK_FSTYPES or fstype.startswith("fuse"):
        return warn(
            name,
            f"{detail}: a network or FUSE filesystem, where SQLite locking and "
            "rename atomicity are not reliable",
            local_fix,
        )
    if fstype in VOLATILE_FSTYPES:
        return warn(name, f"{detail}: held in memory and lost at reboot", local_fix)
    if not host.writable(os.fspath(where)):
        return warn(
            name, f"{detail}; not writable by this user", "run the mount as the store's owner"
        )
    return ok(name, detail)


def _store_state(host: Host, store: Path) -> str:
    try:
        host.stat(os.fspath(store / INDEX_NAME))
    except OSError:
        return "empty (the first mount initialises it)"
    pid = host.holder_pid(store)
    return f"in use by pid {pid}" if pid is not None else "not in use"


def check_store_space(host: Host, store: Path) -> Check:
    name = "store space"
    where = _existing_ancestor(host, store)
    try:
        free = host.free_bytes(os.fspath(where))
    except OSError as exc:
        return warn(name, f"cannot tell the free space of {where}: {exc.strerror}")
    if free < MIN_FREE_BYTES:
        return warn(
            name,
            f"only {format_size(free, 'GiB')} free under {where}",
            "free space there, or move the store; keep --cap well below the free space",
        )
    return ok(name, f"{format_size(free, 'GiB')} free under {where}")


def _existing_ancestor(host: Host, path: Path) -> Path:
    for candidate in (path, *path.parents):
        try:
            host.stat(os.fspath(candidate))
            return candidate
        except OSError:
            continue
    return Path("/")


def _filesystem_of(host: Host, path: Path) -> MountEntry | None:
    """The mount that holds *path*: the longest mountpoint that is a prefix of it."""
    target = host.realpath(os.fspath(path))
    best: MountEntry | None = None
    for entry in host.mounts():
        inside = target == entry.mountpoint or target.startswith(entry.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(entry.mountpoint) >= len(best.mountpoint)):
            best = entry
    return best


# -- the mount ---------------------------------------------------------------------


def check_mountpoint(host: Host, mountpoint: Path, store: Path | None) -> Check:
    name = "mountpoint"
    try:
        host.probe_mount(os.fspath(mountpoint))
    except FileNotFoundError:
        return warn(name, f"{mountpoint} does not exist", f"mkdir -p {mountpoint}")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return fail(
                name,
                f"{mountpoint} is a stale mount: its daemon is gone "
                "(Transport endpoint is not connected)",
                f"fusermount3 -uz {mountpoint}, then mount again "
                "('mithrilfs mount' also clears it itself)",
            )
        return fail(name, f"cannot stat {mountpoint}: {exc.strerror}")
    entry = _mount_at(host, mountpoint)
    if entry is None:
        return warn(name, f"nothing is mounted at {mountpoint}", f"mithrilfs mount {mountpoint}")
    if entry.fstype != FSTYPE:
        return fail(
            name,
            f"{mountpoint} is a {entry.fstype} mount of {entry.source}, not mithrilfs",
            "unmount it, or choose another mountpoint",
        )
    served = Path(entry.source)
    if store is not None and os.path.abspath(store) != os.path.abspath(served):
        return warn(
            name,
            f"{mountpoint} serves store {served}, not {store}",
            f"drop --store, or mount {store} elsewhere",
        )
    pid = host.holder_pid(served)
    daemon = f"daemon pid {pid}" if pid is not None else "its daemon's pid is not visible here"
    return ok(name, f"mithrilfs serves {served} at {mountpoint} ({daemon})")


def _mount_at(host: Host, mountpoint: Path) -> MountEntry | None:
    found = None
    for entry in host.mounts():
        if entry.mountpoint == os.fspath(mountpoint):
            found = entry  # the last one is on top
    return found


# -- the job environment -------------------------------------------------------------


def check_cache_var(host: Host, variable: str, mountpoint: Path, layout: str) -> Check:
    expected = os.fspath(mountpoint / layout)
    # The caller's own tree is as right as the shared one (docs/security.md).
    own = os.path.join(hooks.tree_root(os.fspath(mountpoint), "private"), layout)
    fix = f'eval "$(mithrilfs env {mountpoint})"'
    value = host.environ().get(variable)
    if not value:
        return warn(
            variable, "unset in this shell: the compiler caches in /tmp or ~, not the mount", fix
        )
    path = os.path.normpath(os.path.abspath(value))
    if any(path == root or path.startswith(root + "/") for root in (expected, own)):
        return ok(variable, f"{value} is in the mount")
    if path.startswith(os.fspath(mountpoint) + "/"):
        return warn(variable, f"{value} is in the mount but not under {layout}/", fix)
    return warn(variable, f"{value} is outside the mount {mountpoint}", fix)


# Environment switches that make the compilers bypass their on-disk caches.
_CACHE_OFF: Mapping[str, Callable[[str], bool]] = {
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES": lambda value: value == "1",
    "TORCHINDUCTOR_FX_GRAPH_CACHE": lambda value: value == "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": lambda value: value == "0",
    "TRITON_ALWAYS_COMPILE": lambda value: value == "1",
}


def check_cache_switches(host: Host) -> Check:
    name = "cache switches"
    environ = host.environ()
    off = [
        f"{key}={environ[key]}"
        for key, is_off in _CACHE_OFF.items()
        if is_off(environ.get(key, ""))
    ]
    if off:
        return warn(
            name,
            f"{', '.join(off)}: the compilers skip the cache",
            "unset " + " ".join(item.split("=")[0] for item in off),
        )
    return ok(name, "no variable turns the compiler caches off")


def check_package(host: Host, distribution: str) -> Check:
    found = host.version(distribution)
    where = f"in {sys.executable}"
    if found is None:
        return warn(
            distribution,
            f"not installed {where}; jobs that use another Python are not checked",
        )
    tested = TESTED_VERSIONS.get(distribution)
    if tested is not None and not (found == tested or found.startswith(tested + ".")):
        return warn(
            distribution,
            f"{found} {where}; mithrilfs was tested with {tested}.x",
            "check its cache layout with a test compile through the mount",
        )
    return ok(distribution, f"{found} {where}")


def check_device_class(host: Host) -> Check:
    name = "device class"
    try:
        detected = host.device_class()
    except device.DeviceClassError as exc:
        return fail(
            name,
            str(exc),
            "name it: mithrilfs mount --device-class NAME (fstab: device_class=NAME)",
        )
    return ok(name, f"{detected} (a mount with --device-class auto serves this tree)")
