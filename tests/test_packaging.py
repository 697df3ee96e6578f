"""The package as a job installs it: a wheel without the daemon's packages.

A job's own Python environment (3.10-3.13, its own torch) gets the base
distribution only, ``pip install mithrilfs`` or the wheel, with no extra:
no pyfuse3, so no libfuse headers and no compiler.  These tests build the
wheel as a user would (``pip wheel . --no-deps``), read its metadata, install
it into a venv of the system's python3.11 that holds torch and nothing of
the daemon, and run a real torch.compile from there through a real mount
after ``mithrilfs.hooks.activate()``.  The venv is kept between runs (its
torch takes minutes to install) while constraints.txt is unchanged; the
freshly built wheel is installed into it on every run.
"""

from __future__ import annotations

import email.parser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import Mount
from tests.test_compilers import (
    TORCH_MLP,
    assert_cold,
    assert_inductor_entries,
    assert_warm,
    cache_env,
    run_json,
)

REPO = Path(__file__).resolve().parent.parent
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
# The daemon's packages: none may reach a job's environment.
DAEMON_ONLY = {"pyfuse3", "redis", "zstandard"}
BUILD_TIMEOUT = 600
# What building the distribution reads besides the package itself.
SOURCE_FILES = ("pyproject.toml", "README.md")
PYCACHE = shutil.ignore_patterns("__pycache__")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel . --no-deps` builds from this checkout's sources.

    Built from a copy: setuptools builds in the source tree and never cleans
    its build/ there, so a module removed since an earlier build would ride
    along into the wheel.
    """
    source = tmp_path_factory.mktemp("source")
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "mithrilfs", source / "mithrilfs", ignore=PYCACHE)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    wheels = list(out.glob("mithrilfs-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_metadata(wheel: Path) -> Any:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def required(metadata: Any, python: str, extra: str) -> set[str]:
    """The distributions the wheel pulls in on *python* with *extra* ("" for none)."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "extra": extra}
    names = set()
    for line in metadata.get_all("Requires-Dist"):
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(requirement.name.lower())
    return names


def test_wheel_allows_310_to_313_and_keeps_the_daemon_in_an_extra(wheel: Path) -> None:
    metadata = wheel_metadata(wheel)
    requires_python = SpecifierSet(metadata["Requires-Python"])
    for python in SUPPORTED:
        assert requires_python.contains(f"{python}.0"), (python, requires_python)
        classifier = f"Programming Language :: Python :: {python}"
        assert classifier in metadata.get_all("Classifier"), classifier
        base = required(metadata, python, "")
        assert base, "the base distribution needs trio, blake3 and prometheus-client"
        assert not base & DAEMON_ONLY, base
        assert required(metadata, python, "daemon") >= DAEMON_ONLY
    for line in metadata.get_all("Requires-Dist"):
        # Ranges, not pins: the wheel installs next to a job's own packages.
        assert all(spec.operator == ">=" for spec in Requirement(line).specifier), line


def test_wheel_holds_every_module_of_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.endswith(".py")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "mithrilfs").rglob("*.py")}
    assert modules <= packaged, sorted(modules - packaged)


@pytest.fixture(scope="module")
def job_python(wheel: Path, user_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job's venv: its own torch (the test users' venv, conftest.user_python, which
    has a job's packages and no daemon extra), then this wheel installed with no extra."""
    python = user_python
    report = tmp_path_factory.mktemp("pip") / "report.json"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--force-reinstall"]
        + ["-c", str(REPO / "constraints.txt"), "--report", str(report), str(wheel)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    pulled = {
        item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]
    }
    assert "mithrilfs" in pulled, pulled
    assert not pulled & DAEMON_ONLY, f"installing the wheel pulled {pulled & DAEMON_ONLY}"
    return python


def job_env(**extra: str) -> dict[str, str]:
    """A compile environment with no cache directory set and no path to this checkout."""
    env = cache_env(Path("/nonexistent"), **extra)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTHONPATH"):
        env.pop(name)
    return env


def run_in_job(program: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(program), *args],
        env=job_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )


def test_job_venv_has_no_daemon_packages(job_python: Path, tmp_path: Path) -> None:
    probe = run_in_job(job_python, "-c", "import pyfuse3", cwd=tmp_path)
    assert probe.returncode != 0
    assert "No module named 'pyfuse3'" in probe.stderr, probe.stderr
    imported = run_in_job(
        job_python,
        "-c",
        "import json, sys, mithrilfs.hooks; "
        "print(json.dumps([mithrilfs.__file__, sorted(m.split('.')[0] for m in sys.modules)]))",
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    location, loaded = json.loads(imported.stdout)
    assert location.startswith(str(job_python.parent.parent)), location
    # The hooks need the standard library only, not even the base's trio.
    assert "trio" not in loaded, loaded
    assert "pyfuse3" not in loaded, loaded


def test_job_venv_commands_without_the_daemon(job_python: Path, tmp_path: Path) -> None:
    command = job_python.parent / "mithrilfs"
    printed = run_in_job(command, "env", str(tmp_path / "mnt"), "--tree", "shared", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert f"export TORCHINDUCTOR_CACHE_DIR={tmp_path}/mnt/inductor\n" in printed.stdout
    (tmp_path / "mnt").mkdir()
    refused = run_in_job(
        command, "mount", str(tmp_path / "mnt"), "--store", str(tmp_path / "store"), cwd=tmp_path
    )
    assert refused.returncode == 2, refused
    assert refused.stderr == (
        "mithrilfs: mount needs the daemon's packages (no module pyfuse3): "
        "pip install 'mithrilfs[daemon]'\n"
    )
    assert not (tmp_path / "store").exists()


@pytest.mark.compilers
def test_torch_compile_through_a_mount_from_the_job_venv(
    job_python: Path, mount: Mount, tmp_path: Path
) -> None:
    command = [str(job_python), str(TORCH_MLP), "--activate", str(mount.mountpoint)]
    cold = run_json(command, job_env(), cwd=tmp_path)
    assert_cold(cold, mount.mountpoint)
    assert_inductor_entries(mount / "inductor")
    # A second process can only hit through the files the first left in the mount.
    warm = run_json(command, job_env(), cwd=tmp_path)
    assert_warm(warm, mount.mountpoint)
    assert warm["checksum"] == cold["checksum"]
