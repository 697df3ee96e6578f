"""Verification marks in the index: epochs, the clean point, recovery, migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import blake3

from mithrilfs.index import SCHEMA_VERSION, Index
from mithrilfs.repository import INDEX_NAME, Repository

CONTENT = b"object bytes"
DIGEST = blake3.blake3(CONTENT).digest()


def store_with_object(tmp_path: Path) -> Repository:
    """A store whose index has one object row (the file itself is not needed here)."""
    repo = Repository.open(tmp_path / "store")
    repo.recover()
    with repo.index.transaction():
        repo.index.db.execute(
            "INSERT INTO objects(hash, size, refcount) VALUES (?, ?, 1)", (DIGEST, len(CONTENT))
        )
    return repo


def test_marks_of_a_clean_epoch_survive_an_unclean_one_and_later_marks_do_not(
    tmp_path: Path,
) -> None:
    repo = store_with_object(tmp_path)
    index = repo.index
    index.mark_verified(DIGEST, 111)
    assert index.verification_mark(DIGEST) is None, "marked outside a serving epoch"

    repo.mark_in_use()
    index.mark_verified(DIGEST, 111)
    assert index.verification_mark(DIGEST) == (len(CONTENT), 111)
    repo.close(clean=True)

    repo = Repository.open(tmp_path / "store")
    assert repo.recover().marks_dropped == 0
    assert repo.index.verification_mark(DIGEST) == (len(CONTENT), 111)
    repo.mark_in_use()
    repo.index.mark_verified(DIGEST, 222)  # verified again, in a mount that is then killed
    repo.close()  # what a kill leaves: clean_shutdown stays 0

    repo = Repository.open(tmp_path / "store")
    recovery = repo.recover()
    assert recovery.unclean
    assert recovery.marks_dropped == 1
    assert repo.index.verification_mark(DIGEST) is None
    repo.close()


def test_a_format_2_store_migrates_with_every_mark_unset(tmp_path: Path) -> None:
    repo = store_with_object(tmp_path)
    repo.mark_in_use()
    repo.index.mark_verified(DIGEST, 111)
    repo.close(clean=True)
    # Format 2 had no marks: take them out again.
    db = sqlite3.connect(tmp_path / "store" / INDEX_NAME)
    with db:
        db.execute("ALTER TABLE objects DROP COLUMN verified_epoch")
        db.execute("ALTER TABLE objects DROP COLUMN verified_ctime")
        db.execute("UPDATE meta SET value=2 WHERE key='schema_version'")
    db.close()

    index = Index.open(tmp_path / "store" / INDEX_NAME)
    try:
        assert index.get_meta("schema_version") == SCHEMA_VERSION == 3
        assert index.verification_mark(DIGEST) is None
        assert index.object_size(DIGEST) == len(CONTENT)
    finally:
        index.close()
