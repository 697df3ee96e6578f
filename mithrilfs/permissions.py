"""POSIX ownership rules that the kernel leaves to the filesystem.

With ``default_permissions`` the kernel checks chown, chgrp, chmod, the
sticky bit and utimensat itself, and clears setuid and setgid bits by
sending a mode change (pyfuse3 3.5.0 cannot ask for FUSE_HANDLE_KILLPRIV).
What it cannot decide is the owner of a node the filesystem makes: that is
here, inside what tenancy (trees.py) allows.
"""

from __future__ import annotations

import stat

from mithrilfs.index import Inode


def inherit_from(parent: Inode, mode: int, gid: int) -> tuple[int, int]:
    """The mode and group of a new node in *parent*, given the caller's *gid*.

    A setgid directory gives its group to every new node, and its setgid bit
    to new subdirectories (ext4's rule; the kernel has already dropped a
    file's setgid bit when the caller is not in that group).
    """
    if not parent.mode & stat.S_ISGID:
        return mode, gid
    if stat.S_ISDIR(mode):
        mode |= stat.S_ISGID
    return mode, parent.gid


def without_privileges(mode: int, uid: int) -> int:
    """*mode* after an unprivileged caller truncated the file at open.

    The kernel drops setuid (and setgid with group execute) on every other
    write and truncate by sending a mode change, but not on open(O_TRUNC):
    with atomic O_TRUNC the truncation is the filesystem's, and so is this.
    Root keeps the bits (CAP_FSETID), as on ext4.
    """
    if uid == 0 or not stat.S_ISREG(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
