"""Verification off the request path: marks that survive clean remounts, and the scrub.

A lookup or open trusts an object verified in an earlier mount (its mark,
kept in the index, still matches the file's ctime and size) and hashes only
objects that were never verified or whose mark an unclean stop dropped; the
background scrub re-hashes everything, slowly, and finds what the marks
cannot see (docs/crash-safety.md).

Silent damage (bit rot, a power loss that kept the inode but not the bytes)
leaves an object file's ctime alone, but flipping a byte from a test cannot:
where the test needs silent damage it also moves the object's mark to the
file's new ctime, so that the mark looks valid exactly as it would.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import blake3
import pytest

from mithrilfs.repository import INDEX_NAME
from tests.conftest import Mount, run_cli, wait_for
from tests.test_integrity import damage, object_path, stats_json

SCRUB_DEADLINE = 60
OFF = ("--scrub-rate", "0")


def mark_of(store: Path, content: bytes) -> tuple[int | None, int | None]:
    """(verified_epoch, verified_ctime) of *content*'s object, read while unmounted."""
    db = sqlite3.connect(store / INDEX_NAME)
    try:
        row = db.execute(
            "SELECT verified_epoch, verified_ctime FROM objects WHERE hash=?",
            (blake3.blake3(content).digest(),),
        ).fetchone()
    finally:
        db.close()
    assert row is not None, "no object row"
    return row[0], row[1]


def damage_silently(store: Path, content: bytes) -> Path:
    """Flip a bit in *content*'s object and keep its mark looking valid (see above)."""
    path = object_path(store, content)
    damage(path, "bitflip")
    db = sqlite3.connect(store / INDEX_NAME)
    try:
        with db:
            db.execute(
                "UPDATE objects SET verified_ctime=? WHERE hash=?",
                (os.stat(path).st_ctime_ns, blake3.blake3(content).digest()),
            )
    finally:
        db.close()
    return path


def read_or_error(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def mount_with_entry(make_mount, tag: bytes) -> tuple[Mount, Path, dict[str, bytes]]:
    """A mount without a scrub, holding one Triton entry triton/KEY of three files."""
    mount: Mount = make_mount(*OFF)
    key = mount / "triton" / "KEY"
    return mount, key, write_entry(key, tag)


def write_entry(key: Path, tag: bytes) -> dict[str, bytes]:
    key.mkdir()
    files = {
        "k.cubin": tag + b" cubin " * 20000,
        "k.ptx": tag + b" ptx " * 500,
        "__grp__k.json": b'{"child_paths": {}, "tag": "' + tag + b'"}',
    }
    for name, content in files.items():
        (key / name).write_bytes(content)
    return files


def test_the_scrub_finds_a_flipped_bit_in_an_object_verified_in_an_earlier_mount(
    make_mount,
) -> None:
    mount, key, files = mount_with_entry(make_mount, b"A")
    assert (key / "k.cubin").read_bytes() == files["k.cubin"]
    mount.stop()
    epoch, _ctime = mark_of(mount.store, files["k.cubin"])
    assert epoch is not None, "the seal did not mark its new object verified"
    path = damage_silently(mount.store, files["k.cubin"])

    mount.start("--scrub-period", "1s")
    # Nothing touches the mount until the scrub has spoken: it alone finds this.
    wait_for(
        lambda: stats_json(mount)["scrub"]["findings"] == 1,
        SCRUB_DEADLINE,
        "the scrub to report the damaged object",
    )
    summary = stats_json(mount)
    assert summary["scrub"]["last_finding"] is not None
    assert summary["scrub"]["pass_started"] > 0
    assert summary["integrity_failures"] == 1
    assert summary["request_verifications"] == 0
    assert f"scrub: object {blake3.blake3(files['k.cubin']).hexdigest()} is damaged" in (
        mount.log_text()
    )
    # The whole entry went: a miss, never half an entry.
    wait_for(lambda: not key.exists(), 10, "the dropped entry's name to vanish")
    assert not path.exists()
    # The scrub goes on: its next passes verify what is left and find nothing more.
    (mount / "triton" / "OTHER").mkdir()
    (mount / "triton" / "OTHER" / "k.so").write_bytes(b"intact " * 100)
    passes = summary["scrub"]["passes"]
    wait_for(
        lambda: stats_json(mount)["scrub"]["passes"] >= passes + 2,
        SCRUB_DEADLINE,
        "two more passes of the scrub",
    )
    assert stats_json(mount)["scrub"]["findings"] == 1
    assert (mount / "triton" / "OTHER" / "k.so").read_bytes() == b"intact " * 100


def test_an_object_written_before_a_kill_is_hashed_before_its_first_byte_is_served(
    make_mount,
) -> None:
    mount, key, files = mount_with_entry(make_mount, b"B")
    mount.kill()  # unclean: the marks this mount made may vouch for bytes never on disk
    # What a power loss can leave: the inode as recorded, other bytes.
    damage_silently(mount.store, files["k.cubin"])
    mount.start(*OFF)

    outcome = read_or_error(key / "k.cubin")
    assert not isinstance(outcome, bytes), "served the bytes of a damaged object"
    assert isinstance(outcome, FileNotFoundError), outcome  # a miss: the entry is dropped
    wait_for(lambda: not key.exists(), 10, "the dropped entry's name to vanish")
    assert "does not match its hash" in mount.log_text()
    wait_for(lambda: stats_json(mount)["integrity_failures"] == 1, 10, "the integrity counter")
    assert stats_json(mount)["request_verifications"] >= 1


def test_a_clean_remount_trusts_what_was_verified_and_an_unclean_one_only_what_was_clean(
    make_mount,
) -> None:
    mount, clean_key, clean_files = mount_with_entry(make_mount, b"C")
    mount.stop()
    mount.start(*OFF)

    for name, content in clean_files.items():
        assert (clean_key / name).stat().st_size == len(content)
        assert (clean_key / name).read_bytes() == content
    wait_for(lambda: stats_json(mount)["opens"] >= 3, 10, "the counters to be saved")
    assert stats_json(mount)["request_verifications"] == 0

    # Written in a mount that is then killed: these marks are dropped at
    # recovery, those of the clean mount before it are kept.
    late_key = mount / "triton" / "LATE"
    late_files = write_entry(late_key, b"L")
    mount.kill()
    mount.start(*OFF)
    before = stats_json(mount)["request_verifications"]
    for name in clean_files:
        (clean_key / name).stat()
    for name, content in late_files.items():
        assert (late_key / name).read_bytes() == content
    wait_for(
        lambda: stats_json(mount)["request_verifications"] == before + len(late_files),
        10,
        "the late entry's objects to be hashed before serving",
    )
    assert stats_json(mount)["integrity_failures"] == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scrub-period", "0"], "--scrub-period must be longer than 0"),
        (["--scrub-period", "soon"], "invalid duration 'soon'"),
        (["--scrub-rate", "-1"], "invalid size '-1'"),
        (["-o", "scrub_rate=fast"], "invalid size 'fast'"),
    ],
)
def test_bad_scrub_options_are_refused_before_anything_is_touched(
    tmp_path: Path, options: list[str], message: str
) -> None:
    store = tmp_path / "store"
    result = run_cli("mount", tmp_path / "mnt", "--store", store, *options)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"mithrilfs: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not store.exists()
