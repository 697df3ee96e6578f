"""Several users on one node-wide mount: private trees, the shared tree, trusted writers.

Real users made for the session (useradd, prefix ``mtu``; userdel -r
afterwards, even when a test fails), one root mount with --allow-other per
test, every user's command run through ``setpriv``.  The model tested is
docs/security.md: each user writes only their own tree (``users/<name>``),
the shared tree (``triton/``, ``inductor/``) takes writes from trusted
writers only, and a private tree serves what the shared tree holds by
cloning it at first use.  The compiler tests at the end run real
triton.compile and torch.compile as those users, with an interpreter they
can execute.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from mithrilfs import fsck, hooks, layouts
from mithrilfs.cli import _parse_mount_options
from mithrilfs.errors import UserError
from mithrilfs.index import Index
from mithrilfs.repository import INDEX_NAME, Repository
from mithrilfs.tenancy import Trust
from tests.conftest import REPO, Mount, older_version_mount, run_cli, wait_for


@pytest.fixture
def open_mount(public_dir: Path, make_mount):
    """make_mount, with the mountpoint where every test user can reach it.

    public_dir comes first: set up before make_mount, it is torn down after
    the mounts are gone, when their mountpoints can be removed.
    """

    def start(*extra_args: str, **options: Any) -> Mount:
        mount: Mount = make_mount(*extra_args, where=public_dir, **options)
        return mount

    return start


USERS = ("mtu_a", "mtu_b", "mtu_t")
TRUST_GROUP = "mtu_g"
COMMAND_TIMEOUT = 60
DEADLINE = 30.0
DENIED = ("Permission denied", "Operation not permitted")


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int
    gid: int
    home: str

    def run(
        self, *command: str, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--init-groups",
                "--",
                *command,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            env=env if env is not None else {"PATH": "/usr/bin:/bin", "HOME": self.home},
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script)

    def ok(self, script: str) -> str:
        result = self.sh(script)
        assert result.returncode == 0, f"{self.name}: {script}\n{result.stderr}"
        return result.stdout

    def denied(self, script: str) -> None:
        result = self.sh(script)
        assert result.returncode != 0, f"{self.name} was allowed: {script}"
        assert any(word in result.stderr for word in DENIED), result.stderr


def _remove_account(name: str) -> None:
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


@pytest.fixture(scope="session")
def tenants() -> Iterator[dict[str, Tenant]]:
    """mtu_a, mtu_b and mtu_t (also in the group mtu_g), removed at the end."""
    for name in USERS:
        _remove_account(name)  # left over from a run that was killed
    subprocess.run(["groupdel", TRUST_GROUP], capture_output=True, check=False)
    try:
        subprocess.run(["groupadd", TRUST_GROUP], capture_output=True, check=True)
        for name in USERS:
            extra = ["-G", TRUST_GROUP] if name == "mtu_t" else []
            subprocess.run(
                ["useradd", "-m", "-s", "/bin/sh", *extra, name], capture_output=True, check=True
            )
        found = {}
        for name in USERS:
            entry = pwd.getpwnam(name)
            found[name] = Tenant(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
        yield found
    finally:
        for name in USERS:
            _remove_account(name)
            # inductor keeps its precompiled headers there whatever the cache dir is
            shutil.rmtree(Path(tempfile.gettempdir()) / f"torchinductor_{name}", ignore_errors=True)
        subprocess.run(["groupdel", TRUST_GROUP], capture_output=True, check=False)


# -- the trees and who may change them ---------------------------------------------


def private(mount: Mount, tenant: Tenant) -> Path:
    return mount.mountpoint / "users" / tenant.name


def test_private_tree_is_made_at_the_owners_first_lookup(open_mount, tenants) -> None:
    a, b = tenants["mtu_a"], tenants["mtu_b"]
    mount = open_mount("--allow-other")
    users = mount.mountpoint / "users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o711
    # Another user's name that does not exist yet is a miss, and stays one for
    # that user's own first lookup (the kernel caches no negative entry).
    assert b.sh(f"test -e {private(mount, a)}").returncode != 0
    a.ok(f"test -d {private(mount, a)}/triton && test -d {private(mount, a)}/inductor")
    root = private(mount, a).stat()
    assert (root.st_uid, stat.S_IMODE(root.st_mode)) == (a.uid, 0o700)
    assert sorted(os.listdir(private(mount, a))) == ["inductor", "triton"]
    assert not (users / "mtu_nobody_here").exists()
    b.denied(f"ls {users}")  # nobody but root lists whose trees exist
    b.denied(f"ls {private(mount, a)}")
    # Nobody (root included) makes, renames or removes names in users/ or a private root.
    for action in (
        lambda: (users / "planted").mkdir(),
        lambda: os.rename(private(mount, a), users / "other"),
        lambda: (private(mount, a) / "extra").mkdir(),
        lambda: os.rmdir(private(mount, a) / "triton"),
        lambda: os.chmod(private(mount, a), 0o777),
    ):
        with pytest.raises(PermissionError):
            action()
    a.denied(f"chmod 777 {private(mount, a)}")
    a.denied(f"rmdir {private(mount, a)}/inductor")


@pytest.mark.parametrize("trust", [None, "mtu_t", "@mtu_g"])
def test_shared_tree_takes_writes_only_from_trusted_writers(
    open_mount, tenants, trust: str | None
) -> None:
    a, t = tenants["mtu_a"], tenants["mtu_t"]
    mount = open_mount("--allow-other", *(["--trust", trust] if trust else []))
    root = mount.mountpoint
    key = mount / "triton" / "KEY"
    key.mkdir()
    (key / "k.so").write_bytes(b"root's kernel")
    # Root alone: the stored modes, enforced by the kernel too.  Non-root
    # writers trusted: group/other write shown, the daemon's check guards.
    shown = 0o755 if trust is None else 0o777
    assert stat.S_IMODE((mount / "triton").stat().st_mode) == shown
    assert stat.S_IMODE(key.stat().st_mode) == shown
    assert stat.S_IMODE((key / "k.so").stat().st_mode) == (0o644 if trust is None else 0o666)
    for script in (
        f"touch {root}/triton/planted",
        f"mkdir {root}/triton/PLANTED",
        f"echo evil > {key}/k.so",
        f"echo evil >> {key}/k.so",
        f"truncate -s 0 {key}/k.so",
        f"rm -f {key}/k.so",
        f"mv {key}/k.so {key}/moved",
        f"mv {key} {root}/triton/MOVED",
        f"ln -s /tmp/x {key}/link",
        f"mkdir -p {private(mount, a)}/triton/x && mv {private(mount, a)}/triton/x {key}/x",
        f"chmod 777 {key}/k.so",
    ):
        a.denied(script)
    assert (key / "k.so").read_bytes() == b"root's kernel"
    assert sorted(os.listdir(mount / "triton")) == ["KEY"]
    if trust is None:
        t.denied(f"mkdir {root}/triton/T")
        return
    # A trusted member writes, and what it makes belongs to the shared tree.
    t.ok(f"mkdir {root}/triton/T && echo t > {root}/triton/T/f && echo more >> {key}/k.so")
    made = (mount / "triton" / "T" / "f").stat()
    assert (made.st_uid, made.st_gid) == (0, 0)
    assert (key / "k.so").read_bytes() == b"root's kernelmore\n"
    t.ok(f"mv {root}/triton/T {root}/triton/T2 && rm {root}/triton/T2/f")


def test_another_user_cannot_touch_a_private_tree(open_mount, tenants) -> None:
    a, b = tenants["mtu_a"], tenants["mtu_b"]
    mount = open_mount("--allow-other")
    mine = private(mount, a) / "triton" / "KEY"
    a.ok(f"mkdir {mine} && printf mine > {mine}/k.so")
    b.ok(f"test -d {private(mount, b)}")
    for script in (
        f"ls {private(mount, a)}/triton",
        f"cat {mine}/k.so",
        f"echo evil > {mine}/k.so",
        f"rm -f {mine}/k.so",
        f"mv {mine}/k.so {mine}/other",
        f"mkdir {private(mount, a)}/triton/PLANTED",
        f"mv {private(mount, b)}/triton {private(mount, a)}/triton/x",
    ):
        b.denied(script)
    assert a.ok(f"cat {mine}/k.so") == "mine"


# -- the union: clone on first use ---------------------------------------------------


SHARED_FILES = {
    "triton/KEY/k.so": b"\x7fELF shared kernel" * 100,
    "triton/KEY/__grp__k.json": b'{"child_paths": {"k.so": ""}}',
    "inductor/fxgraph/ab/GRAPH/entry": b"pickled graph" * 50,
}


def populate_shared(mount: Mount) -> None:
    for relative, data in SHARED_FILES.items():
        path = mount / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def object_refcount(mount: Mount, data: bytes) -> int:
    """Refcount of the object holding *data*, read beside the running daemon."""
    db = sqlite3.connect(f"file:{mount.store / INDEX_NAME}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT refcount FROM objects WHERE hash=?", (blake3.blake3(data).digest(),)
        ).fetchone()
    finally:
        db.close()
    return int(row[0]) if row else 0


def tree_stats(mount: Mount) -> dict[str, Any]:
    result = run_cli("stats", "--store", mount.store, "--json")
    assert result.returncode == 0, result.stderr
    trees: dict[str, Any] = json.loads(result.stdout)["trees"]
    return trees


def test_private_tree_serves_shared_entries_as_its_own_clones(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    populate_shared(mount)
    view = private(mount, a)
    for relative, data in SHARED_FILES.items():
        assert a.ok(f"cat {view}/{relative}") == data.decode()
    # Clones: the user's, without group/other write, the same object (no copy).
    for relative in SHARED_FILES:
        st = (view / relative).stat()
        assert st.st_uid == a.uid
        assert stat.S_IMODE(st.st_mode) & 0o022 == 0
    assert object_refcount(mount, SHARED_FILES["triton/KEY/k.so"]) == 2
    # A whole entry came along, not just the name looked up.
    assert sorted(os.listdir(view / "triton" / "KEY")) == ["__grp__k.json", "k.so"]
    # The user changes their clone freely; the shared bytes never change.
    a.ok(f"printf changed > {view}/triton/KEY/k.so")
    assert (mount / "triton" / "KEY" / "k.so").read_bytes() == SHARED_FILES["triton/KEY/k.so"]
    assert a.ok(f"cat {view}/triton/KEY/k.so") == "changed"
    wait_for(
        lambda: tree_stats(mount).get("mtu_a", {}).get("from_shared", 0) >= 2,
        DEADLINE,
        "hits from the shared tree in stats",
    )
    trees = tree_stats(mount)
    assert trees["mtu_a"]["files"] == 3
    assert trees["shared"]["files"] == 3
    text = run_cli("stats", "--store", mount.store)
    assert text.returncode == 0, text.stderr
    assert "tree mtu_a" in text.stdout
    assert "from shared" in text.stdout


def test_metrics_break_usage_and_hits_down_per_tree(
    open_mount, tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_stats import fetch_metrics, free_port, parse_samples, sample

    a = tenants["mtu_a"]
    port = free_port()
    mount = open_mount(
        "--allow-other",
        "--metrics-listen",
        f"127.0.0.1:{port}",
        "--tree-usage-interval",
        "0.2",
    )
    populate_shared(mount)
    a.ok(f"cat {private(mount, a)}/triton/KEY/k.so > /dev/null")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_samples(fetch_metrics(port)[0])

    wait_for(
        lambda: sample(scrape(), "mithrilfs_tree_files", tree="mtu_a") == 2,
        DEADLINE,
        "the private tree's files in /metrics",
    )
    samples = scrape()
    assert sample(samples, "mithrilfs_tree_files", tree="shared") == 3
    size = len(SHARED_FILES["triton/KEY/k.so"]) + len(SHARED_FILES["triton/KEY/__grp__k.json"])
    assert sample(samples, "mithrilfs_tree_logical_bytes", tree="mtu_a") == size
    assert sample(samples, "mithrilfs_shared_hits_total", tree="mtu_a") >= 1
    assert sample(samples, "mithrilfs_lookups_total", tree="mtu_a", result="hit") >= 1
    assert sample(samples, "mithrilfs_opens_total", tree="mtu_a") >= 1


def test_listing_a_private_directory_shows_the_union(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    populate_shared(mount)
    (mount / "triton" / "tmp.pid_1_2").mkdir()  # transient: never cloned
    view = private(mount, a) / "triton"
    a.ok(f"mkdir {view}/OWN && printf own > {view}/OWN/f")
    assert a.ok(f"ls {view}").split() == ["KEY", "OWN"]
    assert a.ok(f"ls {view}/KEY").split() == ["__grp__k.json", "k.so"]
    # A directory above the entries is cloned empty; its names come on demand.
    assert a.ok(f"ls {private(mount, a)}/inductor/fxgraph/ab").split() == ["GRAPH"]
    assert sorted(os.listdir(mount / "triton")) == ["KEY", "tmp.pid_1_2"]


def test_unlink_and_rename_in_a_private_tree_over_shared_names(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    populate_shared(mount)
    view = private(mount, a) / "triton"
    shared_bytes = SHARED_FILES["triton/KEY/k.so"]
    a.ok(f"test -f {view}/KEY/k.so")
    # Unlink removes the user's copy; the shared name shows through again.
    a.ok(f"rm -r {view}/KEY")
    assert (mount / "triton" / "KEY" / "k.so").read_bytes() == shared_bytes
    assert a.ok(f"cat {view}/KEY/k.so") == shared_bytes.decode()
    # Rename moves the user's copy; the old name shows through again.
    a.ok(f"mv {view}/KEY {view}/MINE")
    assert a.ok(f"ls {view}").split() == ["KEY", "MINE"]
    assert a.ok(f"cat {view}/MINE/k.so") == shared_bytes.decode()
    assert sorted(os.listdir(mount / "triton")) == ["KEY"]
    # Names never move between trees.
    with pytest.raises(OSError, match="Invalid cross-device link") as raised:
        os.rename(view / "MINE", mount / "triton" / "MINE")
    assert raised.value.errno == errno.EXDEV


def test_a_name_new_in_the_shared_tree_reaches_a_view_that_missed_it(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    view = private(mount, a) / "triton"
    assert a.sh(f"test -e {view}/LATE").returncode != 0  # a negative entry, kept by the kernel
    (mount / "triton" / "LATE").mkdir()
    (mount / "triton" / "LATE" / "k.so").write_bytes(b"late")
    wait_for(
        lambda: a.sh(f"cat {view}/LATE/k.so").stdout == "late",
        DEADLINE,
        "the new shared name in the private view",
    )


def test_a_shared_file_being_written_is_cloned_only_once_closed(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    (mount / "inductor" / "ab").mkdir()
    view = private(mount, a) / "inductor" / "ab"
    with open(mount / "inductor" / "ab" / "cxyz.py", "wb") as writer:
        writer.write(b"half")
        writer.flush()
        assert a.sh(f"test -e {view}/cxyz.py").returncode != 0
        writer.write(b" and the rest")
    assert a.ok(f"cat {view}/cxyz.py") == "half and the rest"


# -- one cap over every tree -----------------------------------------------------------


def test_eviction_removes_whole_entries_from_every_tree(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other", "--cap", "3M")
    view = private(mount, a) / "triton"
    a.ok(f"test -d {view}")
    size = 200 * 1024
    entries: list[Path] = []
    for number in range(1, 5):  # oldest first, the trees interleaved
        own = view / f"A{number}"
        a.ok(f"mkdir {own} && for f in 1 2 3; do head -c {size} /dev/urandom > {own}/f$f; done")
        shared = mount / "triton" / f"K{number}"
        shared.mkdir()
        for f in (1, 2, 3):
            (shared / f"f{f}").write_bytes(os.urandom(size))
        entries += [own, shared]
    wait_for(
        lambda: not (view / "A1").exists() and not (mount / "triton" / "K1").exists(),
        DEADLINE,
        "the oldest entry of each tree to be evicted",
    )
    for entry in entries:
        if entry.exists():
            assert sorted(os.listdir(entry)) == ["f1", "f2", "f3"], entry
    assert entries[-1].exists()
    assert entries[-2].exists()
    st = os.statvfs(mount.mountpoint)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize <= 3 * 1024 * 1024


# -- mithrilfs env and the hook ------------------------------------------------------

# Inductor starts sys.executable again (its ISA probes): that must work for them too.
PROBE = (
    "import subprocess, sys, torch, triton, blake3, prometheus_client; "
    "subprocess.run([sys.executable, '-c', ''], check=True)"
)


@pytest.fixture(scope="session")
def tenant_python(tenants, user_python: Path) -> str:
    """conftest's interpreter for test users, checked as one of them."""
    usable = tenants["mtu_a"].run(str(user_python), "-c", PROBE)
    assert usable.returncode == 0, usable.stderr
    return str(user_python)


@pytest.fixture(scope="session")
def package_copy() -> Iterator[Path]:
    """The package and workloads where the test users can read them."""
    copy = Path(tempfile.mkdtemp(prefix="mithrilfs-tenant-src-", dir="/var/tmp"))
    try:
        shutil.copytree(REPO / "mithrilfs", copy / "mithrilfs")
        shutil.copytree(REPO / "tests" / "workloads", copy / "workloads")
        for directory, _dirs, files in os.walk(copy):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def env_paths(
    tenant: Tenant, python: str, source: Path, mount: Mount, *extra: str, **env: str
) -> dict[str, str]:
    result = tenant.run(
        python,
        "-m",
        "mithrilfs",
        "env",
        str(mount.mountpoint),
        *extra,
        env={"PATH": "/usr/bin:/bin", "HOME": tenant.home, "PYTHONPATH": str(source), **env},
    )
    assert result.returncode == 0, result.stderr
    pairs = (line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    return dict(pairs)


def test_env_and_the_hook_give_each_caller_their_tree(
    open_mount, tenants, tenant_python: str, package_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    python = tenant_python
    own = private(mount, a)
    assert env_paths(a, python, package_copy, mount) == {
        "TRITON_CACHE_DIR": f"{own}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{own}/inductor",
    }
    shared = env_paths(a, python, package_copy, mount, "--tree", "shared")
    assert shared["TRITON_CACHE_DIR"] == f"{mount.mountpoint}/triton"
    by_env = env_paths(a, python, package_copy, mount, MITHRILFS_TREE="shared")
    assert by_env == shared
    # Root (and the mount's owner) gets the shared tree, unless told otherwise.
    assert hooks.tree_root(str(mount.mountpoint)) == str(mount.mountpoint)
    assert hooks.tree_root(str(mount.mountpoint), "private") == str(
        mount.mountpoint / "users" / "root"
    )
    monkeypatch.setenv(hooks.TREE_ENV, "bogus")
    bad = run_cli("env", mount.mountpoint)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "unknown tree 'bogus'" in bad.stderr
    hooked = a.run(
        python,
        "-c",
        "import json, sys, mithrilfs.hooks as h; "
        "print(json.dumps([h.activate(sys.argv[1]), 'pyfuse3' in sys.modules]))",
        str(mount.mountpoint),
        env={"PATH": "/usr/bin:/bin", "HOME": a.home, "PYTHONPATH": str(package_copy)},
    )
    assert hooked.returncode == 0, hooked.stderr
    activated, fuse_loaded = json.loads(hooked.stdout)
    assert activated["TRITON_CACHE_DIR"] == f"{own}/triton"
    assert not fuse_loaded  # job processes need no FUSE bindings


# -- mount options, fsck ----------------------------------------------------------------


def test_trust_option_forms_and_refusals(tenants) -> None:
    t = tenants["mtu_t"]
    group = grp.getgrnam(TRUST_GROUP).gr_gid
    assert Trust.parse("mtu_t:@mtu_g", 0) == Trust(frozenset({0, t.uid}), frozenset({group}))
    assert Trust.parse("mtu_t,@mtu_g", 0) == Trust.parse("mtu_t:@mtu_g", 0)
    # The fstab form survives mount(8)'s split at commas.
    assert _parse_mount_options("allow_other,trust=mtu_t:@mtu_g,_netdev") == {
        "allow_other": "",
        "trust": "mtu_t:@mtu_g",
    }
    assert Trust.parse(None, 0).root_only
    assert not Trust.parse(None, t.uid).root_only  # a mount by an ordinary user
    with pytest.raises(UserError, match="no such user 'mtu_nobody'"):
        Trust.parse("mtu_nobody", 0)
    result = run_cli("mount", "/nonexistent-mnt", "--trust", "@mtu_no_group", "--foreground")
    assert result.returncode == 2
    assert result.stderr.strip() == "mithrilfs: --trust: no such group 'mtu_no_group'"


def test_fsck_checks_users_and_the_private_roots(open_mount, tenants) -> None:
    a = tenants["mtu_a"]
    mount = open_mount("--allow-other")
    a.ok(f"test -d {private(mount, a)}")
    mount.stop()
    repo = Repository.open(mount.store, create=False)
    try:
        index = repo.index
        (_name, class_root), *_ = index.class_roots()
        users = index.lookup(class_root, layouts.USERS_DIR)
        assert users is not None
        own = index.lookup(users.id, a.name.encode())
        assert own is not None
        with index.transaction():
            index.set_attrs(own.id, mode=stat.S_IFDIR | 0o755)
            index.set_attrs(users.id, mode=stat.S_IFDIR | 0o755)
            index.make_node(users.id, b"mtu_b", stat.S_IFDIR | 0o700, a.uid, a.gid)
        report = fsck.check(repo.index, repo.content)
        found = sorted(problem.detail for problem in report.problems)
        assert [p.kind for p in report.problems] == ["trees"] * 3, found
        assert any("owned by uid" in detail and "mtu_b" in detail for detail in found)
        fsck.repair(report)
        # The mode problems are repaired; the misowned tree is left to the operator.
        remaining = fsck.check(repo.index, repo.content).problems
        assert [p.detail for p in remaining] == [d for d in found if "owned by uid" in d], remaining
        with index.transaction():
            index.rmdir(users.id, b"mtu_b")
            index.free_inode(index.unlinked_inodes()[0])
    finally:
        repo.close()


def test_entries_in_private_trees_are_keyed_like_shared_ones(tmp_path: Path) -> None:
    index = Index.open(tmp_path / "index.db")
    try:
        with index.transaction():
            root = index.make_node(1, b"cuda-sm90", stat.S_IFDIR | 0o755, 0, 0)
            users = index.make_node(root.id, b"users", stat.S_IFDIR | 0o711, 0, 0)
            own = index.make_node(users.id, b"mtu_a", stat.S_IFDIR | 0o700, 1, 1)
            triton = index.make_node(own.id, b"triton", stat.S_IFDIR | 0o755, 1, 1)
            key = index.make_node(triton.id, b"KEY", stat.S_IFDIR | 0o755, 1, 1)
            first = index.make_node(key.id, b"k.so", stat.S_IFREG | 0o644, 1, 1)
            second = index.make_node(key.id, b"k.json", stat.S_IFREG | 0o644, 1, 1)
        assert first.entry is not None
        assert first.entry == second.entry
        assert index.entry_table()[first.entry][1] == key.id  # the key directory is the entry
        assert index.tree_path(key.id) == ("mtu_a", [b"triton", b"KEY"])
        assert index.tree_path(users.id) == (layouts.USERS_TREE, [])
    finally:
        index.close()
    assert layouts.split_tree([b"triton", b"K"]) == (0, layouts.SHARED_TREE)
    assert layouts.is_entry_root([b"inductor", b"fxgraph", b"ab", b"KEY"])
    assert not layouts.is_entry_root([b"inductor", b"fxgraph", b"ab"])
    assert layouts.is_transient(b"tmp.pid_1_2")
    assert layouts.is_transient(b"x.py.tmp")


# -- migration from the store format of the version before tenancy ----------------------

BEFORE_TENANCY = "d67190d"


def test_a_store_from_before_tenancy_serves_its_trees_as_the_shared_tree(
    open_mount, tenants, tmp_path: Path
) -> None:
    a = tenants["mtu_a"]
    store = tmp_path / "m-store"
    with older_version_mount(BEFORE_TENANCY, store, tmp_path, "--allow-other") as mountpoint:
        assert not (mountpoint / "users").exists()
        for relative, data in SHARED_FILES.items():
            path = mountpoint / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (mountpoint / "triton" / "KEY" / "link").symlink_to("k.so")
        (mountpoint / "inductor" / "fxgraph" / "ab").chmod(0o700)
        before = tree_snapshot(mountpoint)
    mount = open_mount("--allow-other", store=store)
    after = tree_snapshot(mount.mountpoint)
    assert after == before
    assert stat.S_IMODE((mount.mountpoint / "users").stat().st_mode) == 0o711
    assert (
        a.ok(f"cat {private(mount, a)}/triton/KEY/k.so") == SHARED_FILES["triton/KEY/k.so"].decode()
    )


def tree_snapshot(mountpoint: Path) -> dict[str, tuple[int, bytes]]:
    """(mode, content or link target) of everything in the shared tree's layouts."""
    found: dict[str, tuple[int, bytes]] = {}
    for layout in layouts.LAYOUT_ROOTS:
        for directory, dirs, files in os.walk(mountpoint / layout):
            for name in dirs + files:
                path = Path(directory, name)
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    body = os.readlink(path).encode()
                elif stat.S_ISREG(st.st_mode):
                    body = path.read_bytes()
                else:
                    body = b""
                found[str(path.relative_to(mountpoint))] = (st.st_mode, body)
    return found


# -- real compilers, as the users -------------------------------------------------------


def compiler_settings() -> dict[str, str]:
    """What the compiler tests set besides the cache directories (tests/test_compilers.py)."""
    from tests.test_compilers import cache_env

    paths = (hooks.TRITON_VAR, hooks.INDUCTOR_VAR)
    return {
        key: value
        for key, value in cache_env(Path("/")).items()
        if key.startswith(("TORCHINDUCTOR_", "TRITON_")) and key not in paths
    }


def compile_as(
    tenant: Tenant | None,
    python: str,
    source: Path,
    workload: str,
    cache: dict[str, str],
    *args: str,
) -> dict[str, Any]:
    """Run a workload in a fresh process (as *tenant*, or as root); its JSON result."""
    from tests.test_compilers import WORKLOAD_TIMEOUT

    env = {
        "PATH": f"{Path(python).parent}:/usr/bin:/bin",
        "HOME": tenant.home if tenant is not None else os.environ.get("HOME", "/root"),
        "PYTHONPATH": str(source),
        **compiler_settings(),
        **cache,
    }
    command = [python, str(source / "workloads" / workload), *args]
    if tenant is None:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=WORKLOAD_TIMEOUT, check=False
        )
    else:
        result = tenant.run(*command, env=env, timeout=WORKLOAD_TIMEOUT)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def triton_files(result: dict[str, Any], suffix: str) -> list[Path]:
    return [
        Path(os.path.normpath(Path(result["cache_dir"]) / relative))
        for relative in result["group_files"].values()
        if relative.endswith(suffix)
    ]


def fx_counts(result: dict[str, Any]) -> tuple[int, int]:
    counters = result["inductor"]
    return counters.get("fxgraph_cache_hit", 0), counters.get("fxgraph_cache_miss", 0)


@pytest.mark.compilers
def test_two_users_compile_through_one_mount_each_in_their_own_tree(
    open_mount, tenants, tenant_python: str, package_copy: Path
) -> None:
    a, b = tenants["mtu_a"], tenants["mtu_b"]
    mount = open_mount("--allow-other")
    runs: dict[str, dict[str, Any]] = {}
    for user in (a, b):
        cache = env_paths(user, tenant_python, package_copy, mount)
        assert cache[hooks.TRITON_VAR] == f"{private(mount, user)}/triton"
        cold = compile_as(user, tenant_python, package_copy, "triton_kernel.py", cache)
        assert cold["cache_hit"] is False, cold
        warm = compile_as(user, tenant_python, package_copy, "triton_kernel.py", cache)
        assert warm["cache_hit"] is True, warm
        assert warm["asm"] == cold["asm"]
        graph_cold = compile_as(user, tenant_python, package_copy, "torch_mlp.py", cache)
        assert fx_counts(graph_cold)[1] > 0, graph_cold
        graph_warm = compile_as(user, tenant_python, package_copy, "torch_mlp.py", cache)
        hits, misses = fx_counts(graph_warm)
        assert hits > 0, graph_warm
        assert misses == 0, graph_warm
        assert graph_warm["checksum"] == graph_cold["checksum"]
        runs[user.name] = cold
    # Each in their own tree, nothing in the shared one; identical artifacts stored once.
    assert os.listdir(mount / "triton") == []
    (cubin_a,), (cubin_b,) = (
        triton_files(runs["mtu_a"], ".cubin"),
        triton_files(runs["mtu_b"], ".cubin"),
    )
    assert cubin_a.is_relative_to(private(mount, a))
    assert cubin_b.is_relative_to(private(mount, b))
    data = cubin_a.read_bytes()
    assert cubin_b.read_bytes() == data
    assert object_refcount(mount, data) >= 2

    # B can do nothing to A's entry; A's next run loads A's own bytes.
    key_dir = cubin_a.parent
    for script in (
        f"ls {key_dir}",
        f"cat {cubin_a}",
        f"printf evil > {cubin_a}",
        f"rm -f {cubin_a}",
        f"mv {cubin_a} {cubin_a}.old",
        f"mkdir {key_dir}/planted",
        f"cp {cubin_b} {key_dir}/",
    ):
        b.denied(script)
    cache = env_paths(a, tenant_python, package_copy, mount)
    again = compile_as(a, tenant_python, package_copy, "triton_kernel.py", cache)
    assert again["cache_hit"] is True, again
    assert again["asm"] == runs["mtu_a"]["asm"]
    assert cubin_a.read_bytes() == data


@pytest.mark.compilers
@pytest.mark.parametrize("writer", ["root", "mtu_t"])
def test_a_kernel_a_trusted_writer_compiled_is_a_hit_for_every_user(
    open_mount, tenants, tenant_python: str, package_copy: Path, writer: str
) -> None:
    b = tenants["mtu_b"]
    trusted = tenants.get(writer)
    mount = open_mount("--allow-other", *(["--trust", writer] if trusted else []))
    if trusted is None:
        cli = run_cli("env", mount.mountpoint)
        assert cli.returncode == 0, cli.stderr
        shared_cache = dict(
            line.removeprefix("export ").split("=", 1) for line in cli.stdout.splitlines()
        )
    else:
        shared_cache = env_paths(trusted, tenant_python, package_copy, mount, "--tree", "shared")
    assert shared_cache[hooks.TRITON_VAR] == f"{mount.mountpoint}/triton"
    prewarm = compile_as(trusted, tenant_python, package_copy, "triton_kernel.py", shared_cache)
    assert prewarm["cache_hit"] is False, prewarm
    (shared_cubin,) = triton_files(prewarm, ".cubin")
    assert shared_cubin.stat().st_uid == 0
    shared_bytes = shared_cubin.read_bytes()

    cache = env_paths(b, tenant_python, package_copy, mount)
    first = compile_as(b, tenant_python, package_copy, "triton_kernel.py", cache)
    assert first["cache_hit"] is True, first
    assert first["asm"] == prewarm["asm"]
    # B cannot change the shared entry; B's change lands in B's clone.
    b.denied(f"printf evil > {shared_cubin}")
    b.denied(f"rm -f {shared_cubin}")
    # Triton's group file names absolute paths: B's clone of it still names the
    # shared files, which B can read and nobody untrusted can change.
    assert triton_files(first, ".cubin") == [shared_cubin]
    own_cubin = private(mount, b) / "triton" / shared_cubin.parent.name / shared_cubin.name
    assert own_cubin.read_bytes() == shared_bytes
    b.ok(f"printf mine > {own_cubin}")
    assert own_cubin.read_bytes() == b"mine"
    assert shared_cubin.read_bytes() == shared_bytes
    # B's own new entries land in B's tree.
    other = compile_as(b, tenant_python, package_copy, "triton_kernel.py", cache, "--arch", "80")
    assert other["cache_hit"] is False, other
    (new_cubin,) = triton_files(other, ".cubin")
    assert new_cubin.is_relative_to(private(mount, b))
    assert not (mount / "triton" / new_cubin.parent.name).exists()

    # The same for an inductor graph: the trusted writer's FX graph entry is B's hit.
    graph = compile_as(trusted, tenant_python, package_copy, "torch_mlp.py", shared_cache)
    assert fx_counts(graph)[1] > 0, graph
    shared_before = {
        path: path.read_bytes() for path in (mount / "inductor").rglob("*") if path.is_file()
    }
    graph_b = compile_as(b, tenant_python, package_copy, "torch_mlp.py", cache)
    hits, misses = fx_counts(graph_b)
    assert hits > 0, graph_b
    assert misses == 0, graph_b
    assert graph_b["checksum"] == graph["checksum"]
    shared_after = {
        path: path.read_bytes() for path in (mount / "inductor").rglob("*") if path.is_file()
    }
    assert shared_after == shared_before  # B's hit changed nothing in the shared tree
