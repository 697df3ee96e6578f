"""WAL checkpoints off the request path (index.WalCheckpointer, daemon.checkpoint_after_commits).

The database file itself changes only when a checkpoint copies WAL frames
into it.  The daemon's connection checkpoints by itself only at its backstop
(`Index.wal_limit`), far above what these tests commit, so a database file
that changed was written by the background checkpoint.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from mithrilfs import daemon
from mithrilfs.index import SUPER_ROOT, Index, WalCheckpointer

DIR = stat.S_IFDIR | 0o755


def _file_state(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _commit_dirs(index: Index, count: int, prefix: bytes) -> None:
    for i in range(count):
        with index.transaction():
            index.make_node(SUPER_ROOT, prefix + b"%d" % i, DIR, 0, 0)


def _open(tmp_path: Path) -> Index:
    index = Index.open(tmp_path / "mithril.db")
    index.limit_wal(None)  # the backstop: 4 MiB of WAL, about 1000 frames
    # Start from a database file that holds everything committed so far.
    WalCheckpointer(tmp_path / "mithril.db").checkpoint()
    return index


def test_the_backstop_alone_leaves_a_few_commits_in_the_wal(tmp_path: Path) -> None:
    index = _open(tmp_path)
    try:
        before = _file_state(tmp_path / "mithril.db")
        changes = index.changes
        _commit_dirs(index, 20, b"d")
        assert _file_state(tmp_path / "mithril.db") == before
        assert index.changes > changes
    finally:
        index.close()


def test_a_checkpointer_copies_what_was_committed(tmp_path: Path) -> None:
    index = _open(tmp_path)
    checkpointer = WalCheckpointer(tmp_path / "mithril.db")
    try:
        _commit_dirs(index, 20, b"d")
        assert checkpointer.checkpoint() > 0
        reopened = Index.open(tmp_path / "mithril.db")
        try:
            assert reopened.lookup(SUPER_ROOT, b"d19") is not None
        finally:
            reopened.close()
    finally:
        checkpointer.close()
        index.close()


def test_the_daemon_checkpoints_shortly_after_commits_and_not_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _open(tmp_path)
    db_file = tmp_path / "mithril.db"
    seen: list[int] = []
    checkpointed = trio.Event()

    class CountingCheckpointer(WalCheckpointer):
        def checkpoint(self) -> int:  # runs in a worker thread
            copied = super().checkpoint()
            seen.append(copied)
            trio.from_thread.run_sync(checkpointed.set)
            return copied

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.checkpoint_after_commits, index, db_file)
            await trio.sleep(daemon.CHECKPOINT_SECONDS * 3)
            assert seen == []  # nothing committed: nothing to do
            before = _file_state(db_file)
            _commit_dirs(index, 20, b"d")
            with trio.fail_after(10):
                await checkpointed.wait()
            assert seen[-1] > 0
            assert _file_state(db_file) != before
            nursery.cancel_scope.cancel()

    monkeypatch.setattr(daemon, "WalCheckpointer", CountingCheckpointer)
    try:
        trio.run(scenario)
    finally:
        index.close()


def test_a_failing_checkpoint_is_logged_once_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    index = _open(tmp_path)
    db_file = tmp_path / "mithril.db"
    attempts: list[bool] = []
    attempted = trio.Event()
    failures = 3  # like a full disk that gets room again

    class FlakyCheckpointer(WalCheckpointer):
        def checkpoint(self) -> int:  # runs in a worker thread
            attempts.append(len(attempts) >= failures)
            trio.from_thread.run_sync(attempted.set)
            if len(attempts) <= failures:
                raise sqlite3.OperationalError("database or disk is full")
            return super().checkpoint()

    async def scenario() -> None:
        nonlocal attempted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.checkpoint_after_commits, index, db_file)
            await trio.testing.wait_all_tasks_blocked()  # it has taken its starting count
            for i in range(failures + 1):
                _commit_dirs(index, 1, b"d%d-" % i)
                with trio.fail_after(10):
                    await attempted.wait()
                attempted = trio.Event()
            nursery.cancel_scope.cancel()

    monkeypatch.setattr(daemon, "WalCheckpointer", FlakyCheckpointer)
    caplog.set_level(logging.INFO, logger="mithrilfs.daemon")
    try:
        trio.run(scenario)
    finally:
        index.close()
    assert attempts == [False, False, False, True]  # the task kept going after each failure
    messages = [record.getMessage() for record in caplog.records]
    assert sum("checkpoint of the index failed" in m for m in messages) == 1
    assert any("work again" in m for m in messages)
