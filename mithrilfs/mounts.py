"""What the kernel knows about a mount: its entry in the mount table, and its
readahead window.

The table is read before mounting (is the mountpoint already in use, or left
stale by a daemon that died?) and by `mithrilfs umount` to find the store
behind a mount.  The readahead window is set by the daemon once it serves.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.mithrilfs"
BDI_DIR = Path("/sys/class/bdi")
PAGE = 4096


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str = ""  # the superblock's options (FUSE: user_id=, group_id=, ...)
    device: str = ""  # major:minor of the mounted filesystem (FUSE: 0:N)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            before, _, after = line.partition(" - ")
            fields = before.split()
            rest = after.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            options = rest[2] if len(rest) > 2 else ""
            entries.append(
                MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]), options, fields[2])
            )
    return entries


def find_mount(path: Path) -> MountEntry | None:
    """The entry mounted exactly at *path* (the last one, if stacked)."""
    target = os.path.abspath(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


def is_stale(path: Path) -> bool:
    """True when *path* is a FUSE mount whose daemon is gone."""
    try:
        # statvfs always reaches the daemon; stat may be answered from the
        # kernel's attribute cache for a while after the daemon died.
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(path: Path, *, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["fusermount3", "-u"]
    if lazy:
        command.append("-z")
    return subprocess.run(
        [*command, "--", os.fspath(path)], capture_output=True, text=True, check=False
    )


# -- the readahead window ------------------------------------------------------
#
# A FUSE mount gets the kernel's default window (128 KiB) whatever the disk
# under the store uses (8 MiB on the virtio disks measured here), and each window
# is one READ request: a 256 MiB artifact read cold costs 2048 round trips to
# the daemon.  libfuse 3 lets a READ carry up to 1 MiB (max_pages 256), so a
# wider window means fewer, larger requests, and several in flight.  The
# window is a property of the mount's backing device info, in sysfs under the
# mount's anonymous device number, and only root may change it.  The kernel
# lowers it to what the daemon's INIT reply allows when it handles INIT, so it
# is set after the daemon served its first request.


def readahead_file(mountpoint: Path) -> Path:
    """The sysfs file of the window of the mithrilfs mount at *mountpoint*.

    Its device number comes from a stat of the mountpoint (a request the
    daemon answers) and must be the one the mount table gives the mithrilfs
    mount there: a root daemon writes this file, and a path changed under it
    after mounting (a parent directory swapped for a symlink) must not lead
    it to another filesystem's setting.
    """
    device = os.stat(mountpoint).st_dev
    number = f"{os.major(device)}:{os.minor(device)}"
    entry = find_mount(Path(os.path.realpath(mountpoint)))
    if entry is None or entry.fstype != FSTYPE or entry.device != number:
        raise OSError(errno.ESTALE, f"{mountpoint} no longer leads to this mithrilfs mount")
    return BDI_DIR / number / "read_ahead_kb"


def readahead(mountpoint: Path) -> int:
    """The readahead window of *mountpoint*, in bytes."""
    return int(readahead_file(mountpoint).read_text()) * 1024


def set_readahead(mountpoint: Path, size: int) -> int:
    """Set *mountpoint*'s window to *size* bytes (whole pages); return what the
    kernel now has.  OSError when it cannot be set (not root, sysfs read-only)."""
    pages = max(1, size // PAGE)
    path = readahead_file(mountpoint)
    path.write_text(f"{pages * PAGE // 1024}\n")
    return int(path.read_text()) * 1024
