"""Tests for mithrilfs.hooks: activate() and env_lines().

activate() looks at sys.modules and mutates os.environ, so each case runs in a
fresh interpreter (``sys.executable -c``) whose module table and environment
start clean. Instead of a FUSE mount they use a real mountpoint of this
machine (/proc, /dev, ...): activate() only needs os.path.ismount() to agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mithrilfs.hooks import DEFAULT_MOUNT, env_lines

REPO = Path(__file__).resolve().parent.parent
MOUNT = next((p for p in ("/proc", "/dev", "/sys", "/") if os.path.ismount(p)), None)
needs_mount = pytest.mark.skipif(MOUNT is None, reason="no mountpoint to stand in for mithrilfs")

# Appended to every child: run activate(ARGS), report the outcome as JSON.
_REPORT = """
import json, os, sys
from mithrilfs import hooks
try:
    result = {"set": hooks.activate(ARGS)}
except (hooks.MithrilfsNotMounted, hooks.CacheDirAlreadyFixed) as e:
    result = {"error": type(e).__name__, "message": str(e)}
result["env"] = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
result["loaded"] = sorted(m for m in ("torch", "triton") if m in sys.modules)
AFTER
print(json.dumps(result))
"""


def run_child(
    setup: str = "",
    args: str = "",
    env: dict[str, str] | None = None,
    after: str = "",
) -> dict[str, Any]:
    """Run ``setup`` then ``activate(<args>)`` in a fresh interpreter.

    ``args`` is Python source for the call's arguments; ``after`` runs once it
    returned and may add entries to ``result``.
    """
    child_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MITHRILFS_MOUNT")
    }
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    child_env.update(env or {})
    code = textwrap.dedent(setup) + _REPORT.replace("ARGS", args).replace("AFTER", after)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def expected_dirs(mount: str) -> dict[str, str]:
    return {
        "TRITON_CACHE_DIR": os.path.join(mount, "triton"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(mount, "inductor"),
    }


# --- mount resolution -------------------------------------------------------------


@needs_mount
def test_activate_explicit_mount_sets_both_vars() -> None:
    assert MOUNT is not None
    result = run_child(args=repr(MOUNT))
    assert result["set"] == expected_dirs(MOUNT)
    assert result["env"] == expected_dirs(MOUNT)
    assert result["loaded"] == []  # activate() imported neither torch nor triton


@needs_mount
def test_activate_accepts_pathlike_and_beats_env() -> None:
    assert MOUNT is not None
    result = run_child(
        setup="from pathlib import Path",
        args=f"Path({MOUNT!r})",
        env={"MITHRILFS_MOUNT": "/nonexistent"},
    )
    assert result["set"] == expected_dirs(MOUNT)


@needs_mount
def test_activate_honours_mithrilfs_mount_env() -> None:
    assert MOUNT is not None
    result = run_child(env={"MITHRILFS_MOUNT": MOUNT})
    assert result["set"] == expected_dirs(MOUNT)


def test_activate_defaults_to_var_cache_mithril() -> None:
    if os.path.ismount(DEFAULT_MOUNT):
        pytest.skip(f"{DEFAULT_MOUNT} is really mounted here")
    result = run_child()
    assert result["error"] == "MithrilfsNotMounted"
    assert DEFAULT_MOUNT in result["message"]


def test_activate_not_a_mount(tmp_path: Path) -> None:
    result = run_child(args=repr(str(tmp_path)))
    assert result["error"] == "MithrilfsNotMounted"
    assert str(tmp_path) in result["message"]
    assert "not" in result["message"]
    # Nothing is half-set on failure.
    assert result["env"] == {"TRITON_CACHE_DIR": None, "TORCHINDUCTOR_CACHE_DIR": None}


def test_activate_missing_mountpoint(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    result = run_child(args=repr(missing))
    assert result["error"] == "MithrilfsNotMounted"
    assert missing in result["message"]


# --- refusing to switch a cache directory already in use ---------------------------


@needs_mount
def test_env_already_set_before_import_is_overridden() -> None:
    # Nothing has read the variables yet, so activate() simply wins.
    assert MOUNT is not None
    result = run_child(
        args=repr(MOUNT),
        env={"TRITON_CACHE_DIR": "/elsewhere/t", "TORCHINDUCTOR_CACHE_DIR": "/elsewhere/i"},
    )
    assert result["set"] == expected_dirs(MOUNT)


# A stand-in for triton 3.9, inserted into sys.modules of the child: assigning
# triton.knobs.cache.dir stores the value in the knob instance's __dict__.
_FAKE_TRITON = """
import sys, types
knobs = types.ModuleType("triton.knobs")
knobs.cache = types.SimpleNamespace(dir=FIXED)
triton = types.ModuleType("triton")
triton.knobs = knobs
sys.modules["triton"] = triton
sys.modules["triton.knobs"] = knobs
"""


@needs_mount
def test_triton_knob_already_fixed() -> None:
    assert MOUNT is not None
    result = run_child(setup="FIXED = '/home/u/.triton/cache'\n" + _FAKE_TRITON, args=repr(MOUNT))
    assert result["error"] == "CacheDirAlreadyFixed"
    assert "/home/u/.triton/cache" in result["message"]
    assert os.path.join(MOUNT, "triton") in result["message"]
    assert result["env"] == {"TRITON_CACHE_DIR": None, "TORCHINDUCTOR_CACHE_DIR": None}


@needs_mount
def test_triton_loaded_with_other_env_dir() -> None:
    assert MOUNT is not None
    result = run_child(
        setup="import sys, types\nsys.modules['triton'] = types.ModuleType('triton')",
        args=repr(MOUNT),
        env={"TRITON_CACHE_DIR": "/scratch/triton"},
    )
    assert result["error"] == "CacheDirAlreadyFixed"
    assert "TRITON_CACHE_DIR is already /scratch/triton" in result["message"]


@needs_mount
def test_triton_loaded_with_same_dir_is_fine() -> None:
    # Activating twice, or after `eval "$(mithrilfs env)"`, is not a conflict.
    assert MOUNT is not None
    setup = f"FIXED = {os.path.join(MOUNT, 'triton')!r}\n" + _FAKE_TRITON
    result = run_child(setup=setup, args=repr(MOUNT), env=expected_dirs(MOUNT))
    assert result["set"] == expected_dirs(MOUNT)


@needs_mount
def test_torch_loaded_with_other_inductor_dir() -> None:
    assert MOUNT is not None
    result = run_child(
        setup="import sys, types\nsys.modules['torch'] = types.ModuleType('torch')",
        args=repr(MOUNT),
        env={"TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_u"},
    )
    assert result["error"] == "CacheDirAlreadyFixed"
    assert "/tmp/torchinductor_u" in result["message"]
    assert os.path.join(MOUNT, "inductor") in result["message"]


@needs_mount
def test_torch_memoised_cache_path() -> None:
    # Stand-in for torch._inductor.codecache.CacheBase.get_local_cache_path,
    # which is functools.cache'd: once called it outlives the env variable.
    assert MOUNT is not None
    setup = """
    import functools, sys, types
    from pathlib import Path
    codecache = types.ModuleType("torch._inductor.codecache")
    class CacheBase:
        @staticmethod
        @functools.cache
        def get_local_cache_path():
            return Path("/tmp/torchinductor_u/cache/0123abcd")
    codecache.CacheBase = CacheBase
    sys.modules["torch"] = types.ModuleType("torch")
    sys.modules["torch._inductor.codecache"] = codecache
    """
    assert run_child(setup=setup, args=repr(MOUNT))["set"] == expected_dirs(MOUNT)
    result = run_child(setup=setup + "CacheBase.get_local_cache_path()\n", args=repr(MOUNT))
    assert result["error"] == "CacheDirAlreadyFixed"
    assert "TORCHINDUCTOR_CACHE_DIR is already /tmp/torchinductor_u" in result["message"]


@needs_mount
def test_real_triton_knob_already_fixed() -> None:
    pytest.importorskip("triton")
    assert MOUNT is not None
    result = run_child(
        setup="import triton\ntriton.knobs.cache.dir = '/scratch/t'", args=repr(MOUNT)
    )
    assert result["error"] == "CacheDirAlreadyFixed"
    assert "/scratch/t" in result["message"]


@needs_mount
def test_real_triton_follows_activate() -> None:
    pytest.importorskip("triton")
    assert MOUNT is not None
    result = run_child(
        setup="import triton",
        args=repr(MOUNT),
        after="result['knob'] = triton.knobs.cache.dir",
    )
    assert result["set"] == expected_dirs(MOUNT)
    assert result["knob"] == os.path.join(MOUNT, "triton")


@needs_mount
def test_real_torch_inductor_cache_dir_already_computed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    assert MOUNT is not None
    result = run_child(
        setup="from torch._inductor.runtime.cache_dir_utils import cache_dir\ncache_dir()",
        args=repr(MOUNT),
        env={"TMPDIR": str(tmp_path)},
    )
    assert result["error"] == "CacheDirAlreadyFixed"
    assert f"is already {tmp_path}/torchinductor_" in result["message"]


# --- env_lines ---------------------------------------------------------------------


def test_env_lines_text() -> None:
    assert env_lines("/var/cache/mithril") == (
        "export TRITON_CACHE_DIR=/var/cache/mithril/triton\n"
        "export TORCHINDUCTOR_CACHE_DIR=/var/cache/mithril/inductor\n"
    )


@pytest.mark.parametrize("mount", ["/var/cache/mithril", "/mnt/my cache/it's $HOME `x`"])
def test_env_lines_evaluable_by_bash(mount: str) -> None:
    script = 'eval "$1"; printf "%s\\n%s\\n" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"'
    proc = subprocess.run(
        ["bash", "-c", script, "bash", env_lines(mount)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.splitlines() == [f"{mount}/triton", f"{mount}/inductor"]


def test_env_lines_via_command_substitution() -> None:
    code = "from mithrilfs.hooks import env_lines; print(env_lines('/srv/mithril'), end='')"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$("$0" -c "$1")"; echo "$TRITON_CACHE_DIR"; echo "$TORCHINDUCTOR_CACHE_DIR"',
            sys.executable,
            code,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert proc.stdout.splitlines() == ["/srv/mithril/triton", "/srv/mithril/inductor"]
