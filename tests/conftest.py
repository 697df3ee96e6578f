"""Shared fixtures: real mounts started through the CLI, torn down even on failure.

A mount is started with ``mithrilfs mount --foreground`` in a child process;
the fixture polls ``os.path.ismount`` with a deadline while checking that the
daemon is alive, never sleeps blindly.  Teardown unmounts, waits for the
daemon to exit, falls back to a lazy unmount and SIGKILL by pid, and then
runs the store's consistency check, which must find nothing.  A daemon log
with an unexpected traceback fails the test.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import hashlib
import io
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs the backport there
    import tomli as tomllib

from mithrilfs import fsck
from mithrilfs.mounts import is_stale
from mithrilfs.repository import Repository

MOUNT_DEADLINE = 30.0
UNMOUNT_DEADLINE = 30.0

faulthandler.enable()

REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 60


def run_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mithrilfs ARGS`` in a fresh process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mithrilfs", *(os.fspath(arg) for arg in args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kwargs,
    )


def wait_for(predicate, timeout: float, what: str, alive=None) -> None:
    """Poll *predicate* until it holds; fail with *what* at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if alive is not None and not alive():
            raise AssertionError(f"daemon exited while waiting for {what}")
        if time.monotonic() > deadline:
            faulthandler.dump_traceback()
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Mount:
    """One mithrilfs daemon serving *store* at *mountpoint*."""

    def __init__(self, mountpoint: Path, store: Path, log: Path) -> None:
        self.mountpoint = mountpoint
        self.store = store
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []
        self.allow_log_errors = False
        # How the CLI is started; a test may start it through a wrapper.
        self.launcher: list[str] = [sys.executable, "-m", "mithrilfs"]

    def __truediv__(self, other: str) -> Path:
        return self.mountpoint / other

    def start(self, *extra_args: str) -> Mount:
        assert self.proc is None, "already mounted"
        if extra_args:
            self.extra_args = list(extra_args)
        command = [
            *self.launcher,
            "mount",
            str(self.mountpoint),
            "--store",
            str(self.store),
            "--foreground",
            "--log-file",
            str(self.log),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        proc = self.proc
        wait_for(
            # ismount alone is fooled by a stale mount (the kernel answers from
            # its attribute cache); statvfs always reaches the daemon.
            lambda: os.path.ismount(self.mountpoint) and not is_stale(self.mountpoint),
            MOUNT_DEADLINE,
            f"mount at {self.mountpoint}",
            alive=lambda: proc.poll() is None,
        )
        return self

    def stop(self) -> None:
        """Unmount and wait for a clean exit; force it if that does not happen."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        subprocess.run(
            ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False
        )
        try:
            code = proc.wait(timeout=UNMOUNT_DEADLINE)
        except subprocess.TimeoutExpired:
            faulthandler.dump_traceback()
            subprocess.run(
                ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise AssertionError("daemon did not exit after unmount") from None
        assert code == 0, f"daemon exited with {code}; log:\n{self.log_text()}"

    def kill(self) -> None:
        """SIGKILL the daemon and clear the mount it leaves behind (crash tests)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(
            ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
        )

    def remount(self, *extra_args: str) -> Mount:
        self.stop()
        return self.start(*extra_args)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_store(self) -> fsck.Report:
        """Run the consistency check on the (unmounted) store."""
        assert self.proc is None, "unmount before checking the store"
        repo = Repository.open(self.store, create=False)
        try:
            return fsck.check(repo.index, repo.content)
        finally:
            repo.close()

    def assert_consistent(self) -> None:
        report = self.check_store()
        assert report.clean, "fsck found:\n" + "\n".join(
            f"{p.kind}: {p.detail}" for p in report.problems
        )


# What the make_mount fixture gives: (*extra_args, name=, store=, start=, where=) -> Mount.
MountFactory = Callable[..., Mount]


@contextlib.contextmanager
def older_version_mount(
    commit: str, store: Path, workdir: Path, *extra_args: str
) -> Iterator[Path]:
    """A mount of *store* served by the package as it was at *commit* (format migrations).

    Yields the mountpoint; unmounts and waits for a clean exit afterwards,
    even when the body fails.
    """
    old = workdir / "old"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "mithrilfs"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    mountpoint = workdir / "old-mnt"
    mountpoint.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mithrilfs", "mount", str(mountpoint), "--store", str(store),
         "--foreground", *extra_args, "--log-file", str(workdir / "old.log")],
        cwd=old,
        env={**os.environ, "PYTHONPATH": str(old)},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: os.path.ismount(mountpoint) and not is_stale(mountpoint),
            MOUNT_DEADLINE,
            "the old version's mount",
            alive=lambda: proc.poll() is None,
        )
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        try:
            assert proc.wait(timeout=MOUNT_DEADLINE) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


@pytest.fixture
def make_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """Factory for mounts; every mount is unmounted, checked and cleaned up."""
    mounts: list[Mount] = []

    def factory(
        *extra_args: str,
        name: str = "m",
        store: Path | None = None,
        start: bool = True,
        where: Path | None = None,
    ) -> Mount:
        mountpoint = (where or tmp_path) / f"{name}-mnt"
        mountpoint.mkdir(exist_ok=True)
        mount = Mount(mountpoint, store or tmp_path / f"{name}-store", tmp_path / f"{name}.log")
        mounts.append(mount)
        if start:
            mount.start(*extra_args)
        return mount

    failures: list[str] = []
    try:
        yield factory
    finally:
        for mount in mounts:
            try:
                mount.stop()
            except AssertionError as exc:
                failures.append(str(exc))
            finally:
                if os.path.ismount(mount.mountpoint):
                    subprocess.run(
                        ["fusermount3", "-uz", str(mount.mountpoint)],
                        capture_output=True,
                        check=False,
                    )
    for mount in mounts:
        if mount.store.exists() and (mount.store / "mithril.db").exists():
            report = mount.check_store()
            if not report.clean:
                failures.append(
                    "fsck found:\n" + "\n".join(f"{p.kind}: {p.detail}" for p in report.problems)
                )
        log = mount.log_text()
        if "Traceback" in log and not mount.allow_log_errors:
            failures.append(f"daemon logged a traceback:\n{log}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def traversable_tmp(tmp_path: Path) -> None:
    """Let other users reach the mountpoints: pytest's temp dirs are 0700."""
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path("/tmp"):
            break
        directory.chmod(0o755)


@contextlib.contextmanager
def login_less_users(*names: str) -> Iterator[dict[str, pwd.struct_passwd]]:
    """Real users with no home and no login shell (useradd), removed again even on
    failure, and first, in case a killed run left them behind."""
    try:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True, check=False)
            subprocess.run(
                ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                capture_output=True,
                check=True,
            )
        yield {name: pwd.getpwnam(name) for name in names}
    finally:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True, check=False)


NOBODY = 65534


def as_nobody(action: Callable[[TextIO], int]) -> tuple[int, str]:
    """Run *action* in a forked child that dropped to uid/gid 65534 (nobody).

    The interpreter and what the test imported are already loaded, so no
    second Python install readable by that user is needed.  *action* writes
    what it has to say to the stream it is given; returned with its exit code.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                try:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    code = action(out)
                except BaseException:
                    traceback.print_exc(file=out)  # for the test's failure message
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as said:
        text = said.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


# public_dir's directories, removed at the end of the session: a test's mounts
# in one are torn down after the fixture itself (make_mount is set up first),
# so only then is nothing below it mounted or in use by a daemon.
_PUBLIC_DIRS: list[Path] = []


@pytest.fixture
def public_dir() -> Path:
    """A directory every user can traverse, for mountpoints that other users reach.

    Outside pytest's temp root, which is 0700 and which a concurrent pytest
    session of the same user locks again (chmod 0700) when it starts.
    """
    path = Path(tempfile.mkdtemp(prefix="mithrilfs-public-", dir="/var/tmp"))
    path.chmod(0o755)
    _PUBLIC_DIRS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_public_dirs() -> Iterator[None]:
    yield
    with open("/proc/mounts") as table:
        mounted = [line.split()[1] for line in table]
    for path in _PUBLIC_DIRS:
        # Never anything below a mount that is still there (a failed unmount).
        if not any(m == str(path) or m.startswith(f"{path}/") for m in mounted):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mount(make_mount: MountFactory) -> Mount:
    """One running mount of a fresh store."""
    return make_mount()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """An empty store opened without a mount; fsck must find nothing in it when the test ends."""
    repository = Repository.open(tmp_path / "store")
    repository.recover()
    try:
        yield repository
        report = fsck.check(repository.index, repository.content)
        assert report.clean, [f"{p.kind}: {p.detail}" for p in report.problems]
    finally:
        repository.close()


# -- an interpreter real test users can run ------------------------------------------
#
# The suite's own venv may sit where other users cannot read (a checkout under
# /root, a pyenv build), so tests that run Python as a second user get a venv
# of the system's python3.11 in a world-readable place, with the tested set of
# packages (constraints.txt): what a job's environment has, which is the
# package's base dependencies (the CLI, the hooks) and the compilers, never
# the daemon's extra (test users do not mount).  tests/test_packaging.py
# installs the wheel into the same venv to play a job's environment, so torch
# is installed once per run.  Built once and reused while that set is unchanged.
USER_VENV = Path("/var/tmp/mithrilfs-user-venv")
SYSTEM_PYTHON = "/usr/bin/python3.11"
USER_VENV_EXTRAS = ("torch", "triton", "numpy")
USER_VENV_BUILD_TIMEOUT = 1800


def project_requirements(*extras: str) -> list[str]:
    """pyproject.toml's dependencies and those of *extras*, as pip requirements."""
    with open(REPO / "pyproject.toml", "rb") as project:
        project_table = tomllib.load(project)["project"]
    optional = project_table["optional-dependencies"]
    return [*project_table["dependencies"], *(r for extra in extras for r in optional[extra])]


def _user_venv_requirements() -> list[str]:
    return sorted([*project_requirements(), *USER_VENV_EXTRAS])


@pytest.fixture(scope="session")
def user_python() -> Path:
    """A python every test user can run, with a job's packages: mithrilfs's base
    dependencies and the compilers (users run their code from a copy of the
    sources on PYTHONPATH)."""
    return cached_venv(USER_VENV, _user_venv_requirements())


def cached_venv(prefix: Path, requirements: list[str]) -> Path:
    """The python of a world-readable venv of SYSTEM_PYTHON with *requirements*.

    Installed with ``-c constraints.txt`` at ``<prefix>-<digest of both>``,
    so that checkouts testing different sets at once never remove each
    other's venv; built once per set (a stamp inside says it is complete).
    """
    constraints = REPO / "constraints.txt"
    wanted = hashlib.sha256("\n".join(requirements).encode() + constraints.read_bytes()).hexdigest()
    venv = prefix.with_name(f"{prefix.name}-{wanted[:16]}")
    marker = venv / ".mithrilfs-complete"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not (marker.exists() and marker.read_text() == wanted):
            shutil.rmtree(venv, ignore_errors=True)
            umask = os.umask(0o022)  # world-readable, whatever the caller's umask
            try:
                subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
                built = subprocess.run(
                    [str(venv / "bin" / "pip"), "install", "--quiet"]
                    + ["-c", str(constraints), *requirements],
                    capture_output=True,
                    text=True,
                    timeout=USER_VENV_BUILD_TIMEOUT,
                    check=False,
                )
                assert built.returncode == 0, built.stderr
            finally:
                os.umask(umask)
            marker.write_text(wanted)  # last: the venv is complete
    return venv / "bin" / "python"
