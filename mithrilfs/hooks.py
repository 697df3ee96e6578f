"""Pointing triton and torch inductor at a mounted mithrilfs cache.

This module owns the in-process hook (:func:`activate`) and the equivalent
shell text (:func:`env_lines`, printed by ``mithrilfs env``). Both only set
environment variables: triton and inductor read them lazily, so setting them
before either library has used its cache is all the integration needed. It
never imports torch or triton; it only looks at them when they are already
loaded, to refuse switching a cache directory they have already settled on.

Which tree a caller gets (docs/security.md): uid 0 and the owner of the mount
root write the shared tree, ``MOUNT/{triton,inductor}``; everyone else their
own private tree, ``MOUNT/users/<name>/{triton,inductor}``, which still
serves what the shared tree holds.  ``tree="shared"`` (or
``MITHRILFS_TREE=shared``) is for trusted pre-warm jobs.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

# Only modules that need nothing beyond the standard library: a job's environment
# has no daemon packages (tests/test_packaging.py installs the job side alone).
from mithrilfs import adminclient
from mithrilfs.tenancy import tree_name

__all__ = [
    "DEFAULT_MOUNT",
    "CacheDirAlreadyFixed",
    "MithrilfsNotMounted",
    "UnknownTree",
    "activate",
    "env_lines",
]

DEFAULT_MOUNT = "/var/cache/mithril"
MOUNT_ENV = "MITHRILFS_MOUNT"
TRITON_VAR = "TRITON_CACHE_DIR"
INDUCTOR_VAR = "TORCHINDUCTOR_CACHE_DIR"
TREE_ENV = "MITHRILFS_TREE"
TREES = ("shared", "private")
USERS_DIR = "users"


class MithrilfsNotMounted(RuntimeError):
    """The cache mountpoint is missing or nothing is mounted there."""


class CacheDirAlreadyFixed(RuntimeError):
    """torch or triton already uses a different cache directory."""


class UnknownTree(ValueError):
    """A tree other than "shared" or "private" was asked for."""


def tree_root(mountpoint: str, tree: str | None = None) -> str:
    """The directory holding this caller's ``triton/`` and ``inductor/``.

    *tree* (else ``$MITHRILFS_TREE``) is "shared" or "private"; without it,
    uid 0, the mount root's owner and the mount's other trusted writers (the
    daemon says, on its admin socket) get the shared tree, others their own.
    """
    mount = os.path.abspath(mountpoint)
    choice = tree or os.environ.get(TREE_ENV) or None
    if choice is not None and choice not in TREES:
        raise UnknownTree(f"unknown tree '{choice}': expected one of {', '.join(TREES)}")
    uid = os.geteuid()
    if choice is None:
        trusted = (
            uid == 0
            or (os.path.isdir(mount) and os.stat(mount).st_uid == uid)
            or _daemon_trusts_caller(mount)
        )
        choice = "shared" if trusted else "private"
    if choice == "shared":
        return mount
    return os.path.join(mount, USERS_DIR, tree_name(uid))


def _daemon_trusts_caller(mount: str) -> bool:
    """Whether the daemon serving *mount* counts this process as a trusted writer.

    Asked only when the answer is not plain; any failure (no daemon, an older
    one) means private.
    """
    try:
        return adminclient.ask(Path(mount), "whoami", wait=2.0).get("trusted") is True
    except Exception:
        return False


def _cache_dirs(mountpoint: str, tree: str | None = None) -> dict[str, str]:
    root = tree_root(mountpoint, tree)
    return {
        TRITON_VAR: os.path.join(root, "triton"),
        INDUCTOR_VAR: os.path.join(root, "inductor"),
    }


def _fixed_dirs() -> list[tuple[str, str]]:
    """(variable, directory) pairs a loaded torch/triton may have committed to."""
    fixed: list[tuple[str, str]] = []
    if "torch" not in sys.modules and "triton" not in sys.modules:
        # Nothing has read the variables yet, so overriding them is the point.
        return fixed
    # Inductor's cache_dir() writes TORCHINDUCTOR_CACHE_DIR back once computed,
    # and inductor's triton_heuristics sets TRITON_CACHE_DIR when unset, so
    # the environment records what each has used so far.
    for var in (TRITON_VAR, INDUCTOR_VAR):
        if value := os.environ.get(var):
            fixed.append((var, value))
    # triton 3.x: assigning triton.knobs.cache.dir stores the value on the
    # knob instance, where it takes precedence over the environment.
    knobs: Any = sys.modules.get("triton.knobs") or getattr(
        sys.modules.get("triton"), "knobs", None
    )
    triton_dir = getattr(getattr(knobs, "cache", None), "__dict__", {}).get("dir")
    if isinstance(triton_dir, str):
        fixed.append((TRITON_VAR, triton_dir))
    # Inductor memoises its local cache path (functools.cache), which outlives
    # later changes of the environment variable.
    codecache: Any = sys.modules.get("torch._inductor.codecache")
    cached = getattr(getattr(codecache, "CacheBase", None), "get_local_cache_path", None)
    info = getattr(cached, "cache_info", None)
    if callable(cached) and callable(info) and info().currsize:
        # <cache_dir>/cache/<system hash>
        fixed.append((INDUCTOR_VAR, os.path.dirname(os.path.dirname(cached()))))
    return fixed


def activate(
    mountpoint: str | os.PathLike[str] | None = None, tree: str | None = None
) -> dict[str, str]:
    """Point triton and inductor at the mithrilfs mount; return what was set.

    The mount is ``mountpoint``, else ``$MITHRILFS_MOUNT``, else
    ``/var/cache/mithril``; the tree as `tree_root` says. Call it before
    torch compiles anything.
    """
    if mountpoint is None:
        mountpoint = os.environ.get(MOUNT_ENV) or DEFAULT_MOUNT
    mount = os.path.abspath(os.fspath(mountpoint))
    if not os.path.isdir(mount):
        raise MithrilfsNotMounted(f"mithrilfs mountpoint {mount} does not exist")
    if not os.path.ismount(mount):
        raise MithrilfsNotMounted(
            f"nothing is mounted at {mount}; mount mithrilfs there first "
            f"(or set {MOUNT_ENV} to where it is mounted)"
        )

    wanted = _cache_dirs(mount, tree)
    for var, current in _fixed_dirs():
        if os.path.abspath(current) != wanted[var]:
            raise CacheDirAlreadyFixed(
                f"{var} is already {current} in this process; cannot switch it to "
                f"{wanted[var]} (activate mithrilfs before torch/triton use their "
                "caches, or export the variables printed by `mithrilfs env`)"
            )

    os.environ.update(wanted)
    return wanted


def env_lines(mountpoint: str, tree: str | None = None) -> str:
    """Shell ``export`` lines equivalent to :func:`activate` for ``mountpoint``."""
    return "".join(
        f"export {var}={shlex.quote(path)}\n" for var, path in _cache_dirs(mountpoint, tree).items()
    )
