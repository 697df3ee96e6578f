"""`mithrilfs doctor`: every check driven through a fake host, then real runs.

The fake host stands for the machine (files, tools, mounts, environment);
each test changes the one fact its check is about, starting from a node that
is ready.  The real runs check a live mount and a stale one (daemon killed).
The operations artifacts under docs/ (the Grafana dashboard) are validated
here as well.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mithrilfs import doctor
from mithrilfs.device import DeviceClassError
from mithrilfs.mounts import FSTYPE, MountEntry

MP = Path("/var/cache/mithril")
STORE = Path("/var/lib/mithril")
EXE = "/opt/mithrilfs/bin/mithrilfs"
LINE = re.compile(r"^(ok  |warn|FAIL)  [^:]+: .+?( \[fix: .+\])?$")


def stat_result(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


class FakeHost(doctor.Host):
    """A root shell on a node that is ready: mounted, environment set."""

    def __init__(self) -> None:
        self.uid = 0
        self.stats: dict[str, os.stat_result | OSError] = {
            "/dev/fuse": stat_result(stat.S_IFCHR | 0o666),
            "/": stat_result(stat.S_IFDIR | 0o755),
            "/var": stat_result(stat.S_IFDIR | 0o755),
            "/var/lib": stat_result(stat.S_IFDIR | 0o755),
            str(STORE): stat_result(stat.S_IFDIR | 0o700),
            str(STORE / "mithril.db"): stat_result(stat.S_IFREG | 0o600),
            str(MP): stat_result(stat.S_IFDIR | 0o755),
            "/usr/bin/fusermount3": stat_result(stat.S_IFREG | stat.S_ISUID | 0o755),
        }
        self.open_error: OSError | None = None
        self.tools = {
            "fusermount3": "/usr/bin/fusermount3",
            "mount.fuse3": "/usr/sbin/mount.fuse3",
            "mithrilfs": "/usr/local/bin/mithrilfs",
        }
        self.links = {"/usr/local/bin/mithrilfs": EXE}
        self.texts: dict[str, str] = {"/etc/fuse.conf": "# mount_max = 1000\n"}
        self.mount_entries = [
            MountEntry("/", "ext4", "/dev/nvme0n1p1"),
            MountEntry(str(MP), FSTYPE, str(STORE)),
        ]
        self.free = 100 << 30
        self.can_write = True
        self.env: dict[str, str] = {
            "PATH": "/usr/bin:/bin",
            "TRITON_CACHE_DIR": f"{MP}/triton",
            "TORCHINDUCTOR_CACHE_DIR": f"{MP}/inductor",
        }
        self.versions: dict[str, str] = {"torch": "2.13.0+cu128", "triton": "3.9.0"}
        self.holders = {STORE: 4242}
        self.detected: str | DeviceClassError = "cuda-sm90"

    def euid(self) -> int:
        return self.uid

    def stat(self, path: str) -> os.stat_result:
        found = self.stats.get(path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if isinstance(found, OSError):
            raise found
        return found

    def probe_mount(self, path: str) -> None:
        self.stat(path)

    def open_rw(self, path: str) -> None:
        self.stat(path)
        if self.open_error is not None:
            raise self.open_error

    def which(self, name: str, path: str | None = None) -> str | None:
        found = self.tools.get(name)
        search = (path if path is not None else self.env.get("PATH", "")).split(os.pathsep)
        return found if found is not None and os.path.dirname(found) in search else None

    def read_text(self, path: str) -> str:
        if path not in self.texts:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.texts[path]

    def mounts(self) -> list[MountEntry]:
        return self.mount_entries

    def free_bytes(self, path: str) -> int:
        return self.free

    def writable(self, path: str) -> bool:
        return self.can_write

    def environ(self) -> Mapping[str, str]:
        return self.env

    def version(self, distribution: str) -> str | None:
        return self.versions.get(distribution)

    def holder_pid(self, store: Path) -> int | None:
        return self.holders.get(store)

    def device_class(self) -> str:
        if isinstance(self.detected, DeviceClassError):
            raise self.detected
        return self.detected

    def realpath(self, path: str) -> str:
        return self.links.get(path, path)

    def executable(self) -> str:
        return EXE


def run(host: FakeHost, **options: Any) -> dict[str, doctor.Check]:
    checks = doctor.run_checks(host, doctor.Options(options.pop("mountpoint", MP), **options))
    return {check.name: check for check in checks}


def test_a_ready_node_passes_every_check() -> None:
    checks = run(FakeHost())
    assert {name: c.status for name, c in checks.items() if c.status != "ok"} == {}
    assert "allow_other" not in checks  # only when asked
    assert "pid 4242" in checks["mountpoint"].detail
    assert "ext4" in checks["store"].detail
    assert doctor.exit_code(list(checks.values())) == 0


def test_every_line_has_the_documented_shape() -> None:
    host = FakeHost()
    host.env = {}
    host.stats["/dev/fuse"] = FileNotFoundError(errno.ENOENT, "No such file")
    checks = doctor.run_checks(host, doctor.Options(MP))
    text = doctor.render_text(checks)
    for line in text.splitlines():
        assert LINE.match(line), line
    assert "FAIL  fuse device: /dev/fuse does not exist [fix: " in text
    report = json.loads(doctor.render_json(checks))
    assert report["ok"] is False
    assert {"name", "status", "detail", "fix"} <= report["checks"][0].keys()
    assert doctor.exit_code(checks) == 1


# -- FUSE --------------------------------------------------------------------------


def test_missing_fuse_device_fails_with_the_container_fix() -> None:
    host = FakeHost()
    del host.stats["/dev/fuse"]
    check = run(host)["fuse device"]
    assert check.status == "FAIL"
    assert "--device /dev/fuse" in (check.fix or "")


def test_fuse_device_that_is_not_a_device_fails() -> None:
    host = FakeHost()
    host.stats["/dev/fuse"] = stat_result(stat.S_IFREG | 0o644)
    assert run(host)["fuse device"].status == "FAIL"


def test_unopenable_fuse_device_fails_for_root() -> None:
    host = FakeHost()
    host.open_error = PermissionError(errno.EPERM, "Operation not permitted")
    check = run(host)["fuse device"]
    assert check.status == "FAIL"
    assert "SYS_ADMIN" in (check.fix or "")


def test_users_mount_through_setuid_fusermount() -> None:
    host = FakeHost()
    host.uid = 1000
    host.open_error = PermissionError(errno.EACCES, "Permission denied")
    checks = run(host)
    assert checks["fuse device"].status == "ok"
    assert checks["fusermount3"].status == "ok"
    host.stats["/usr/bin/fusermount3"] = stat_result(stat.S_IFREG | 0o755)
    check = run(host)["fusermount3"]
    assert check.status == "FAIL"
    assert "chmod u+s" in (check.fix or "")


def test_missing_fuse_tools() -> None:
    host = FakeHost()
    del host.tools["fusermount3"], host.tools["mount.fuse3"]
    checks = run(host)
    assert checks["fusermount3"].status == "FAIL"
    assert checks["mount.fuse3"].status == "warn"
    assert "apt-get install fuse3" in (checks["mount.fuse3"].fix or "")


def test_mount_fuse3_is_found_in_sbin_whatever_path_says() -> None:
    host = FakeHost()
    host.env["PATH"] = "/usr/bin"
    assert run(host)["mount.fuse3"].status == "ok"


def test_mount_helper_must_be_on_the_system_path() -> None:
    host = FakeHost()
    host.tools["mithrilfs"] = "/home/op/venv/bin/mithrilfs"
    check = run(host)["mount helper"]
    assert check.status == "warn"
    assert check.fix == f"ln -sf {EXE} /usr/local/bin/mithrilfs"
    host.tools["mithrilfs"] = "/usr/bin/mithrilfs"  # another installation
    check = run(host)["mount helper"]
    assert check.status == "warn"
    assert "not this mithrilfs" in check.detail


def test_allow_other_needs_fuse_conf_for_users() -> None:
    host = FakeHost()
    assert run(host, allow_other=True)["allow_other"].status == "ok"  # root
    host.uid = 1000
    host.texts["/etc/fuse.conf"] = "#user_allow_other\n"
    check = run(host, allow_other=True)["allow_other"]
    assert check.status == "FAIL"
    assert "user_allow_other" in (check.fix or "")
    host.texts["/etc/fuse.conf"] = "mount_max = 10\n  user_allow_other  \n"
    assert run(host, allow_other=True)["allow_other"].status == "ok"
    del host.texts["/etc/fuse.conf"]
    assert run(host, allow_other=True)["allow_other"].status == "FAIL"


# -- the store ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "status"),
    [
        ("ext4", "ok"),
        ("xfs", "ok"),
        ("nfs4", "warn"),
        ("cifs", "warn"),
        ("fuse.sshfs", "warn"),
        ("lustre", "warn"),
        ("tmpfs", "warn"),
    ],
)
def test_store_filesystem(fstype: str, status: str) -> None:
    host = FakeHost()
    # The longest mountpoint that holds the store decides, not "/".
    host.mount_entries.insert(1, MountEntry("/var/lib", fstype, "server:/export"))
    check = run(host)["store"]
    assert check.status == status, check
    assert fstype in check.detail


def test_store_that_does_not_exist_yet_is_checked_where_it_will_be() -> None:
    host = FakeHost()
    del host.stats[str(STORE)], host.stats[str(STORE / "mithril.db")]
    host.mount_entries = [MountEntry("/", "ext4", "/dev/sda1")]
    checks = run(host, store=STORE)
    assert checks["store"].status == "ok"
    assert "does not exist yet" in checks["store"].detail
    assert "under /var/lib" in checks["store space"].detail


def test_store_that_is_a_file_fails() -> None:
    host = FakeHost()
    host.stats[str(STORE)] = stat_result(stat.S_IFREG | 0o644)
    assert run(host, store=STORE)["store"].status == "FAIL"


def test_store_space_below_one_gib_warns() -> None:
    host = FakeHost()
    host.free = 512 << 20
    check = run(host)["store space"]
    assert check.status == "warn"
    assert "0.5 GiB" in check.detail


# -- the mount ----------------------------------------------------------------------


def test_stale_mount_fails() -> None:
    host = FakeHost()
    host.stats[str(MP)] = OSError(errno.ENOTCONN, "Transport endpoint is not connected")
    check = run(host)["mountpoint"]
    assert check.status == "FAIL"
    assert "stale" in check.detail
    assert f"fusermount3 -uz {MP}" in (check.fix or "")


def test_mountpoint_states() -> None:
    host = FakeHost()
    host.mount_entries = [MountEntry("/", "ext4", "/dev/sda1")]
    check = run(host)["mountpoint"]
    assert (check.status, check.fix) == ("warn", f"mithrilfs mount {MP}")
    host.mount_entries.append(MountEntry(str(MP), "nfs4", "server:/cache"))
    assert run(host)["mountpoint"].status == "FAIL"
    del host.stats[str(MP)]
    assert run(host)["mountpoint"].fix == f"mkdir -p {MP}"


def test_mount_of_another_store_warns() -> None:
    check = run(FakeHost(), store=Path("/srv/other-store"))["mountpoint"]
    assert check.status == "warn"
    assert str(STORE) in check.detail


# -- the job environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (None, "warn"),
        (f"{MP}/triton", "ok"),
        (f"{MP}/triton/", "ok"),
        (f"{MP}/triton/rank0", "ok"),
        (f"{MP}/inductor", "warn"),
        (f"{MP}-old/triton", "warn"),
        ("/root/.triton/cache", "warn"),
    ],
)
def test_triton_cache_dir(value: str | None, status: str) -> None:
    host = FakeHost()
    if value is None:
        del host.env["TRITON_CACHE_DIR"]
    else:
        host.env["TRITON_CACHE_DIR"] = value
    check = run(host)["TRITON_CACHE_DIR"]
    assert check.status == status, check
    if status == "warn":
        assert check.fix == f'eval "$(mithrilfs env {MP})"'


def test_variables_that_turn_caches_off_warn() -> None:
    host = FakeHost()
    host.env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    host.env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    check = run(host)["cache switches"]
    assert check.status == "warn"
    assert "TORCHINDUCTOR_FX_GRAPH_CACHE=0" in check.detail
    host.env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    del host.env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]
    assert run(host)["cache switches"].status == "ok"


def test_compiler_versions() -> None:
    host = FakeHost()
    assert "2.13.0+cu128" in run(host)["torch"].detail
    host.versions = {"torch": "2.6.0"}
    checks = run(host)
    assert checks["torch"].status == "warn"
    assert "2.13" in checks["torch"].detail
    assert checks["triton"].status == "warn"
    assert "not installed" in checks["triton"].detail


def test_undetectable_device_class_fails() -> None:
    host = FakeHost()
    host.detected = DeviceClassError("no accelerator and an unknown CPU")
    check = run(host)["device class"]
    assert check.status == "FAIL"
    assert "--device-class" in (check.fix or "")


# -- real runs ----------------------------------------------------------------------


def doctor_cli(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mithrilfs", "doctor", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_real_run_on_a_live_mount(mount) -> None:
    env = dict(os.environ)
    env.update(
        TRITON_CACHE_DIR=str(mount / "triton"), TORCHINDUCTOR_CACHE_DIR=str(mount / "inductor")
    )
    code, out = doctor_cli("--mountpoint", mount.mountpoint, "--json", env=env)
    report = json.loads(out)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("fuse device", "fusermount3", "mountpoint", "TRITON_CACHE_DIR"):
        assert statuses[name] == "ok", report
    assert statuses["TORCHINDUCTOR_CACHE_DIR"] == "ok"
    # The store is found through the mount.
    store_check = next(c for c in report["checks"] if c["name"] == "store")
    assert str(mount.store) in store_check["detail"]
    assert "in use by pid" in store_check["detail"]
    assert code == (0 if report["ok"] else 1)

    code, text = doctor_cli("--mountpoint", mount.mountpoint, "--store", mount.store, env=env)
    for line in text.splitlines():
        assert LINE.match(line), line
    assert code == (1 if "\nFAIL" in "\n" + text else 0)


def test_real_run_finds_a_stale_mount(mount) -> None:
    assert mount.proc is not None
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait()
    try:
        code, text = doctor_cli("--mountpoint", mount.mountpoint)
        line = next(line for line in text.splitlines() if "mountpoint:" in line)
        assert line.startswith("FAIL  mountpoint: ")
        assert "stale" in line
        assert code == 1
    finally:
        mount.kill()  # clears the stale mount; the fixture still runs fsck


# -- the Grafana dashboard ------------------------------------------------------------------

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
METRICS = {
    "mithrilfs_cache_entries_total",
    "mithrilfs_lookups_total",
    "mithrilfs_opens_total",
    "mithrilfs_read_bytes_total",
    "mithrilfs_files_sealed_total",
    "mithrilfs_dedup_hits_total",
    "mithrilfs_evictions_total",
    "mithrilfs_evicted_bytes_total",
    "mithrilfs_integrity_failures_total",
    "mithrilfs_request_verifications_total",
    "mithrilfs_request_verified_bytes_total",
    "mithrilfs_scrub_verified_bytes_total",
    "mithrilfs_scrub_findings_total",
    "mithrilfs_scrub_passes_total",
    "mithrilfs_scrub_pass_started",
    "mithrilfs_scrub_pass_bytes",
    "mithrilfs_scrub_last_finding",
    "mithrilfs_logical_bytes",
    "mithrilfs_store_bytes",
    "mithrilfs_object_bytes",
    "mithrilfs_objects",
    "mithrilfs_entries",
    "mithrilfs_cap_bytes",
}


def test_grafana_dashboard_is_valid_and_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()  # the 24-column grid's cells that panels cover
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, panel["title"]
        cells |= covered
    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\bmithrilfs_[a-z_]+", target["expr"]))
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    assert used <= METRICS, used - METRICS
    titles = " ".join(panel["title"].lower() for panel in panels)
    for wanted in ("hit rate", "cap", "evictions", "dedup", "per node", "scrub"):
        assert wanted in titles, wanted
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "device_class"} <= variables
