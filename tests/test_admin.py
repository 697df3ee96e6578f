"""The admin socket: `stats`, `evict`, `gc` and `whoami` against a live mount know who asks.

Real unprivileged users (``mta_a``, ``mta_b``, made with useradd and removed
afterwards) run the real command line with an interpreter they can execute:
a venv built from the system's python3.11 with the package's pinned runtime
dependencies (reused when complete) and a world-readable copy of the
source.  Each user sees the stats of their own tree only and may evict only
there; root sees and evicts everything.  Garbage on the socket gets an error
(or, from a silent peer, a closed connection) and the mount keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mithrilfs import adminsock
from mithrilfs.repository import Repository
from tests.conftest import REPO, Mount, login_less_users, run_cli, wait_for

USERS = ("mta_a", "mta_b")
DEVICE_CLASS = "cuda-sm90"
DEADLINE = 60.0
KiB = 1024


# -- real users with an interpreter they can run --------------------------------------


def _make_world_readable(top: Path) -> None:
    for directory, _dirs, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                path.chmod(
                    path.stat().st_mode | 0o444 | (0o111 if path.stat().st_mode & 0o100 else 0)
                )


@pytest.fixture(scope="session")
def user_source() -> Iterator[Path]:
    """A copy of the package that every user can read (the checkout may not be)."""
    top = Path(tempfile.mkdtemp(prefix="mithrilfs-admin-src-", dir="/var/tmp"))
    try:
        shutil.copytree(
            REPO / "mithrilfs", top / "mithrilfs", ignore=shutil.ignore_patterns("__pycache__")
        )
        _make_world_readable(top)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """The test users, made for this module and removed afterwards, even on failure."""
    with login_less_users(*USERS) as made:
        yield made


class User:
    """Runs the command line (or a snippet) as one unprivileged user."""

    def __init__(self, entry: pwd.struct_passwd, python: Path, source: Path) -> None:
        self.entry = entry
        self.python = python
        self.source = source

    @property
    def name(self) -> str:
        return self.entry.pw_name

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        """The command line that runs this user's python with *args*."""
        return [
            "setpriv",
            f"--reuid={self.entry.pw_uid}",
            f"--regid={self.entry.pw_gid}",
            "--init-groups",
            "--",
            os.fspath(self.python),
            *(os.fspath(arg) for arg in args),
        ]

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.source), "LANG": "C.UTF-8"}

    def run(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd="/",
            env=self.env,
            timeout=DEADLINE,
            check=False,
        )

    def mithrilfs(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "mithrilfs", *args)

    def whoami(self, mount: Mount) -> dict[str, Any]:
        result = self.run(
            "-c",
            "import json, sys; from pathlib import Path; from mithrilfs import adminsock; "
            "print(json.dumps(adminsock.ask(Path(sys.argv[1]), 'whoami', wait=30)))",
            mount.mountpoint,
        )
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer


@pytest.fixture
def as_user(users, user_python: Path, user_source: Path) -> dict[str, User]:
    return {name: User(entry, user_python, user_source) for name, entry in users.items()}


# -- a mount with a tree per user ----------------------------------------------------------


TREE_FILES = {
    # path below the mount root -> size; each file is a cache entry of its own here
    "users/mta_a/triton/KA/a.cubin": 40 * KiB,
    "users/mta_a/triton/KA/a.json": 1 * KiB,
    "users/mta_a/inductor/ab/cab.py": 3 * KiB,
    "users/mta_b/triton/KB/b.cubin": 20 * KiB,
    "triton/KS/shared.cubin": 30 * KiB,
}


def populate(mount: Mount) -> dict[str, bytes]:
    contents = {}
    for number, (path, size) in enumerate(TREE_FILES.items()):
        target = mount / path
        target.parent.mkdir(parents=True, exist_ok=True)
        contents[path] = bytes([number + 1]) * size
        target.write_bytes(contents[path])
    return contents


def present(mount: Mount, contents: dict[str, bytes]) -> set[str]:
    return {path for path, data in contents.items() if _reads(mount / path, data)}


def _reads(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


def labelled_mount(make_mount) -> Mount:
    """A mount whose saved counters include rows labelled with mta_a's tree."""
    mount: Mount = make_mount(start=False)
    repo = Repository.open(mount.store)
    try:
        labels = {"device_class": DEVICE_CLASS, "layout": "triton", "result": "hit"}
        repo.index.save_counters(
            [("lookups_total", json.dumps({**labels, "tree": "mta_a"}, sort_keys=True), 7)], {}
        )
    finally:
        repo.close()
    return mount.start("--device-class", DEVICE_CLASS, "--cap", "64M")


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def one_line_error(result: subprocess.CompletedProcess[str], code: int, mention: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mithrilfs: "), lines[0]
    assert mention in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# -- who asks -------------------------------------------------------------------------------


def test_whoami_says_who_asks_and_which_tree_to_use(make_mount, as_user) -> None:
    mount: Mount = make_mount()
    a = as_user["mta_a"]
    assert a.whoami(mount) == {"uid": a.entry.pw_uid, "trusted": False, "tree": "users/mta_a"}
    root = adminsock.ask(mount.mountpoint, "whoami", wait=30)
    assert root == {"uid": 0, "trusted": True, "tree": ""}


def test_a_users_stats_show_their_own_tree_only(make_mount, as_user) -> None:
    mount = labelled_mount(make_mount)
    contents = populate(mount)
    a, b = as_user["mta_a"], as_user["mta_b"]

    own = json_of(a.mithrilfs("stats", mount.mountpoint, "--json"))
    mine = [p for p in TREE_FILES if p.startswith("users/mta_a/")]
    assert own["tree"] == "users/mta_a"
    assert own["logical_bytes"] == sum(len(contents[p]) for p in mine)
    assert own["store_bytes"] == own["logical_bytes"]  # distinct contents, stored once each
    # triton/KA (two files) is one cache entry, inductor/ab/cab.* another.
    assert (own["objects"], own["entries"]) == (len(mine), 2)
    assert own["cap_bytes"] == 64 << 20
    assert own["lookups"]["hit"] >= 7  # the rows labelled with a's tree, saved ones too
    assert own["files_sealed"] == 0

    other = json_of(b.mithrilfs("stats", mount.mountpoint, "--json"))
    assert other["tree"] == "users/mta_b"
    assert other["logical_bytes"] == 20 * KiB

    everything = json_of(run_cli("stats", mount.mountpoint, "--json"))
    assert everything["tree"] == ""
    assert everything["lookups"]["hit"] >= 7
    # Each user sees exactly their own tree's counters, nobody else's.
    for user, seen in (("mta_a", own), ("mta_b", other)):
        theirs = everything["trees"][user]
        assert (seen["lookups"]["hit"], seen["lookups"]["miss"]) == (theirs["hit"], theirs["miss"])
    assert everything["lookups"]["miss"] > 0
    assert everything["files_sealed"] == len(TREE_FILES)
    assert everything["logical_bytes"] == sum(TREE_FILES.values())

    text = a.mithrilfs("stats", mount.mountpoint)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].startswith("tree          users/mta_a (yours")
    hits, misses = own["lookups"]["hit"], own["lookups"]["miss"]
    assert any(
        line.startswith("lookup hits") and f"({hits} hits, {misses} misses)" in line
        for line in lines
    )

    # A user with nothing written yet has an empty tree, not an error.
    mount.stop()
    mount.start()
    assert json_of(b.mithrilfs("stats", mount.mountpoint, "--json"))["entries"] == 1


def test_a_user_evicts_only_in_their_own_tree(make_mount, as_user) -> None:
    mount: Mount = make_mount("--cap", "64M")
    contents = populate(mount)
    a = as_user["mta_a"]
    everything = set(contents)

    for pattern in ("users/mta_b/*", "triton/*", "*", "users/*", "users/mta_a*"):
        refused = a.mithrilfs("evict", mount.mountpoint, "--path", pattern)
        one_line_error(refused, 1, "you may evict only in your own tree")
        assert refused.stdout == ""
    one_line_error(
        a.mithrilfs("gc", mount.mountpoint, "--to", "1"), 1, "only root and trusted writers"
    )
    one_line_error(
        a.mithrilfs("gc", mount.mountpoint, "--to", "1", "--dry-run"),
        1,
        "only root and trusted writers",
    )
    assert present(mount, contents) == everything

    # Without a path the selection is the caller's tree: others' entries are not even listed.
    dry = json_of(
        a.mithrilfs("evict", mount.mountpoint, "--older-than", "0s", "--dry-run", "--json")
    )
    mine = {p for p in contents if p.startswith("users/mta_a/")}
    listed = {location.split("/", 1)[1] for location, _b, _t in dry["listed"]}
    assert listed == {"users/mta_a/triton/KA", "users/mta_a/inductor/ab/cab.*"}
    assert present(mount, contents) == everything

    evicted = json_of(
        a.mithrilfs("evict", mount.mountpoint, "--path", "users/mta_a/triton/*", "--json")
    )
    assert evicted["entries"] == 1  # the key directory KA, whole
    assert mount.proc is not None
    assert evicted["served_by"] == f"daemon pid {mount.proc.pid}"
    kept = everything - {p for p in mine if "/triton/" in p}
    wait_for(lambda: present(mount, contents) == kept, DEADLINE, "a's triton entries to go")

    evicted = json_of(a.mithrilfs("evict", mount.mountpoint, "--older-than", "0s", "--json"))
    assert evicted["entries"] == 1
    kept -= mine
    wait_for(lambda: present(mount, contents) == kept, DEADLINE, "a's last entry to go")

    # Root may evict from any tree.
    result = run_cli("evict", mount.mountpoint, "--path", "users/mta_b/*", "--json")
    assert json_of(result)["entries"] == 1
    kept = {"triton/KS/shared.cubin"}
    wait_for(lambda: present(mount, contents) == kept, DEADLINE, "b's entry to go")
    mount.stop()
    assert f"evict for uid {a.entry.pw_uid} (pid " in mount.log_text()


# -- the socket ---------------------------------------------------------------------------


def test_the_socket_is_where_anyone_can_find_it_and_goes_with_the_daemon(make_mount) -> None:
    mount: Mount = make_mount()
    path = adminsock.socket_path(mount.mountpoint, 0)
    assert path.parent == Path("/run/mithrilfs")
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o666
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    mount.stop()
    assert not path.exists()

    # A daemon killed outright leaves its socket behind; the next mount there replaces it.
    mount.start()
    mount.kill()
    assert path.exists()
    refused = run_cli("stats", mount.mountpoint)
    assert refused.returncode == 1
    mount.start()
    assert adminsock.ask(mount.mountpoint, "whoami", wait=30)["trusted"] is True

    # ... and a mount anywhere else removes it, leaving live sockets alone.
    mount.kill()
    assert path.exists()
    live: Mount = make_mount(name="live")
    other: Mount = make_mount(name="other")
    assert not path.exists()
    assert adminsock.ask(live.mountpoint, "whoami", wait=30)["trusted"] is True
    assert adminsock.ask(other.mountpoint, "whoami", wait=30)["trusted"] is True
    assert " ERROR " not in live.log_text()


IMPOSTOR = """
import socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
print("ready", flush=True)
while True:
    peer, _ = server.accept()
    peer.sendall(b'{"ok": true, "result": {"tree": "", "lookups": {}}}\\n')
    peer.close()
"""


def test_the_command_talks_only_to_the_mounts_own_daemon(make_mount, as_user) -> None:
    mount: Mount = make_mount()
    path = adminsock.socket_path(mount.mountpoint, 0)
    a = as_user["mta_a"]
    # The user's socket, moved where the daemon's was (only root could do that,
    # but the command must not rely on it): the command refuses to believe it.
    staging = Path(tempfile.mkdtemp(prefix="mta-", dir=path.parent.parent))
    os.chown(staging, a.entry.pw_uid, a.entry.pw_gid)
    impostor = subprocess.Popen(
        a.command("-c", IMPOSTOR, staging / "fake.sock"),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd="/",
        env=a.env,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline() == b"ready\n"
        os.replace(staging / "fake.sock", path)
        refused = run_cli("stats", mount.mountpoint)
        one_line_error(refused, 1, f"served by uid {a.entry.pw_uid}, not by the mount's daemon")
        assert refused.stdout == ""
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(staging, ignore_errors=True)
        path.unlink(missing_ok=True)


def raw_exchange(path: Path, payload: bytes, *, shut: bool = True) -> dict[str, Any]:
    """Send raw bytes; the daemon's one-line answer, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(os.fspath(path))
        sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    data: dict[str, Any] = json.loads(answer)
    return data


GARBAGE = [
    (b"\xff\xfe\xfd\n", "not UTF-8"),
    (b"{not json\n", "not JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b"\n", "empty request"),
    (b'{"op": "stats"}\n', "protocol version"),
    (b'{"version": 1}\n', "no 'op'"),
    (b'{"version": 1, "op": "format-disk"}\n', "unknown op 'format-disk'"),
    (b'{"version": 1, "op": "evict", "path": 5}\n', "'path' must be a string"),
    (b'{"version": 1, "op": "evict", "older_than": "7d"}\n', "'older_than' must be a number"),
    (b'{"version": 1, "op": "gc", "to": true}\n', "'to' must be an integer"),
    (b'{"version": 1, "op": "evict", "path": "/etc/*"}\n', "invalid path pattern"),
    (b'{"version": 1, "op": "evict"}\n', "choose the entries to evict"),
    (b'{"version": 1, "op": "evict", "older_than": NaN}\n', "invalid duration"),
    (b'{"version": 1, "op": "evict", "older_than": 1e999}\n', "invalid duration"),
    (b'{"version": 1, "op": "evict", "path": "*", "timeout": -1}\n', "'timeout' must be"),
    (b'{"version": 1, "op": "gc", "to": 1' + b"0" * 5000 + b"}\n", "not usable JSON"),
    (b"[" * 60_000 + b"\n", "not usable JSON"),
    (b"x" * (adminsock.MAX_REQUEST + 10), "longer than"),
    (b'{"version": 1, "op": "whoami", "pad": "' + b"y" * 100_000 + b'"}\n', "longer than"),
]


def test_garbage_on_the_socket_gets_an_error_and_the_mount_keeps_serving(make_mount) -> None:
    mount: Mount = make_mount()
    contents = populate(mount)
    path = adminsock.socket_path(mount.mountpoint, 0)
    probe = "triton/KS/shared.cubin"
    for payload, mention in GARBAGE:
        answer = raw_exchange(path, payload)
        assert answer["ok"] is False, (payload[:40], answer)
        assert mention in answer["error"], (payload[:40], answer)
        assert answer["exit_code"] in (1, 2)
        assert (mount / probe).read_bytes() == contents[probe]
    assert present(mount, contents) == set(contents)  # nothing was evicted by any of it

    # Half a request, then silence: the daemon hangs up after its timeout.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(DEADLINE)
        silent.connect(os.fspath(path))
        silent.sendall(b'{"version": 1, "op": "sta')
        assert silent.recv(100) == b""
    assert (mount / probe).read_bytes() == contents[probe]

    # Many at once: silent ones, garbage ones, and a well-formed one after them.
    crowd = []
    try:
        for number in range(3 * adminsock.MAX_CONNECTIONS):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            crowd.append(peer)
            peer.connect(os.fspath(path))  # blocking: waits while the backlog is full
            peer.settimeout(DEADLINE)
            if number % 2:
                peer.sendall(b"\x00garbage\xff\n")
        assert (mount / probe).read_bytes() == contents[probe]
        answers = []
        for peer in crowd[1::2]:
            reply = b""
            while chunk := peer.recv(4096):
                reply += chunk
            answers.append(json.loads(reply))
        # More than it serves at once: the rest waited for the silent ones to time out.
        assert [a["error"] for a in answers] == ["request is not UTF-8"] * len(answers)
    finally:
        for peer in crowd:
            peer.close()

    def answers_again() -> bool:
        with contextlib.suppress(Exception):
            return raw_exchange(path, b'{"version": 1, "op": "whoami"}\n')["ok"] is True
        return False

    wait_for(answers_again, DEADLINE, "the daemon to answer a well-formed request again")
    assert json_of(run_cli("stats", mount.mountpoint, "--json"))["files_sealed"] == len(contents)
    assert (mount / probe).read_bytes() == contents[probe]
    assert mount.proc is not None
    assert mount.proc.poll() is None


def test_mount_refuses_a_socket_directory_others_could_swap(make_mount, tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    with pytest.raises(Exception, match="only its owner can write"):
        adminsock.Listening(directory / "x.sock")
    assert not (directory / "x.sock").exists()
