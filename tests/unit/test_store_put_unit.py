"""ContentStore.put and stage: the one writer of new objects, without a mount."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from mithrilfs.store import EMPTY_DIGEST, ContentStore


@pytest.fixture
def content(tmp_path: Path) -> ContentStore:
    store = ContentStore(tmp_path)
    store.create_dirs()
    return store


def test_put_stores_an_object_once(content: ContentStore) -> None:
    data = io.BytesIO(b"object bytes" * 10_000)
    digest, size = content.put(data.read)
    assert size == 120_000
    assert content.object_path(digest).read_bytes() == data.getvalue()
    again = io.BytesIO(data.getvalue())
    assert content.put(again.read) == (digest, size)  # deduplicated
    assert content.staging_files() == []
    assert stat.S_IMODE(os.stat(content.object_path(digest)).st_mode) == 0o400


def test_put_of_nothing_is_the_empty_object(content: ContentStore) -> None:
    assert content.put(io.BytesIO(b"").read) == (EMPTY_DIGEST, 0)


def test_a_failed_read_leaves_no_staging_file(content: ContentStore) -> None:
    def broken(size: int) -> bytes:
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away"):
        content.stage(broken, "import")
    assert content.staging_files() == []


def test_stage_leaves_the_object_unpublished(content: ContentStore) -> None:
    staged = content.stage(io.BytesIO(b"later").read, "import")
    assert staged.path.parent == content.staging_dir
    assert staged.path.name.startswith("import.")
    assert not content.has(staged.digest)
    assert content.publish(staged.path, staged.digest)
    assert content.object_path(staged.digest).read_bytes() == b"later"
