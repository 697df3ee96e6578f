"""The request handlers called directly, as pyfuse3 would call them, without a mount.

The services are built by `services.build_services`, as the daemon builds
them; only what needs a kernel is stood in for: the request context, the
readdir reply buffer and the kernel's entry invalidation queue.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest
import trio

from mithrilfs.fs import Operations
from mithrilfs.repository import Repository
from mithrilfs.services import build_services
from mithrilfs.stats import Stats
from tests.unit.conftest import DEVICE_CLASS, FixedClock, context

ROOT = pyfuse3.ROOT_INODE
CTX = context()
FILE_MODE = pyfuse3.ModeT(stat.S_IFREG | 0o644)


@pytest.fixture
def ops(repo: Repository, root: int, clock: FixedClock) -> Iterator[Operations]:
    services = build_services(
        repo.index, repo.content, root, stats=Stats(DEVICE_CLASS), cap=1 << 30, clock=clock
    )
    handlers = Operations(services)
    yield handlers
    handlers.forget_all()  # as at unmount: the kernel lets go of everything


@pytest.fixture
def invalidated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    """The (parent, name) pairs the kernel is told to forget, in order."""
    told: list[tuple[int, bytes]] = []

    def record(parent: int, name: bytes, ignore_enoent: bool = False) -> None:
        told.append((parent, name))

    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", record)
    return told


def run(scenario: Callable[[], Any]) -> Any:
    return trio.run(scenario)


async def inode(ops: Operations, parent: int, name: bytes) -> pyfuse3.InodeT:
    attrs = await ops.lookup(pyfuse3.InodeT(parent), name, CTX)
    return attrs.st_ino


async def make_dir(ops: Operations, parent: int, name: bytes) -> pyfuse3.InodeT:
    attrs = await ops.mkdir(pyfuse3.InodeT(parent), name, pyfuse3.ModeT(0o755), CTX)
    return attrs.st_ino


async def write_file(ops: Operations, parent: int, name: bytes, data: bytes) -> pyfuse3.InodeT:
    info, attrs = await ops.create(
        pyfuse3.InodeT(parent), name, FILE_MODE, pyfuse3.FlagT(os.O_WRONLY), CTX
    )
    assert await ops.write(info.fh, 0, data) == len(data)
    await ops.release(info.fh)
    return attrs.st_ino


async def read_file(ops: Operations, ino: int) -> bytes:
    info = await ops.open(pyfuse3.InodeT(ino), pyfuse3.FlagT(os.O_RDONLY), CTX)
    try:
        return await ops.read(info.fh, 0, 1 << 20)
    finally:
        await ops.release(info.fh)


def counter(ops: Operations, name: str, **labels: str) -> int:
    return ops.stats.counters.get((name, tuple(sorted(labels.items()))), 0)


def test_a_file_created_and_written_is_found_and_read_back(ops: Operations) -> None:
    async def scenario() -> None:
        triton = await inode(ops, ROOT, b"triton")
        key = await make_dir(ops, triton, b"KEY")
        ino = await write_file(ops, key, b"k.so", b"\x7fELF kernel")

        found = await ops.lookup(key, b"k.so", CTX)
        assert found.st_ino == ino
        assert found.st_size == len(b"\x7fELF kernel")
        assert stat.S_ISREG(found.st_mode)
        assert (await ops.getattr(ino, CTX)).st_size == found.st_size
        assert await read_file(ops, ino) == b"\x7fELF kernel"
        missing = await ops.lookup(key, b"absent", CTX)
        assert missing.st_ino == 0  # a negative entry, which the kernel may cache

    run(scenario)
    assert counter(ops, "files_sealed_total") == 1
    assert counter(ops, "lookups_total", layout="triton", result="hit", tree="shared") >= 1


def test_rename_replaces_the_target_and_leaves_a_miss_behind(ops: Operations) -> None:
    async def scenario() -> None:
        inductor = await inode(ops, ROOT, b"inductor")
        tmp = await write_file(ops, inductor, b"tmp.x1", b"new")
        await write_file(ops, inductor, b"graph", b"old")
        await ops.rename(inductor, b"tmp.x1", inductor, b"graph", 0, CTX)

        assert (await ops.lookup(inductor, b"tmp.x1", CTX)).st_ino == 0
        assert await inode(ops, inductor, b"graph") == tmp
        assert await read_file(ops, tmp) == b"new"

        await make_dir(ops, inductor, b"full")
        await write_file(ops, await inode(ops, inductor, b"full"), b"f", b"x")
        await make_dir(ops, inductor, b"other")
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.rename(inductor, b"other", inductor, b"full", 0, CTX)
        assert refused.value.errno == errno.ENOTEMPTY

    run(scenario)


def test_an_unlinked_file_stays_readable_until_its_last_holder_lets_go(
    ops: Operations, repo: Repository
) -> None:
    async def scenario() -> None:
        inductor = await inode(ops, ROOT, b"inductor")
        ino = await write_file(ops, inductor, b"lib.so", b"code")
        digest = repo.index.get(ino).object
        assert digest is not None
        info = await ops.open(ino, pyfuse3.FlagT(os.O_RDONLY), CTX)
        await ops.unlink(inductor, b"lib.so", CTX)

        assert (await ops.lookup(inductor, b"lib.so", CTX)).st_ino == 0
        assert await ops.read(info.fh, 0, 100) == b"code"
        await ops.release(info.fh)
        assert repo.content.has(digest), "the kernel still holds the inode"
        await ops.forget([(ino, ops.lookups[ino])])
        assert not repo.content.has(digest), "freed once nobody holds it"

    run(scenario)


def test_readdir_lists_every_name_and_resumes_from_an_offset(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[tuple[bytes, int]] = []
    room = [3]  # the reply buffer fills after three names

    def reply(token: object, name: bytes, attrs: pyfuse3.EntryAttributes, offset: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        listed.append((name, offset))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    token = cast(pyfuse3.ReaddirToken, object())

    async def scenario() -> None:
        inductor = await inode(ops, ROOT, b"inductor")
        names = [b"a", b"b", b"c", b"d", b"e"]
        for name in names:
            await write_file(ops, inductor, name, name)
        fh = await ops.opendir(inductor, CTX)
        await ops.readdir(fh, 0, token)
        assert [name for name, _offset in listed] == names[:3]
        room[0] = 10
        await ops.readdir(fh, listed[-1][1], token)
        await ops.releasedir(fh)
        assert sorted(name for name, _offset in listed) == names

    run(scenario)


SETATTR_FIELDS = ("size", "mode", "uid", "gid", "atime", "mtime", "ctime")


def setattr_fields(*changed: str) -> pyfuse3.SetattrFields:
    """What setattr reads of pyfuse3's SetattrFields (whose fields are read-only)."""
    flags = {f"update_{name}": name in changed for name in SETATTR_FIELDS}
    return cast(pyfuse3.SetattrFields, SimpleNamespace(**flags))


def test_setattr_truncates_and_changes_the_mode(ops: Operations) -> None:
    async def scenario() -> None:
        inductor = await inode(ops, ROOT, b"inductor")
        ino = await write_file(ops, inductor, b"f", b"0123456789")
        attrs = pyfuse3.EntryAttributes()
        attrs.st_size = 4
        attrs.st_mode = stat.S_IFREG | 0o600
        changed = await ops.setattr(ino, attrs, setattr_fields("size", "mode"), None, CTX)
        assert changed.st_size == 4
        assert stat.S_IMODE(changed.st_mode) == 0o600
        assert await read_file(ops, ino) == b"0123"

    run(scenario)


def test_an_eviction_tells_the_kernel_about_every_name_it_holds(
    ops: Operations, repo: Repository, invalidated: list[tuple[int, bytes]]
) -> None:
    async def scenario() -> tuple[int, int, int]:
        triton = await inode(ops, ROOT, b"triton")
        key = await make_dir(ops, triton, b"KEY")
        ino = await write_file(ops, key, b"k.so", b"kernel")
        await write_file(ops, key, b"__grp__k.json", b"{}")
        entry = repo.index.get(ino).entry
        assert entry is not None
        return triton, key, entry

    triton, key, entry = run(scenario)
    assert ops.evictor.remove_entries([entry], "evict").entries == 1

    # Deepest names first: the files, then their directory.
    assert sorted(invalidated[:2]) == [(key, b"__grp__k.json"), (key, b"k.so")]
    assert invalidated[2:] == [(triton, b"KEY")]
    assert counter(ops, "evictions_total", reason="evict") == 1

    async def after() -> None:
        assert (await ops.lookup(triton, b"KEY", CTX)).st_ino == 0

    run(after)


def test_a_read_only_mount_serves_reads_and_refuses_changes(
    repo: Repository, root: int, clock: FixedClock
) -> None:
    services = build_services(
        repo.index, repo.content, root, stats=Stats(DEVICE_CLASS), cap=1 << 30, clock=clock
    )
    ops = Operations(services, read_only=True)

    async def scenario() -> None:
        inductor = await inode(ops, ROOT, b"inductor")
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.create(inductor, b"f", FILE_MODE, pyfuse3.FlagT(os.O_WRONLY), CTX)
        assert refused.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.mkdir(inductor, b"d", pyfuse3.ModeT(0o755), CTX)
        assert refused.value.errno == errno.EROFS

    run(scenario)
    ops.forget_all()


def test_an_unexpected_failure_becomes_eio_and_a_long_name_enametoolong(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ino: int) -> None:
        raise RuntimeError("a bug")

    async def scenario() -> None:
        with pytest.raises(pyfuse3.FUSEError) as too_long:
            await ops.lookup(ROOT, b"x" * 256, CTX)
        assert too_long.value.errno == errno.ENAMETOOLONG
        monkeypatch.setattr(ops.index, "get", broken)
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.getattr(ROOT, CTX)
        assert failed.value.errno == errno.EIO

    run(scenario)
    monkeypatch.undo()
