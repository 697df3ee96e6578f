"""Who may do what through the admin socket: a caller's scope.

A caller's scope is either every tree (root, the daemon's own user, trusted
writers) or one private tree, ``users/<name>`` below each class root, where
the name is the caller's passwd name, or the decimal uid where there is none.
The daemon asks an `Authorize` callable for the scope of each connection's
peer (SO_PEERCRED); `default_authorize` trusts uid 0 and the daemon's own uid
only.  A trust list (``--trust``) plugs in as another `Authorize`.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable
from dataclasses import dataclass

USERS_DIR = "users"


@dataclass(frozen=True)
class Scope:
    """Every tree (``tree`` None) or the one private tree named ``tree``."""

    tree: str | None = None

    @property
    def trusted(self) -> bool:
        return self.tree is None

    @property
    def path(self) -> str:
        """The caller's tree relative to the mount root ('' for the whole mount)."""
        return "" if self.tree is None else f"{USERS_DIR}/{self.tree}"


EVERYTHING = Scope()

# (uid, gid, pid) of the caller -> its scope.
Authorize = Callable[[int, int, int], Scope]


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


def default_authorize(daemon_uid: int) -> Authorize:
    """Root and the daemon's own user may do anything; anyone else has their own tree."""

    def authorize(uid: int, _gid: int, _pid: int) -> Scope:
        if uid in (0, daemon_uid):
            return EVERYTHING
        return Scope(tree_name(uid))

    return authorize
