"""`mithrilfs import` and `mithrilfs export`, through the real command line.

The main test builds a real inductor cache without mithrilfs, imports it,
mounts the store and checks that torch.compile hits that cache through the
mount.  The others check that an export and re-import reproduce a tree
exactly (non-UTF-8 names, symlinks, modes, nanosecond mtimes), that imports
deduplicate and replace only what changed, and that bad input leaves the
store as it was.  Every store a test changes ends with a clean fsck.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mithrilfs import fsck, transfer
from mithrilfs.repository import Repository
from mithrilfs.store import EMPTY_DIGEST

WORKLOAD = Path(__file__).parent / "workloads" / "torch_mlp.py"
CLASS = "cpu-test"
COMPILE_TIMEOUT = 300


def mithrilfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mithrilfs", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def ok(*args: str | Path) -> str:
    result = mithrilfs(*args)
    assert result.returncode == 0, f"mithrilfs {args} failed: {result.stderr}"
    return result.stdout


def assert_fsck_clean(store: Path) -> None:
    repo = Repository.open(store, create=False)
    try:
        report = fsck.check(repo.index, repo.content)
    finally:
        repo.close()
    assert report.clean, [f"{p.kind}: {p.detail}" for p in report.problems]


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mithrilfs: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Relative path -> (mode, size, sha256 or link target, mtime_ns), names as bytes."""
    found: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            else:
                content = None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            found[os.path.relpath(path, base)] = (st.st_mode, size, content, st.st_mtime_ns)
    return found


def store_state(store: Path) -> tuple[Any, ...]:
    """Everything an import could change: rows, object files, staging."""
    db = sqlite3.connect(store / "mithril.db")
    try:
        rows = tuple(
            tuple(db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall())
            for table in ("entries", "inodes", "objects", "meta")
        )
    finally:
        db.close()
    objects = sorted(p.name for p in (store / "objects").rglob("*") if p.is_file())
    staging = sorted(p.name for p in (store / "staging").iterdir())
    return rows, tuple(objects), tuple(staging)


def compile_env(inductor_dir: Path, triton_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TORCHINDUCTOR_", "TRITON_", "TORCH_COMPILE"))
    }
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(inductor_dir),
        TRITON_CACHE_DIR=str(triton_dir),
        TORCHINDUCTOR_FX_GRAPH_CACHE="1",
    )
    return env


def run_workload(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(WORKLOAD)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=COMPILE_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


# -- the real thing: an inductor cache made without mithrilfs, hit through a mount -------


@pytest.mark.compilers
def test_imported_inductor_cache_is_hit_through_the_mount(tmp_path: Path, make_mount) -> None:
    cache = tmp_path / "torchinductor"
    cold = run_workload(compile_env(cache, tmp_path / "triton-cold"))
    assert cold["inductor"].get("fxgraph_cache_miss", 0) > 0, cold
    assert any((cache / "fxgraph").rglob("*")), "inductor wrote no FX graph cache entry"

    store = tmp_path / "store"
    summary = ok("import", cache, "--layout", "inductor", "--store", store, "--device-class", CLASS)
    assert f"into {CLASS}/inductor" in summary
    assert_fsck_clean(store)

    mount = make_mount("--device-class", CLASS, store=store)
    assert snapshot(mount / "inductor").keys() >= snapshot(cache).keys()
    warm = run_workload(compile_env(mount / "inductor", mount / "triton"))
    print(json.dumps(warm["inductor"]))
    assert warm["inductor"].get("fxgraph_cache_hit", 0) > 0, warm
    assert warm["checksum"] == cold["checksum"]
    # The mount fixture unmounts and requires a clean fsck.


# -- export / import round trip ----------------------------------------------------------


def make_tree(root: Path) -> None:
    """A small cache-like tree with the awkward cases: non-UTF-8 names, symlinks, modes,
    an empty file, and mtimes that need nanoseconds."""
    base = os.fsencode(root)
    os.makedirs(os.path.join(base, b"key1", b"sub"))
    os.makedirs(os.path.join(base, b"k\xff\xfe-dir"))
    files = {
        b"key1/kernel.so": (b"\x7fELF" + bytes(range(256)) * 64, 0o755),
        b"key1/__grp__kernel.json": (b'{"child_paths": {}}', 0o644),
        b"key1/sub/empty": (b"", 0o600),
        b"k\xff\xfe-dir/n\xe9e.bin": (b"latin-1 named content", 0o640),
        b"top.txt": (b"top level", 0o644),
    }
    for rel, (data, mode) in files.items():
        path = os.path.join(base, rel)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
    os.symlink(b"kernel.so", os.path.join(base, b"key1/link.so"))
    os.symlink(b"../key1/sub/\xff-missing", os.path.join(base, b"k\xff\xfe-dir/dangling"))
    os.chmod(os.path.join(base, b"k\xff\xfe-dir"), 0o750)
    mtime = 1_700_000_000_123_456_789
    # Deepest first: setting a child's time does not move its directory's.
    for dirpath, dirnames, filenames in sorted(os.walk(base), key=lambda w: -len(w[0])):
        for offset, name in enumerate(sorted(dirnames + filenames)):
            path = os.path.join(dirpath, name)
            os.utime(path, ns=(mtime, mtime + offset * 1_000_001), follow_symlinks=False)


def test_export_import_round_trip_is_exact(tmp_path: Path, make_mount) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    first, second = tmp_path / "first", tmp_path / "second"
    ok("import", src, "--layout", "triton", "--store", first, "--device-class", CLASS)
    archive = tmp_path / "cache.tar.zst"
    assert "exported" in ok("export", "--device-class", CLASS, "-o", archive, "--store", first)

    # The archive's own class is the default.
    assert f"into {CLASS}:" in ok("import", archive, "--store", second)
    assert_fsck_clean(first)
    assert_fsck_clean(second)

    # Exports are deterministic, to stdout too: a re-export of the copy is the same bytes.
    again = subprocess.run(
        [sys.executable, "-m", "mithrilfs", "export", "--device-class", CLASS, "-o", "-"]
        + ["--store", str(second)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert again.stdout == archive.read_bytes()

    mount = make_mount("--device-class", CLASS, store=second)
    expected, copied = snapshot(src), snapshot(mount / "triton")
    assert b"k\xff\xfe-dir/n\xe9e.bin" in copied
    assert copied[b"key1/link.so"][2] == b"kernel.so"
    assert copied == expected


def test_import_detects_an_archive_by_magic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    first, second = tmp_path / "first", tmp_path / "second"
    ok("import", src, "--layout", "inductor", "--store", first, "--device-class", CLASS)
    archive = tmp_path / "no-suffix.bin"
    ok("export", "--device-class", CLASS, "-o", archive, "--store", first)
    assert transfer.is_archive(archive)
    ok("import", archive, "--store", second, "--device-class", "cpu-other")
    assert "cpu-other" in ok("classes", "--store", second)
    assert_fsck_clean(second)


def test_hard_links_special_nodes_and_xattrs_survive_export_and_import(
    tmp_path: Path,
    make_mount,
) -> None:
    """Hard links come back as one inode (nlink 3, one object); FIFOs and device nodes
    as tar's own types; user.* attributes in PAX records; sockets are skipped, counted."""
    origin = make_mount("--device-class", CLASS, "--xattrs", name="origin")
    key = origin / "triton" / "key"
    key.mkdir()
    (key / "a.bin").write_bytes(b"linked content " * 1000)
    os.link(key / "a.bin", key / "b.bin")
    (origin / "triton" / "other").mkdir()
    os.link(key / "a.bin", origin / "triton" / "other" / "c.bin")
    os.symlink("a.bin", key / "s")
    os.link(key / "s", key / "s2", follow_symlinks=False)
    os.mkfifo(key / "fifo", 0o640)
    os.mknod(key / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(key / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 300))
    os.mknod(key / "sock", stat.S_IFSOCK | 0o600)
    os.setxattr(key / "a.bin", "user.origin", b"\xff\x00binary")
    os.setxattr(key, "user.kind", b"entry")
    origin.stop()

    archive = tmp_path / "nodes.tar.zst"
    out = ok("export", "--device-class", CLASS, "-o", archive, "--store", origin.store)
    assert "left out 4 FIFOs, sockets and device nodes" in out, out  # by default
    out = ok(
        "export", "--special-nodes", "--device-class", CLASS, "-o", archive, "--store", origin.store
    )
    assert "left out 1 sockets" in out, out
    out = ok("import", archive, "--store", tmp_path / "copy")
    assert "3 hard links" in out, out
    assert "3 FIFOs and device nodes" in out, out

    copy = make_mount("--device-class", CLASS, "--xattrs", name="copy", store=tmp_path / "copy")
    key = copy / "triton" / "key"
    names = (key / "a.bin", key / "b.bin", copy / "triton" / "other" / "c.bin")
    inodes = {os.stat(path).st_ino for path in names}
    assert len(inodes) == 1
    assert os.stat(key / "a.bin").st_nlink == 3
    assert all(path.read_bytes() == b"linked content " * 1000 for path in names)
    objects = set(file_objects(tmp_path / "copy").values())
    assert len(objects) == 1  # one inode, one object, referenced once
    assert objects.pop()[1] == 1
    fifo, null, loop = (os.lstat(key / name) for name in ("fifo", "null", "loop"))
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == 0o640
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(loop.st_mode)
    assert loop.st_rdev == os.makedev(7, 300)
    assert not os.path.lexists(key / "sock")
    assert os.lstat(key / "s").st_ino == os.lstat(key / "s2").st_ino
    assert os.readlink(key / "s2") == "a.bin"
    assert os.getxattr(key / "b.bin", "user.origin") == b"\xff\x00binary"
    assert os.getxattr(key, "user.kind") == b"entry"

    # Imported again: every name is already there, as it was.
    copy.stop()
    out = ok("import", archive, "--store", tmp_path / "copy")
    assert "0 new objects, 1 deduplicated, 8 unchanged, 0 replaced" in out, out


def test_a_directory_import_keeps_hard_links_and_user_xattrs(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    (src / "key").mkdir(parents=True)
    (src / "key" / "a.so").write_bytes(b"shared inode")
    os.link(src / "key" / "a.so", src / "b.so")
    os.setxattr(src / "key" / "a.so", "user.built-by", b"nvcc")
    os.setxattr(src / "key", "user.kind", b"entry")
    out = ok("import", src, "--layout", "triton", "--store", store, "--device-class", CLASS)
    assert "1 hard links" in out, out
    db = sqlite3.connect(store / "mithril.db")
    try:
        linked = db.execute(
            "SELECT e.inode, i.nlink FROM entries e JOIN inodes i ON i.id = e.inode "
            "WHERE e.name IN (?, ?)",
            (b"a.so", b"b.so"),
        ).fetchall()
        attributes = db.execute("SELECT name, value FROM xattrs ORDER BY name").fetchall()
    finally:
        db.close()
    assert len(linked) == 2
    assert linked[0] == linked[1]
    assert linked[0][1] == 2
    assert attributes == [(b"user.built-by", b"nvcc"), (b"user.kind", b"entry")]
    assert_fsck_clean(store)

    # The same again: the link is already there; a file that stops being a link
    # gets an inode of its own and leaves the other name's content alone.
    os.unlink(src / "b.so")
    (src / "b.so").write_bytes(b"a file of its own")
    out = ok("import", src, "--layout", "triton", "--store", store, "--device-class", CLASS)
    assert "1 replaced" in out, out
    objects = file_objects(store)
    assert objects[b"a.so"][0] != objects[b"b.so"][0]
    assert_fsck_clean(store)


# -- dedup and the rules for names that exist ---------------------------------------------


def file_objects(store: Path) -> dict[bytes, tuple[bytes, int]]:
    """Each file's name -> (object digest, refcount), read from the index."""
    db = sqlite3.connect(store / "mithril.db")
    try:
        rows = db.execute(
            "SELECT e.name, i.object, o.refcount FROM entries e JOIN inodes i ON i.id = e.inode "
            "JOIN objects o ON o.hash = i.object WHERE i.object IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return {name: (digest, refcount) for name, digest, refcount in rows}


def object_files(store: Path) -> set[str]:
    return {p.name for p in (store / "objects").rglob("*") if p.is_file()}


def test_import_dedups_and_replaces_only_changed_files(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    (src / "one").write_bytes(b"same bytes")
    (src / "two").write_bytes(b"same bytes")
    (src / "three").write_bytes(b"other bytes")
    args = ("--layout", "triton", "--store", store, "--device-class", CLASS)
    summary = ok("import", src, *args)
    assert "2 new objects, 1 deduplicated" in summary

    objects = file_objects(store)
    assert objects[b"one"] == objects[b"two"]
    assert objects[b"one"][1] == 2  # one object, referenced twice
    assert object_files(store) == {
        objects[b"one"][0].hex(),
        objects[b"three"][0].hex(),
        EMPTY_DIGEST.hex(),
    }

    # Same content again: nothing changes.
    assert "0 new objects, 3 deduplicated, 3 unchanged, 0 replaced" in ok("import", src, *args)
    # Different content under an existing name replaces it; the old object goes.
    old_three = objects[b"three"][0]
    (src / "three").write_bytes(b"new bytes")
    assert "1 unchanged" not in ok("import", src, *args)
    assert file_objects(store)[b"three"][0] != old_three
    assert old_three.hex() not in object_files(store)
    assert_fsck_clean(store)


def test_import_refuses_a_directory_over_a_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (first / "x").write_bytes(b"a file")
    (second / "x").mkdir(parents=True)
    (second / "x" / "inside").write_bytes(b"b")
    args = ("--layout", "triton", "--store", store, "--device-class", CLASS)
    ok("import", first, *args)
    before = store_state(store)
    line = assert_one_line_error(mithrilfs("import", second, *args))
    assert "is not a directory in the store" in line
    assert store_state(store) == before
    assert_fsck_clean(store)


# -- bad input -------------------------------------------------------------------------------


def test_bad_archives_leave_the_store_unchanged(tmp_path: Path) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
    args = ("--store", store, "--device-class", CLASS)
    ok("import", src, "--layout", "inductor", *args)
    good = tmp_path / "good.tar.zst"
    ok("export", "-o", good, *args)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = {
        "half.tar.zst": data[: len(data) // 2],
        "no-checksum.tar.zst": data[:-3],
        "flipped.tar.zst": bytes(flipped),
        "garbage.tar.zst": b"not an archive at all",
        "empty.tar.zst": b"",
        "not-an-export.tar.zst": plain_tar_zst(),
    }
    before = store_state(store)
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        # Into a new class, so that a wrong success would add rows, not only dedup.
        result = mithrilfs("import", path, "--store", store, "--device-class", "cpu-new")
        line = assert_one_line_error(result)
        assert "valid mithrilfs export" in line, (name, line)
        assert store_state(store) == before, name
    assert_fsck_clean(store)


def plain_tar_zst() -> bytes:
    """A valid .tar.zst that is not a mithrilfs export."""
    import tarfile

    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("import", "{tmp}/missing", "--layout", "triton"), "does not exist"),
        (("import", "{tmp}/src", "--layout", "pallas"), "--layout must be one of"),
        (("import", "{tmp}/src"), "--layout must be one of"),
        (("import", "{tmp}/src/a", "--layout", "triton"), "is not a directory or a .tar.zst"),
        (("import", "{tmp}/src", "--layout", "triton", "--device-class", "gpu!"), "invalid"),
        (("export", "--device-class", "cpu-absent", "-o", "{tmp}/x.tar.zst"), "no device class"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"a")
    store = tmp_path / "store"
    ok("import", tmp_path / "src", "--layout", "triton", "--store", store, "--device-class", CLASS)
    before = store_state(store)
    filled = [arg.format(tmp=tmp_path) for arg in args]
    line = assert_one_line_error(mithrilfs(*filled, "--store", store))
    assert expected in line
    assert store_state(store) == before
    assert not (tmp_path / "x.tar.zst").exists()
    assert_fsck_clean(store)


def test_import_into_a_mounted_store_points_at_the_mount(tmp_path: Path, mount) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    result = mithrilfs("import", src, "--layout", "triton", "--store", mount.store)
    line = assert_one_line_error(result)
    assert "in use by mithrilfs pid" in line
    assert str(mount.mountpoint) in line
    assert "unmount" in line
    line = assert_one_line_error(mithrilfs("export", "-o", tmp_path / "x", "--store", mount.store))
    assert str(mount.mountpoint) in line


# -- progress -------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_only_on_a_tty(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 3000)
    tty = FakeTTY()
    report = transfer.import_directory(
        tmp_path / "store", src, "triton", CLASS, progress_stream=tty
    )
    assert report.files == 1
    drawn = tty.getvalue()
    assert "\r" in drawn
    assert "1/1 entries" in drawn
    assert "100%" in drawn

    quiet = io.StringIO()
    transfer.import_directory(tmp_path / "store", src, "triton", CLASS, progress_stream=quiet)
    assert quiet.getvalue() == ""
    assert_fsck_clean(tmp_path / "store")


def export_with(members: list[tuple[Any, bytes]], device_class: str = "cpu-new") -> bytes:
    """A .tar.zst with a valid export header, then *members* as (TarInfo, content)."""
    import tarfile

    import zstandard

    raw = io.BytesIO()
    sizes = sum(len(data) for info, data in members if info.isreg())
    header = transfer.ExportMeta(device_class, len(members), sizes, "test").to_json()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(transfer.EXPORT_META_NAME)
        info.size = len(header)
        tar.addfile(info, io.BytesIO(header))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue())


def member(name: str, data: bytes = b"", **fields: Any) -> tuple[Any, bytes]:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


XATTR = "SCHILY.xattr."
XATTR_USER = XATTR + "user.origin"


def hostile_archives() -> dict[str, bytes]:
    import tarfile

    def pax_mtime(text: str) -> tuple[Any, bytes]:
        # A good file first, so that the bad one comes after something was staged.
        return member("triton/k/b.bin", b"b" * 3000, pax_headers={"mtime": text})

    good = member("triton/k/a.bin", b"a" * 5000)
    return {
        "mtime-beyond-int64": export_with([good, pax_mtime("1" + "0" * 30)]),
        "mtime-2-to-the-63": export_with([good, pax_mtime(str(1 << 63))]),
        "mtime-hugely-negative": export_with([good, pax_mtime("-" + "9" * 25)]),
        "mtime-thousands-of-digits": export_with([good, pax_mtime("7" * 5000)]),
        "mtime-unicode-digits": export_with([good, pax_mtime("\u00b2\u00b3")]),
        "ustar-mtime-beyond-int64": export_with(
            [good, member("triton/k/c.bin", b"c", mtime=1 << 62)]
        ),
        "symlink-target-too-long": export_with(
            [good, member("triton/k/l", type=tarfile.SYMTYPE, linkname="x" * 5000)]
        ),
        "dot-dot-name": export_with([good, member("triton/../../etc/passwd", b"x")]),
        "hard-link-to-a-missing-name": export_with(
            [good, member("triton/k/h", type=tarfile.LNKTYPE, linkname="triton/k/none")]
        ),
        "hard-link-before-its-file": export_with(
            [member("triton/k/h", type=tarfile.LNKTYPE, linkname="triton/k/a.bin"), good]
        ),
        "hard-link-to-a-directory": export_with(
            [good, member("triton/k/h", type=tarfile.LNKTYPE, linkname="triton/k")]
        ),
        "hard-link-escaping": export_with(
            [good, member("triton/k/h", type=tarfile.LNKTYPE, linkname="../../etc/passwd")]
        ),
        "hard-link-whose-file-is-replaced": export_with(
            [
                good,
                member("triton/k/h", type=tarfile.LNKTYPE, linkname="triton/k/a.bin"),
                member("triton/k/a.bin", type=tarfile.DIRTYPE),
            ]
        ),
        "xattr-outside-user": export_with(
            [good, member("triton/k/c.bin", b"c", pax_headers={XATTR + "security.capability": "x"})]
        ),
        "xattr-on-a-symlink": export_with(
            [
                good,
                member(
                    "triton/k/l",
                    type=tarfile.SYMTYPE,
                    linkname="a.bin",
                    pax_headers={XATTR_USER: "v"},
                ),
            ]
        ),
        "xattr-value-over-64-KiB": export_with(
            [good, member("triton/k/c.bin", b"c", pax_headers={XATTR_USER: "v" * (65 * 1024)})]
        ),
        "socket-type": export_with([good, member("triton/k/s", type=b"s")]),
    }


@pytest.mark.parametrize("name", sorted(hostile_archives()))
def test_a_hostile_archive_never_changes_the_store(tmp_path: Path, name: str) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    (src / "kept").write_bytes(b"already here")
    ok("import", src, "--layout", "triton", "--store", store, "--device-class", CLASS)
    before = store_state(store)
    archive = tmp_path / f"{name}.tar.zst"
    archive.write_bytes(hostile_archives()[name])
    line = assert_one_line_error(mithrilfs("import", archive, "--store", store))
    assert "valid mithrilfs export" in line, line
    assert store_state(store) == before
    assert_fsck_clean(store)


def test_imports_drop_setuid_and_setgid_bits(tmp_path: Path) -> None:
    store = tmp_path / "store"
    archive = tmp_path / "suid.tar.zst"
    archive.write_bytes(
        export_with(
            [
                member("triton/k/run.so", b"\x7fELF", mode=0o6755),
                member("triton/k/sticky", b"s", mode=0o1644),
            ],
            device_class=CLASS,
        )
    )
    ok("import", archive, "--store", store)
    src = tmp_path / "src"
    src.mkdir()
    suid = src / "tool"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    ok("import", src, "--layout", "inductor", "--store", store, "--device-class", CLASS)
    db = sqlite3.connect(store / "mithril.db")
    try:
        modes = dict(
            db.execute(
                "SELECT e.name, i.mode FROM entries e JOIN inodes i ON i.id = e.inode "
                "WHERE e.name IN (?, ?, ?)",
                (b"run.so", b"sticky", b"tool"),
            ).fetchall()
        )
    finally:
        db.close()
    assert {name: stat.S_IMODE(mode) for name, mode in modes.items()} == {
        b"run.so": 0o755,
        b"sticky": 0o1644,
        b"tool": 0o755,
    }
    assert_fsck_clean(store)
