"""The index on its own: real SQLite in a temporary directory, no mount, no root.

Each test builds a store directory (index and objects) and drives `Index`
through its named methods; a store left behind by a test that changes it is
checked by fsck, as the mount tests are.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from mithrilfs import classes, fsck, stats
from mithrilfs.errors import FsError
from mithrilfs.index import SUPER_ROOT, Index, IndexReader, Inode
from mithrilfs.layouts import PRIVATE_ROOT_MODE, USERS_DIR, USERS_MODE, EntryKey
from mithrilfs.store import EMPTY_DIGEST, ContentStore

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
TRITON_KEY = b"Q5ZJYHJ6XV6VUIG5MW2H6GMR5QTWJ4O3QWRK6KN5TWMOQFQ6ZN2A"


@dataclass
class Store:
    index: Index
    content: ContentStore
    root: int  # the class root, as a mount serves it

    def mkdir(self, parent: int, name: bytes, mode: int = DIR, uid: int = 0) -> Inode:
        with self.index.transaction():
            return self.index.make_node(parent, name, mode, uid, uid)

    def makedirs(self, path: bytes, start: int | None = None) -> Inode:
        node = self.index.get(self.root if start is None else start)
        for name in path.split(b"/"):
            node = self.index.ensure_dir(node.id, name, 0o755, 0, 0)
        return node

    def write(self, parent: int, name: bytes, data: bytes) -> Inode:
        """A file named *name* in *parent* holding *data*, its object stored first."""
        node = self.index.lookup(parent, name)
        if node is None:
            with self.index.transaction():
                node = self.index.make_node(parent, name, FILE, 0, 0)
        digest = blake3.blake3(data).digest()
        path, fd = self.content.new_staging(node.id)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.content.publish(path, digest)
        unused = self.index.set_content(node.id, digest, len(data), node.mtime_ns)
        if unused is not None:
            self.content.delete(unused)
        return self.index.get(node.id)

    def refcount(self, digest: bytes) -> int | None:
        for row_digest, _size, refcount in self.index.object_rows():
            if row_digest == digest:
                return refcount
        return None

    def check(self) -> fsck.Report:
        return fsck.check(self.index, self.content)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    content = ContentStore(tmp_path)
    content.create_dirs()
    content.ensure_empty_object()
    index = Index.open(tmp_path / "mithril.db")
    index.ensure_empty_object()
    class_root = index.ensure_dir(SUPER_ROOT, b"cuda-sm90", 0o755, 0, 0)
    built = Store(index, content, class_root.id)
    yield built
    # What a daemon does when the kernel forgets the inodes it still holds.
    for ino in index.unlinked_inodes():
        unused = index.free_inode(ino)
        if unused is not None:
            content.delete(unused)
    report = built.check()
    index.close()
    assert report.clean, [problem.detail for problem in report.problems]


def names(index: Index, parent: int) -> list[bytes]:
    return [name for _id, name, _node in index.readdir(parent, -1, 1000)]


# -- the namespace -------------------------------------------------------------


def test_make_lookup_and_list_names(store: Store) -> None:
    top = store.mkdir(store.root, b"inductor")
    store.write(top.id, b"b.py", b"print(1)\n")
    store.write(top.id, b"a.py", b"print(2)\n")
    assert names(store.index, top.id) == [b"b.py", b"a.py"]  # creation order: a stable cursor
    found = store.index.lookup(top.id, b"a.py")
    assert found is not None
    assert found.is_file
    assert found.size == 9
    assert store.index.lookup(top.id, b"missing") is None
    assert store.index.get(top.id).nlink == 2
    with pytest.raises(FsError) as exists:
        store.mkdir(top.id, b"a.py")
    assert exists.value.errno == errno.EEXIST


def test_bad_names_are_refused(store: Store) -> None:
    for name, code in [
        (b"", errno.EINVAL),
        (b"a/b", errno.EINVAL),
        (b"x" * 256, errno.ENAMETOOLONG),
    ]:
        with pytest.raises(FsError) as refused:
            store.mkdir(store.root, name)
        assert refused.value.errno == code


def test_unlink_keeps_the_inode_until_it_is_freed(store: Store) -> None:
    node = store.write(store.root, b"f", b"content")
    assert node.object is not None
    store.index.unlink(store.root, b"f")
    assert store.index.lookup(store.root, b"f") is None
    assert store.index.get(node.id).nlink == 0
    assert store.index.unlinked_inodes() == [node.id]
    assert store.index.free_inode(node.id) == node.object  # its last reference
    store.content.delete(node.object)
    assert store.index.unlinked_inodes() == []


def test_rmdir_refuses_a_directory_with_names(store: Store) -> None:
    top = store.mkdir(store.root, b"d")
    store.mkdir(top.id, b"sub")
    with pytest.raises(FsError) as refused:
        store.index.rmdir(store.root, b"d")
    assert refused.value.errno == errno.ENOTEMPTY
    store.index.rmdir(top.id, b"sub")
    store.index.rmdir(store.root, b"d")
    assert store.index.lookup(store.root, b"d") is None


def test_rename_replaces_and_refuses_a_move_into_its_own_subtree(store: Store) -> None:
    outer = store.makedirs(b"a/b/c")
    a = store.index.lookup(store.root, b"a")
    assert a is not None
    with pytest.raises(FsError) as inside:
        store.index.rename(store.root, b"a", outer.id, b"a", 0)
    assert inside.value.errno == errno.EINVAL
    old = store.write(store.root, b"target", b"old")
    store.write(store.root, b"new", b"new")
    replaced = store.index.rename(store.root, b"new", store.root, b"target", 0)
    assert replaced is not None
    assert replaced.id == old.id
    assert replaced.object is not None
    assert store.index.free_inode(old.id) == replaced.object
    store.content.delete(replaced.object)
    moved = store.index.lookup(store.root, b"target")
    assert moved is not None
    assert moved.size == 3


def test_names_in_a_directory_and_by_prefix(store: Store) -> None:
    code = store.makedirs(b"inductor/ab")
    for name in (b"cabc.so", b"cabc.py", b"cabd.py", b"cab"):
        store.write(code.id, name, name)
    assert [name for name, _ino in store.index.names_in(code.id)] == [
        b"cab",
        b"cabc.py",
        b"cabc.so",
        b"cabd.py",
    ]
    stem = store.index.names_with_prefix(code.id, b"cabc.")
    assert [name for name, _ino in stem] == [b"cabc.py", b"cabc.so"]
    assert len(store.index.names_with_prefix(code.id, b"cab", limit=1)) == 1
    with pytest.raises(ValueError, match="no range"):
        store.index.names_with_prefix(code.id, b"")


def test_paths_climb_to_the_class_root(store: Store) -> None:
    deep = store.makedirs(b"inductor/fxgraph/ab")
    path, inodes = store.index.dir_path(deep.id)
    assert path == [b"inductor", b"fxgraph", b"ab"]
    assert inodes[-1] == deep.id
    assert store.index.class_of(deep.id) == b"cuda-sm90"
    assert store.index.tree_path(deep.id) == ("shared", [b"inductor", b"fxgraph", b"ab"])


# -- refcounts and objects -------------------------------------------------------


def test_identical_content_is_one_object_with_one_reference_per_file(store: Store) -> None:
    first = store.write(store.root, b"one", b"same bytes")
    second = store.write(store.root, b"two", b"same bytes")
    assert first.object == second.object
    assert first.object is not None
    assert store.refcount(first.object) == 2
    assert store.index.object_count == 1
    assert store.index.stored_bytes == len(b"same bytes")
    assert store.index.logical_bytes == 2 * len(b"same bytes")
    store.write(store.root, b"one", b"other bytes")
    assert store.refcount(first.object) == 1
    assert store.index.object_references()[first.object] == 1


def test_a_new_file_refers_to_the_empty_object(store: Store) -> None:
    with store.index.transaction():
        node = store.index.make_node(store.root, b"empty", FILE, 0, 0)
    assert node.object == EMPTY_DIGEST
    assert store.refcount(EMPTY_DIGEST) == 1
    assert store.index.object_count == 0  # the empty object is not counted


# -- cache entries ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [EntryKey("dir", 12), EntryKey("stem", 7, b"cabc1234"), EntryKey("file", 99)],
)
def test_entry_keys_round_trip(key: EntryKey) -> None:
    assert EntryKey.decode(key.encode()) == key


def test_entry_keys_keep_their_stored_form() -> None:
    # Stores written before the key type exist: the bytes must not change.
    assert EntryKey("dir", 12).encode() == b"d12"
    assert EntryKey("stem", 7, b"cabc").encode() == b"s7/cabc"
    assert EntryKey("file", 99).encode() == b"f99"


@pytest.mark.parametrize("raw", [b"", b"x12", b"d", b"dab", b"s7", b"s7/", b"f9/x", b"d-1"])
def test_malformed_entry_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a cache entry key"):
        EntryKey.decode(raw)


def test_files_are_placed_in_the_entry_their_path_says(store: Store) -> None:
    key_dir = store.makedirs(b"triton/" + TRITON_KEY)
    kernel = store.write(key_dir.id, b"add_kernel.cubin", b"cubin")
    code = store.makedirs(b"inductor/ab")
    stem_file = store.write(code.id, b"cabc.py", b"source")
    store.write(code.id, b"cabc.so", b"shared object")
    loose = store.write(store.root, b"notes.txt", b"loose")
    table = store.index.entry_table()
    assert kernel.entry is not None
    assert stem_file.entry is not None
    assert loose.entry is not None
    assert table[kernel.entry][0] == EntryKey("dir", key_dir.id)
    assert table[stem_file.entry][0] == EntryKey("stem", code.id, b"cabc")
    assert table[loose.entry][0] == EntryKey("file", loose.id)
    assert len(store.index.entry_files(stem_file.entry)) == 2
    assert store.index.entry_location(stem_file.entry) == (b"cuda-sm90", b"inductor/ab/cabc.*")
    assert store.index.entry_location(kernel.entry) == (b"cuda-sm90", b"triton/" + TRITON_KEY)


def test_a_triton_entry_with_a_tmp_directory_is_in_progress(store: Store) -> None:
    key_dir = store.makedirs(b"triton/" + TRITON_KEY)
    kernel = store.write(key_dir.id, b"add_kernel.cubin", b"cubin")
    assert kernel.entry is not None
    assert not store.index.entry_in_progress(kernel.entry)
    store.mkdir(key_dir.id, b"tmp.pid_42_abc")
    assert store.index.entry_in_progress(kernel.entry)
    store.index.rmdir(key_dir.id, b"tmp.pid_42_abc")
    assert not store.index.entry_in_progress(kernel.entry)


def test_evict_entry_removes_a_directory_entry_whole(store: Store) -> None:
    key_dir = store.makedirs(b"triton/" + TRITON_KEY)
    grp = store.write(key_dir.id, b"__grp__add_kernel.json", b"{}")
    cubin = store.write(key_dir.id, b"add_kernel.cubin", b"kernel code")
    kept = store.write(store.root, b"kept", b"kernel code")  # shares the cubin's object
    assert grp.entry is not None
    assert cubin.object is not None
    evicted = store.index.evict_entry(grp.entry, held=lambda ino: ino == cubin.id)
    removed = {name for _parent, name, _ino in evicted.names}
    assert removed == {TRITON_KEY, b"__grp__add_kernel.json", b"add_kernel.cubin"}
    assert evicted.names[0][1] == TRITON_KEY  # parents first
    assert evicted.held == [cubin.id]
    assert evicted.unused_objects == [grp.object]  # the cubin's object is still used
    for digest in evicted.unused_objects:
        store.content.delete(digest)
    assert store.index.entry_key(grp.entry) is None
    assert store.refcount(cubin.object) == 1
    assert store.index.lookup(store.root, b"kept") == kept
    assert store.index.free_inode(cubin.id) is None
    triton = store.index.lookup(store.root, b"triton")
    assert triton is not None
    assert triton.nlink == 2


def test_recency_orders_the_victims(store: Store) -> None:
    first = store.write(store.root, b"first", b"1")
    second = store.write(store.root, b"second", b"2")
    assert first.entry is not None
    assert second.entry is not None
    store.index.touch_entries([(first.entry, 1 << 62)])
    by_age = [entry_id for _last_read, entry_id in store.index.entries_by_age(10)]
    assert by_age == [second.entry, first.entry]
    assert store.index.entries_by_age(10, read_before=1 << 62) == [
        (store.index.entry_table()[second.entry][2], second.entry)
    ]


# -- trees: clones of the shared tree ------------------------------------------------


def test_clone_copies_a_subtree_sharing_its_objects(store: Store) -> None:
    key_dir = store.makedirs(b"triton/" + TRITON_KEY)
    cubin = store.write(key_dir.id, b"add_kernel.cubin", b"cubin")
    store.mkdir(key_dir.id, b"tmp.pid_1_x")  # transient: stays behind
    users = store.mkdir(store.root, USERS_DIR, stat.S_IFDIR | USERS_MODE)
    private = store.mkdir(users.id, b"1000", stat.S_IFDIR | PRIVATE_ROOT_MODE, uid=1000)
    triton = store.mkdir(private.id, b"triton", uid=1000)
    with store.index.transaction():
        copy = store.index.clone(
            triton.id, TRITON_KEY, key_dir, 1000, 1000, whole=True, skip=lambda _n: False
        )
    assert names(store.index, copy.id) == [b"add_kernel.cubin"]
    copied = store.index.lookup(copy.id, b"add_kernel.cubin")
    assert copied is not None
    assert copied.id != cubin.id
    assert copied.object == cubin.object
    assert copied.uid == 1000
    assert cubin.object is not None
    assert store.refcount(cubin.object) == 2
    assert store.index.private_roots(store.root) == [(b"1000", private.id)]
    assert store.index.tree_path(copy.id) == ("1000", [b"triton", TRITON_KEY])
    assert copied.entry is not None
    assert copied.entry != cubin.entry
    store.index.rmdir(key_dir.id, b"tmp.pid_1_x")


# -- usage, counters and the read-only reader ---------------------------------------------


def test_usage_per_class_and_per_tree(store: Store, tmp_path: Path) -> None:
    store.write(store.makedirs(b"inductor/ab").id, b"cabc.py", b"12345")
    users = store.mkdir(store.root, USERS_DIR, stat.S_IFDIR | USERS_MODE)
    private = store.mkdir(users.id, b"1000", stat.S_IFDIR | PRIVATE_ROOT_MODE, uid=1000)
    mine = store.write(private.id, b"mine", b"123")
    with store.index.transaction():
        store.index.link(mine.id, private.id, b"again")  # a hard link counts once
    assert store.index.file_usage(private.id) == (1, 3, 1)
    assert store.index.object_usage(store.root) == (2, 8)
    assert [(c.name, c.files, c.bytes) for c in classes.class_usage(store.index)] == [
        ("cuda-sm90", 2, 8)
    ]
    usage = classes.tree_usage(store.index, store.root)
    assert (usage.files, usage.logical_bytes, usage.objects, usage.entries) == (2, 8, 2, 2)
    assert stats.read_tree_usage(tmp_path / "mithril.db") == {"1000": (3, 1), "shared": (5, 1)}


def test_counters_survive_and_read_only_readers_see_them(store: Store, tmp_path: Path) -> None:
    store.index.save_counters([("opens_total", '{"layout": "triton"}', 3)], {"objects": 7})
    store.index.save_counters([("opens_total", '{"layout": "triton"}', 5)], {"objects": 8})
    assert store.index.load_counters() == [("opens_total", '{"layout": "triton"}', 5)]
    reader = IndexReader.open_read_only(tmp_path / "mithril.db")
    try:
        assert reader.saved_gauges() == [("objects", 8)]
        assert reader.class_roots() == [(b"cuda-sm90", store.root)]
        with pytest.raises(Exception, match="readonly"):
            reader.db.execute("DELETE FROM counters")
    finally:
        reader.close()
    saved = stats.read_saved(tmp_path / "mithril.db")
    assert saved.gauges == {"objects": 8}
    assert saved.counters == [("opens_total", {"layout": "triton"}, 5)]


# -- fsck through the index's named repairs -----------------------------------------------


def test_fsck_finds_and_repairs_what_the_index_methods_break(store: Store) -> None:
    node = store.write(store.root, b"f", b"data")
    assert node.object is not None
    store.index.set_xattr(node.id, b"user.a", b"1", 1 << 16)
    with store.index.transaction():
        store.index.set_refcount(node.object, 5)
        store.index.set_nlink(node.id, 3)
        store.index.drop_cache_entry(node.entry or 0)
        store.index.db.execute("DELETE FROM inodes WHERE id=?", (node.id,))
    report = store.check()
    kinds = sorted({problem.kind for problem in report.problems})
    assert kinds == ["refcount", "tree", "xattrs"]
    fsck.repair(report)
    assert store.check().clean
    assert store.index.lookup(store.root, b"f") is None


# -- remembered directory paths -------------------------------------------------


def _fresh_path(index: Index, directory: int) -> tuple[list[bytes], list[int]]:
    """dir_path as the upward walk computes it, nothing remembered."""
    reader = IndexReader(index.db)
    names: list[bytes] = []
    inodes: list[int] = []
    node = reader.get(directory)
    while True:
        parent = index.parent_of(node.id)
        if parent is None or parent == SUPER_ROOT:
            break
        name = next(n for n, ino in reader.names_in(parent) if ino == node.id)
        names.append(name)
        inodes.append(node.id)
        node = reader.get(parent)
    return names[::-1], inodes[::-1]


def test_paths_learnt_from_lookups_and_mkdirs_match_the_walk(store: Store) -> None:
    index = store.index
    assert index.lookup(SUPER_ROOT, b"cuda-sm90") is not None
    assert index.dir_path(store.root) == ([], []) == _fresh_path(index, store.root)
    top = store.mkdir(store.root, b"inductor")
    key = store.mkdir(top.id, b"ab")
    leaf = store.mkdir(key.id, b"abcdef")
    for node in (top, key, leaf):
        assert index.dir_path(node.id) == _fresh_path(index, node.id)
    # Moving a directory forgets what was learnt below it; lookups learn it again.
    other = store.mkdir(store.root, b"triton")
    index.rename(top.id, b"ab", other.id, b"cd", 0)
    moved = index.lookup(other.id, b"cd")
    assert moved is not None
    found = index.lookup(moved.id, b"abcdef")
    assert found is not None
    assert index.dir_path(found.id) == ([b"triton", b"cd", b"abcdef"], [other.id, key.id, leaf.id])
    assert index.dir_path(found.id) == _fresh_path(index, found.id)


def test_a_rolled_back_mkdir_leaves_no_path_for_its_id(store: Store) -> None:
    index = store.index
    index.dir_path(store.root)
    first = store.mkdir(store.root, b"inductor")
    index.dir_path(first.id)
    made: list[Inode] = []

    def failing_request() -> None:
        with index.transaction():
            made.append(index.make_node(first.id, b"doomed", DIR, 0, 0))
            raise RuntimeError("the request failed after its mkdir")

    with pytest.raises(RuntimeError):
        failing_request()
    doomed = made[0]
    # The id may be given out again, to a directory somewhere else.
    again = store.mkdir(store.root, b"triton")
    assert again.id == doomed.id  # SQLite reissues a rolled-back AUTOINCREMENT id
    assert index.dir_path(again.id) == ([b"triton"], [again.id])
    assert index.dir_path(again.id) == _fresh_path(index, again.id)


def test_changes_count_writes_not_reads(store: Store) -> None:
    index = store.index
    before = index.changes
    index.lookup(store.root, b"nothing")
    index.get(store.root)
    assert index.changes == before
    store.mkdir(store.root, b"inductor")
    assert index.changes > before
