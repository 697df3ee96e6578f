"""Fixtures of the unit tier: real SQLite and a real store under tmp_path, no mount.

Nothing here needs root, /dev/fuse or a daemon: the objects are built
directly (as `services.build_services` builds them for a mount) and the
handlers are called as pyfuse3 would call them.  Every store (the `repo`
fixture of tests/conftest.py) is checked with
fsck when its test ends, as the mount tier does.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import trio

from mithrilfs.clock import NS
from mithrilfs.daemon import prepare_tree
from mithrilfs.openfiles import OpenFiles
from mithrilfs.repository import Repository

DEVICE_CLASS = "cpu-test"


class FixedClock:
    """A clock that moves only when told to."""

    def __init__(self, now_ns: int) -> None:
        self.now = now_ns
        self.elapsed = 0.0

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * NS)
        self.elapsed += seconds

    def now_ns(self) -> int:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed


@dataclass(frozen=True)
class Context:
    """What handlers read of pyfuse3's RequestContext (whose fields are read-only)."""

    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


def context(uid: int = 0, gid: int = 0) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, Context(uid, gid))


@pytest.fixture
def root(repo: Repository) -> int:
    """The class root, with triton/, inductor/ and users/ in it, as a mount prepares it."""
    return prepare_tree(repo.index, DEVICE_CLASS)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(time.time_ns())


def directory(repo: Repository, parent: int, *names: str) -> int:
    """The directory at *names* below *parent*, made where missing."""
    for name in names:
        made = repo.index.ensure_dir(parent, name.encode(), 0o755, os.geteuid(), os.getegid())
        parent = made.id
    return parent


def write_file(files: OpenFiles, repo: Repository, parent: int, name: str, data: bytes) -> int:
    """Make a regular file through the open-file layer (written, released, sealed)."""
    with repo.index.transaction():
        node = repo.index.make_node(
            parent, name.encode(), stat.S_IFREG | 0o644, os.geteuid(), os.getegid()
        )

    async def write() -> None:
        fh = files.open(node.id, os.O_WRONLY)
        files.write(fh, 0, data)
        await files.release(fh)

    trio.run(write)
    return node.id


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything below tests/unit is the unit tier: `pytest -m unit` runs it alone.

    pytest calls this hook with every collected item, not only this directory's.
    """
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.unit)
