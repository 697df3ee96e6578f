"""What the kernel's mount table says about a path.

Used before mounting (is the mountpoint already in use, or left stale by a
daemon that died?) and by `mithrilfs umount` to find the store behind a mount.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.mithrilfs"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str = ""  # the superblock's options (FUSE: user_id=, group_id=, ...)


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
            entries.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]), options))
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
