"""The content store without a mount: objects named by their blake3, sharded, immutable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3

from mithrilfs.store import ContentStore, hash_fd


def stored(content: ContentStore, data: bytes, inode: int = 7) -> tuple[bytes, bool]:
    """Stage *data* and publish it under its hash: (digest, whether it was new)."""
    path, fd = content.new_staging(inode)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        digest, size = hash_fd(fd)
    finally:
        os.close(fd)
    assert size == len(data)
    return digest, content.publish(path, digest)


def make_store(tmp_path: Path) -> ContentStore:
    content = ContentStore(tmp_path / "store")
    content.create_dirs()
    content.scan()
    return content


def test_hash_fd_is_blake3_of_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(300 * 1024)  # more than one read chunk's worth is not needed: any size
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_fd(fd) == (blake3.blake3(data).digest(), len(data))
    finally:
        os.close(fd)


def test_an_object_is_stored_once_under_its_hash_read_only(tmp_path: Path) -> None:
    content = make_store(tmp_path)
    digest, new = stored(content, b"kernel bytes")
    assert new
    path = content.object_path(digest)
    hexname = digest.hex()
    assert path.relative_to(content.objects_dir).parts == (hexname[:2], hexname[2:4], hexname)
    assert path.read_bytes() == b"kernel bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert content.shard_dirs == 2

    again, new = stored(content, b"kernel bytes", inode=8)
    assert (again, new) == (digest, False)  # dedup: the second staging file is dropped
    assert content.staging_files() == []
    fd = content.open_object(digest)
    try:
        assert os.read(fd, 100) == b"kernel bytes"
    finally:
        os.close(fd)


def test_deleting_the_last_object_of_a_shard_removes_its_directories(tmp_path: Path) -> None:
    content = make_store(tmp_path)
    digest, _ = stored(content, b"x")
    path = content.object_path(digest)
    content.delete(digest)
    assert not content.has(digest)
    assert not path.parent.exists()
    assert not path.parent.parent.exists()
    assert content.shard_dirs == 0
    content.delete(digest)  # deleting twice is harmless


def test_verify_tells_a_changed_or_missing_object(tmp_path: Path) -> None:
    content = make_store(tmp_path)
    digest, _ = stored(content, b"the real content")
    assert content.verify(digest, 16) is None
    assert content.verify(digest, 17) == "size 16, expected 17"
    path = content.object_path(digest)
    path.chmod(0o600)
    path.write_bytes(b"the fake content")
    assert content.verify(digest, 16) == "content does not match its hash"
    content.delete(digest)
    assert content.verify(digest, 16) == "missing"


def test_iter_objects_flags_misnamed_files_and_clear_staging_empties_staging(
    tmp_path: Path,
) -> None:
    content = make_store(tmp_path)
    digest, _ = stored(content, b"good")
    stray = content.objects_dir / "not-a-digest"
    stray.write_bytes(b"?")
    found = {path: name for name, path in content.iter_objects()}
    assert found == {content.object_path(digest): digest, stray: None}

    for inode in (1, 2):
        _path, fd = content.new_staging(inode)
        os.close(fd)
    assert len(content.staging_files()) == 2
    assert content.clear_staging() == 2
    assert content.staging_files() == []


def test_sizes_are_counted_in_whole_blocks(tmp_path: Path) -> None:
    content = make_store(tmp_path)
    block = content.block
    assert content.allocated(0) == 0
    assert content.allocated(1) == block
    assert content.allocated(block + 1) == 2 * block
    floor = 1 << 30
    assert content.overhead_bytes({"mithril.db-wal": floor}) >= floor
