"""Who a request comes from: trusted writers, and the name of a user's private tree.

The shared tree is written only by trusted writers (docs/security.md): uid 0,
the user who mounted, and the users and groups named with ``--trust``.  This
module resolves those names once, at mount, and answers "is this request
trusted?" from the request's uid, gid and the calling process's groups.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mithrilfs.errors import UserError

# mount(8) splits the option string at commas, so the fstab form of a list
# (trust=alice:@mlops) uses colons; the command line takes either.
TRUST_SEPARATORS = (",", ":")


def tree_name(uid: int) -> str:
    """The name of *uid*'s private tree: its passwd name, else the decimal uid."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
    # A name that is not one path component would name some other path.
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        return str(uid)
    return name


def primary_gid(uid: int, fallback: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return fallback


def tree_owner(name: str) -> int | None:
    """The uid whose private tree is called *name* (None: no such user)."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    if name.isdigit() and str(int(name)) == name:
        uid = int(name)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid  # a uid without a passwd entry is named by its number
    return None


def process_groups(pid: int, uid: int, gid: int) -> set[int]:
    """The groups of the process that sent a request.

    The caller is blocked in its system call while the daemon answers, so
    /proc/<pid>/status still describes it; the group database is the
    fallback when it is gone or unreadable.
    """
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    groups.update(int(part) for part in line.split()[1:])
                    return groups
    except (OSError, ValueError):
        pass
    with contextlib.suppress(KeyError, OSError):
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return groups


@dataclass(frozen=True)
class Trust:
    """The trusted writers of the shared tree."""

    uids: frozenset[int]
    gids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, spec: str | None, mounting_uid: int) -> Trust:
        """``USER|@GROUP`` items separated by commas or colons; names or numbers.

        An unknown name is refused with a one-line error (exit 2), before
        anything is mounted.
        """
        uids = {0, mounting_uid}
        gids: set[int] = set()
        text = spec or ""
        for separator in TRUST_SEPARATORS[1:]:
            text = text.replace(separator, TRUST_SEPARATORS[0])
        for item in filter(None, (part.strip() for part in text.split(TRUST_SEPARATORS[0]))):
            if item.startswith("@"):
                gids.add(_resolve(item[1:], grp.getgrnam, "gr_gid", "group"))
            else:
                uids.add(_resolve(item, pwd.getpwnam, "pw_uid", "user"))
        return cls(frozenset(uids), frozenset(gids))

    @property
    def root_only(self) -> bool:
        """Only uid 0 may write: the kernel can enforce the stored modes itself."""
        return self.uids == {0} and not self.gids

    def allows(self, uid: int, gid: int, pid: int) -> bool:
        if uid in self.uids:
            return True
        if not self.gids:
            return False
        return bool(self.gids & process_groups(pid, uid, gid))


def _resolve(name: str, lookup: Callable[[str], Any], attribute: str, kind: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        entry = lookup(name)
    except KeyError:
        raise UserError(f"--trust: no such {kind} '{name}'", 2) from None
    value: int = getattr(entry, attribute)
    return value
