"""Hashing while writing: a seal's digest is always the hash of the file's final bytes.

Writes that arrive in order are hashed as they come and the seal reads
nothing back; every other pattern (a rewrite of hashed bytes, a hole, a
truncate, a copy-on-write seed) falls back to hashing the staging file.
`OpenFiles.seals_read_back` tells the two paths apart.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
import trio

from mithrilfs import fsck
from mithrilfs.index import SUPER_ROOT
from mithrilfs.openfiles import OpenFiles
from mithrilfs.repository import Repository
from mithrilfs.store import INLINE_HASH_LIMIT


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """A fresh store, checked by fsck after the test."""
    with contextlib.closing(Repository.open(tmp_path / "store")) as repository:
        repository.recover()
        yield repository
        problems = fsck.check(repository.index, repository.content).problems
        assert not problems, [f"{p.kind}: {p.detail}" for p in problems]


def new_file(repo: Repository, name: bytes) -> int:
    with repo.index.transaction():
        root = repo.index.ensure_dir(SUPER_ROOT, b"cpu-test", 0o755, 0, 0).id
        return repo.index.make_node(root, name, stat.S_IFREG | 0o644, 0, 0).id


def write_and_seal(
    repo: Repository, files: OpenFiles, ino: int, writes: Callable[[int], None], flags: int
) -> bytes:
    """Open *ino*, apply *writes* to the handle, close it; return the sealed file's bytes."""

    async def scenario() -> None:
        fh = files.open(ino, flags)
        writes(fh)
        await files.release(fh)

    trio.run(scenario)
    node = repo.index.get(ino)
    assert node.object is not None
    stored = repo.content.object_path(node.object).read_bytes()
    assert node.object == blake3.blake3(stored).digest()
    assert node.size == len(stored)
    return stored


BIG = INLINE_HASH_LIMIT * 3  # a size whose read-back would go to a worker thread


def in_order(data: bytes, piece: int) -> Callable[[OpenFiles], Callable[[int], None]]:
    def writes(files: OpenFiles) -> Callable[[int], None]:
        def apply(fh: int) -> None:
            for offset in range(0, len(data), piece):
                files.write(fh, offset, data[offset : offset + piece])

        return apply

    return writes


@pytest.mark.parametrize("size", [1, 4096, BIG])
def test_writes_in_order_are_hashed_as_they_arrive(repo: Repository, size: int) -> None:
    files = OpenFiles(repo.index, repo.content)
    data = os.urandom(size)
    ino = new_file(repo, b"f")
    stored = write_and_seal(repo, files, ino, in_order(data, 128 * 1024)(files), os.O_WRONLY)
    assert stored == data
    assert files.seals_read_back == 0


def test_a_write_over_hashed_bytes_falls_back_to_hashing_at_seal(repo: Repository) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, b"f")
    first, second = os.urandom(BIG), os.urandom(4096)

    def writes(fh: int) -> None:
        files.write(fh, 0, first)
        files.write(fh, 1000, second)  # inside what was already hashed

    stored = write_and_seal(repo, files, ino, writes, os.O_WRONLY)
    assert stored == first[:1000] + second + first[1000 + len(second) :]
    assert files.seals_read_back == 1


def test_a_write_that_overlaps_the_hashed_end_falls_back(repo: Repository) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, b"f")

    def writes(fh: int) -> None:
        files.write(fh, 0, b"a" * 100)
        files.write(fh, 50, b"b" * 100)  # half over hashed bytes, half past them

    assert write_and_seal(repo, files, ino, writes, os.O_WRONLY) == b"a" * 50 + b"b" * 100
    assert files.seals_read_back == 1


def test_a_hole_falls_back(repo: Repository) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, b"f")

    def writes(fh: int) -> None:
        files.write(fh, 10, b"tail")
        files.write(fh, 0, b"head")

    assert write_and_seal(repo, files, ino, writes, os.O_WRONLY) == b"head" + bytes(6) + b"tail"
    assert files.seals_read_back == 1


def test_a_truncate_below_what_was_hashed_falls_back(repo: Repository) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, b"f")
    data = os.urandom(8192)

    async def scenario() -> None:
        fh = files.open(ino, os.O_WRONLY)
        files.write(fh, 0, data)
        await files.truncate(ino, 5000, fh)
        files.write(fh, 5000, b"end")
        await files.release(fh)

    trio.run(scenario)
    node = repo.index.get(ino)
    assert node.object == blake3.blake3(data[:5000] + b"end").digest()
    assert files.seals_read_back == 1


def test_a_copy_on_write_seed_falls_back_and_o_trunc_starts_afresh(repo: Repository) -> None:
    files = OpenFiles(repo.index, repo.content)
    ino = new_file(repo, b"f")
    write_and_seal(repo, files, ino, in_order(b"first version", 4)(files), os.O_WRONLY)
    assert files.seals_read_back == 0
    # Appending to sealed content seeds the staging copy with it: hashed at seal.
    appended = write_and_seal(
        repo, files, ino, lambda fh: _ignore(files.write(fh, 13, b" and more")), os.O_WRONLY
    )
    assert appended == b"first version and more"
    assert files.seals_read_back == 1
    # O_TRUNC drops the old content: the rewrite is in order again.
    rewritten = write_and_seal(
        repo, files, ino, in_order(b"second", 3)(files), os.O_WRONLY | os.O_TRUNC
    )
    assert rewritten == b"second"
    assert files.seals_read_back == 1


def _ignore(_written: int) -> None:
    """A write step for `write_and_seal`, which wants no result."""
