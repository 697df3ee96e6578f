"""The open-file layer without a mount: staging, sealing, dedup, truncation, limits."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from mithrilfs.errors import FsError
from mithrilfs.openfiles import OpenFiles
from mithrilfs.repository import Repository
from tests.unit.conftest import directory


class Seals:
    """A seal listener that records (inode, size, new object)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool]] = []

    def file_sealed(self, ino: int, size: int, new_object: bool) -> None:
        self.seen.append((ino, size, new_object))


def new_file(repo: Repository, parent: int, name: bytes) -> int:
    with repo.index.transaction():
        return repo.index.make_node(
            parent, name, stat.S_IFREG | 0o644, os.geteuid(), os.getegid()
        ).id


def test_a_release_seals_content_into_one_object_and_tells_the_listeners(
    repo: Repository, root: int
) -> None:
    seals = Seals()
    files = OpenFiles(repo.index, repo.content, listeners=[seals])
    triton = directory(repo, root, "triton", "KEY")
    first, second = new_file(repo, triton, b"a.so"), new_file(repo, triton, b"b.so")

    async def scenario() -> None:
        for ino in (first, second):
            fh = files.open(ino, os.O_WRONLY)
            assert files.write(fh, 0, b"same bytes") == 10
            assert files.is_being_written(ino)
            assert files.staged_bytes() > 0
            assert files.largest_staged() == 10
            await files.release(fh)
            assert not files.is_open(ino)

    trio.run(scenario)
    assert seals.seen == [(first, 10, True), (second, 10, False)]
    a, b = repo.index.get(first), repo.index.get(second)
    assert a.object is not None
    assert b.object == a.object
    assert repo.content.object_path(a.object).read_bytes() == b"same bytes"
    assert files.staged_bytes() == 0
    assert repo.content.staging_files() == []


def test_reads_see_unsealed_writes_and_o_trunc_starts_empty(repo: Repository, root: int) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, directory(repo, root, "triton", "KEY"), b"k.json")

    async def scenario() -> None:
        fh = files.open(ino, os.O_RDWR)
        files.write(fh, 0, b"hello world")
        files.write(fh, 6, b"there")
        assert files.read(fh, 0, 100) == b"hello there"
        assert files.unsealed(ino) is not None
        await files.release(fh)
        assert files.unsealed(ino) is None

        fh = files.open(ino, os.O_WRONLY | os.O_TRUNC)
        files.write(fh, 0, b"new")
        await files.release(fh)

        fh = files.open(ino, os.O_RDONLY)
        assert files.read(fh, 0, 100) == b"new"
        await files.release(fh)

    trio.run(scenario)
    assert repo.index.get(ino).size == 3


def test_truncate_grows_with_a_hole_and_shrinks(repo: Repository, root: int) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, directory(repo, root, "inductor"), b"f")

    async def scenario() -> None:
        fh = files.open(ino, os.O_RDWR)
        files.write(fh, 0, b"abc")
        await files.truncate(ino, 6, fh)
        assert files.read(fh, 0, 10) == b"abc\0\0\0"
        await files.truncate(ino, 2, fh)
        await files.release(fh)

    trio.run(scenario)
    node = repo.index.get(ino)
    assert node.size == 2
    assert node.object is not None
    assert repo.content.object_path(node.object).read_bytes() == b"ab"


def test_a_file_that_can_never_fit_is_refused_with_efbig(repo: Repository, root: int) -> None:
    files = OpenFiles(repo.index, repo.content, max_file_size=1024)
    ino = new_file(repo, directory(repo, root, "inductor"), b"big")
    fh = files.open(ino, os.O_WRONLY)
    files.write(fh, 0, b"x" * 1024)
    with pytest.raises(FsError) as refused:
        files.write(fh, 1024, b"y")
    assert refused.value.errno == errno.EFBIG
    trio.run(files.release, fh)
    # What ended in EFBIG is never sealed: the file keeps what it had.
    assert repo.index.get(ino).size == 0
    assert repo.content.staging_files() == []


def test_verify_finds_a_corrupt_object_once_and_close_all_lets_go(
    repo: Repository, root: int
) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, directory(repo, root, "inductor"), b"f")

    async def write() -> None:
        fh = files.open(ino, os.O_WRONLY)
        files.write(fh, 0, b"trusted")
        await files.release(fh)

    trio.run(write)
    digest = repo.index.get(ino).object
    assert digest is not None
    path = repo.content.object_path(digest)
    path.chmod(0o600)
    path.write_bytes(b"tampered")

    # As after a remount: objects sealed by an earlier daemon are checked once.
    reader = OpenFiles(repo.index, repo.content)
    fh = reader.open(ino, os.O_RDONLY)
    assert trio.run(reader.verify, fh) == digest
    reader.close_all()
    assert not reader.is_open(ino)
    # Put it back as it was, so that the store is consistent again.
    path.write_bytes(b"trusted")
    path.chmod(0o400)
