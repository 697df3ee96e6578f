"""Who may do what through the admin socket: a caller's scope.

A caller's scope is either every tree (root, the daemon's own user, trusted
writers) or one private tree, ``users/<name>`` below each class root, where
the name is the caller's passwd name, or the decimal uid where there is none.
The daemon asks an `Authorize` callable for the scope of each connection's
peer (SO_PEERCRED); `authorize_by` answers from the mount's trusted writers
(tenancy.Trust: uid 0, the mounting user, ``--trust``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from mithrilfs.layouts import USERS_DIR
from mithrilfs.tenancy import Trust, tree_name


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
        return "" if self.tree is None else f"{os.fsdecode(USERS_DIR)}/{self.tree}"


EVERYTHING = Scope()

# (uid, gid, pid) of the caller -> its scope.
Authorize = Callable[[int, int, int], Scope]


def authorize_by(trust: Trust) -> Authorize:
    """Trusted writers may do anything; anyone else has their own tree."""

    def authorize(uid: int, gid: int, pid: int) -> Scope:
        if trust.allows(uid, gid, pid):
            return EVERYTHING
        return Scope(tree_name(uid))

    return authorize
