"""The unit tier needs no root and no /dev/fuse.

It runs here the way a developer without privileges runs it: as `nobody`, in
a mount namespace where /dev/fuse is /dev/null, from a world-readable copy of
the sources and a world-readable venv (the suite's own may sit under /root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, cached_venv, project_requirements

UNIT_VENV = Path("/var/tmp/mithrilfs-unit-venv")
NOBODY = 65534
UNIT_TIER_TIMEOUT = 300
# The tier has a few hundred tests: fewer would mean files were not collected.
MIN_UNIT_TESTS = 200
# What the unit tier reads besides the package: its tests and the docs' table of modules.
SOURCES = ("mithrilfs", "tests", "docs", "pyproject.toml", "constraints.txt")


@pytest.fixture
def readable_checkout() -> Iterator[Path]:
    """A copy of the sources that `nobody` can read (pytest's tmp_path is root's alone)."""
    copy = Path(tempfile.mkdtemp(prefix="mithrilfs-unit-src-", dir="/var/tmp"))
    try:
        copy.chmod(0o755)
        ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache")
        for name in SOURCES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, copy / name, ignore=ignore)
            else:
                shutil.copy2(source, copy / name)
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_the_unit_tier_runs_as_nobody_without_dev_fuse(readable_checkout: Path) -> None:
    python = cached_venv(UNIT_VENV, sorted([*project_requirements("daemon"), "pytest"]))
    as_nobody = (
        "mount --bind /dev/null /dev/fuse && exec setpriv "
        f"--reuid={NOBODY} --regid={NOBODY} --clear-groups "
        '"$0" -m pytest tests/unit -q -p no:cacheprovider'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", as_nobody, str(python)],
        cwd=readable_checkout,
        env={
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/nonexistent",
            "PYTHONPATH": str(readable_checkout),
            "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": "/tmp",
        },
        capture_output=True,
        text=True,
        timeout=UNIT_TIER_TIMEOUT,
        check=False,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Every test passed: none failed, none skipped, none deselected for want of root.
    ran = re.fullmatch(r"(\d+) passed in [\d.]+s( \([\d:]+\))?", summary)
    assert ran is not None, summary
    assert int(ran.group(1)) >= MIN_UNIT_TESTS, summary
