"""Tests for mithrilfs.device: class names, parsers and detection.

The nvidia-smi and rocminfo outputs under tests/data/device/ are recorded
(written in the tools' real output format) because no GPU is present on the
machine that runs these tests; detect() is driven with injected fakes of the
tools, files and NVML instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from mithrilfs.device import (
    DeviceClassError,
    choose_class,
    cpu_class_from_cpuinfo,
    detect,
    parse_kfd_properties,
    parse_nvidia_smi,
    parse_rocminfo,
    resolve,
    validate_class_name,
)

DATA = Path(__file__).parent / "data" / "device"
KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"


def data(name: str) -> str:
    return (DATA / name).read_text()


# --- validate_class_name -------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "cuda-sm80",
        "cuda-sm90",
        "cuda-sm90a",
        "cuda-sm100",
        "cuda-sm120",
        "rocm-gfx942",
        "rocm-gfx90a",
        "rocm-gfx1100",
        "cpu-x86_64-avx512",
        "cpu-x86_64-avx2",
        "cpu-x86_64-default",
        "cpu-aarch64",
        "cpu-aarch64-sve256",
    ],
)
def test_validate_accepts(name: str) -> None:
    assert validate_class_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "auto",
        "cuda",
        "cuda-sm9",
        "cuda-sm1000",
        "CUDA-SM90",
        "cuda-sm90-",
        "rocm-gfx94",
        "rocm-gfx9420000",
        "cpu-",
        "cpu-x86_64-avx512-extra",
        "cpu-x86 64",
        "cpu-../etc",
        "cuda-sm90\n",
        "cuda-sm٩٠",  # non-ASCII digits
        "cpu-" + "a" * 61,  # 65 chars
    ],
)
def test_validate_rejects(name: str) -> None:
    with pytest.raises(DeviceClassError, match=r"expected a name like cuda-sm90"):
        validate_class_name(name)


def test_validate_length_limit() -> None:
    assert validate_class_name("cpu-" + "a" * 60) == "cpu-" + "a" * 60


def test_validate_message_is_one_line() -> None:
    with pytest.raises(DeviceClassError) as exc:
        validate_class_name("bogus")
    assert str(exc.value) == (
        "invalid device class 'bogus': expected a name like cuda-sm90, "
        "rocm-gfx942 or cpu-x86_64-avx2"
    )


# --- parsers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("nvidia_smi_h100x8.txt", ["cuda-sm90"] * 8),
        ("nvidia_smi_a100x8.txt", ["cuda-sm80"] * 8),
        ("nvidia_smi_b200x8.txt", ["cuda-sm100"] * 8),
        ("nvidia_smi_mixed_a100_h100.txt", ["cuda-sm80"] * 2 + ["cuda-sm90"] * 2),
    ],
)
def test_parse_nvidia_smi(fixture: str, expected: list[str]) -> None:
    assert parse_nvidia_smi(data(fixture)) == expected


def test_parse_nvidia_smi_whitespace_and_blank_lines() -> None:
    assert parse_nvidia_smi("\n  12.0 \r\n\n 8.6\n") == ["cuda-sm120", "cuda-sm86"]
    assert parse_nvidia_smi("") == []


def test_parse_nvidia_smi_rejects_garbage() -> None:
    with pytest.raises(DeviceClassError, match=r"\[N/A\]"):
        parse_nvidia_smi("9.0\n[N/A]\n")


def test_parse_rocminfo_mi300x() -> None:
    # CPU agents ("AMD EPYC ...") and the per-ISA "amdgcn-...--gfx942" names
    # must not count; each of the 8 GPU agents does.
    assert parse_rocminfo(data("rocminfo_mi300x.txt")) == ["rocm-gfx942"] * 8


def test_parse_rocminfo_cpu_only() -> None:
    text = data("rocminfo_mi300x.txt")
    cpu_only = text[: text.index("Agent 3")]
    assert parse_rocminfo(cpu_only) == []


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("kfd_node0_cpu_properties.txt", None),
        ("kfd_node2_mi300x_properties.txt", "rocm-gfx942"),
        ("kfd_node2_mi250x_properties.txt", "rocm-gfx90a"),
        ("kfd_node1_rx7900xtx_properties.txt", "rocm-gfx1100"),
    ],
)
def test_parse_kfd_properties(fixture: str, expected: str | None) -> None:
    assert parse_kfd_properties(data(fixture)) == expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [("90402", "rocm-gfx942"), ("90010", "rocm-gfx90a"), ("100300", "rocm-gfx1030"),
     ("120001", "rocm-gfx1201"), ("0", None)],
)  # fmt: skip
def test_parse_kfd_target_version(version: str, expected: str | None) -> None:
    assert parse_kfd_properties(f"simd_count 4\ngfx_target_version {version}\n") == expected


def test_parse_kfd_without_target_version() -> None:
    assert parse_kfd_properties("cpu_cores_count 8\n") is None


@pytest.mark.parametrize(
    ("machine", "fixture", "sve_bits", "expected"),
    [
        ("x86_64", "cpuinfo_xeon_8480_spr.txt", None, "cpu-x86_64-avx512"),
        ("x86_64", "cpuinfo_epyc_7763_zen3.txt", None, "cpu-x86_64-avx2"),
        ("x86_64", "cpuinfo_xeon_e5_2670_sandybridge.txt", None, "cpu-x86_64-default"),
        ("AMD64", "cpuinfo_epyc_7763_zen3.txt", None, "cpu-x86_64-avx2"),
        ("aarch64", "cpuinfo_neoverse_v1_graviton3.txt", 256, "cpu-aarch64-sve256"),
        ("aarch64", "cpuinfo_neoverse_v1_graviton3.txt", 128, "cpu-aarch64-sve128"),
        ("aarch64", "cpuinfo_neoverse_v1_graviton3.txt", None, "cpu-aarch64-sve"),
        ("aarch64", "cpuinfo_neoverse_n1_graviton2.txt", None, "cpu-aarch64"),
        ("aarch64", "cpuinfo_neoverse_n1_graviton2.txt", 256, "cpu-aarch64"),
    ],
)
def test_cpu_class_from_cpuinfo(
    machine: str, fixture: str, sve_bits: int | None, expected: str
) -> None:
    cls = cpu_class_from_cpuinfo(machine, data(fixture), sve_bits)
    assert cls == expected
    assert validate_class_name(cls) == cls


def test_cpu_class_ignores_vmx_flags_line() -> None:
    # Only the "flags" line counts, not "vmx flags" (or a truncated excerpt).
    info = "vmx flags\t: avx512f avx512dq avx512vl avx512bw fma\nflags\t\t: sse avx\n"
    assert cpu_class_from_cpuinfo("x86_64", info) == "cpu-x86_64-default"


def test_cpu_class_avx512_needs_what_inductor_compiles_with() -> None:
    # avx512f alone (Knights Landing style) is not enough for -mavx512bw/-vl/-dq.
    info = "flags\t\t: avx avx2 fma f16c avx512f avx512cd\n"
    assert cpu_class_from_cpuinfo("x86_64", info) == "cpu-x86_64-avx2"


def test_cpu_class_sve_without_bf16_is_neon() -> None:
    assert cpu_class_from_cpuinfo("aarch64", "Features\t: fp asimd sve\n", 512) == "cpu-aarch64"


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "expected"),
    [
        ("ppc64le", "cpu\t\t: POWER9\n", "cpu-ppc64le"),
        ("s390x", "features\t: esan3 zarch stfle vx vxd vxe gs\n", "cpu-s390x-zvector"),
        ("s390x", "features\t: esan3 zarch stfle\n", "cpu-s390x"),
        ("riscv64", "", "cpu-riscv64"),
        ("", "", "cpu-unknown"),
    ],
)
def test_cpu_class_other_arches(machine: str, cpuinfo: str, expected: str) -> None:
    assert cpu_class_from_cpuinfo(machine, cpuinfo) == expected


def test_choose_class() -> None:
    assert choose_class(["cuda-sm90"] * 8) == "cuda-sm90"
    with pytest.raises(DeviceClassError) as exc:
        choose_class(["cuda-sm90", "cuda-sm80", "cuda-sm90"])
    assert str(exc.value) == (
        "this node has GPUs of mixed classes (cuda-sm80, cuda-sm90); "
        "pass --device-class to choose one"
    )
    with pytest.raises(DeviceClassError, match="no device"):
        choose_class([])


# --- detect() with injected fakes ---------------------------------------------------


class FakeNode:
    """The tools, files and NVML of an imaginary node, for detect()."""

    def __init__(
        self,
        *,
        tools: dict[str, tuple[int, str] | BaseException] | None = None,
        files: dict[str, str] | None = None,
        nvml: list[str] | BaseException | None = None,
        machine: str = "x86_64",
    ) -> None:
        self.tools = tools or {}
        self.files = {"/proc/cpuinfo": data("cpuinfo_epyc_7763_zen3.txt"), **(files or {})}
        self.nvml_result = nvml if nvml is not None else ImportError("No module named 'pynvml'")
        self.machine = machine
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.tools else None

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        result = self.tools[os.path.basename(argv[0])]
        if isinstance(result, BaseException):
            raise result
        rc, stdout = result
        return subprocess.CompletedProcess(argv, rc, stdout, "")

    def read_text(self, path: str) -> str:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    def glob(self, pattern: str) -> Iterable[str]:
        assert pattern == f"{KFD_NODES}/*/properties"
        return [p for p in self.files if p.startswith(KFD_NODES)]

    def nvml(self) -> list[str]:
        if isinstance(self.nvml_result, BaseException):
            raise self.nvml_result
        return self.nvml_result

    def detect(self) -> str:
        return detect(
            run=self.run,
            read_text=self.read_text,
            which=self.which,
            machine=self.machine,
            nvml=self.nvml,
            glob=self.glob,
        )


def test_detect_nvml() -> None:
    node = FakeNode(nvml=["cuda-sm90"] * 8, tools={"nvidia-smi": (0, "8.0\n")})
    assert node.detect() == "cuda-sm90"
    assert node.calls == []


def test_detect_nvidia_smi() -> None:
    node = FakeNode(tools={"nvidia-smi": (0, data("nvidia_smi_h100x8.txt"))})
    assert node.detect() == "cuda-sm90"
    [(argv, kwargs)] = node.calls
    assert argv == ["/usr/bin/nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    assert kwargs["timeout"] == 10


def test_detect_nvml_failing_then_nvidia_smi() -> None:
    node = FakeNode(
        nvml=RuntimeError("NVML Shared Library Not Found"),
        tools={"nvidia-smi": (0, data("nvidia_smi_a100x8.txt"))},
    )
    assert node.detect() == "cuda-sm80"


def test_detect_b200() -> None:
    node = FakeNode(tools={"nvidia-smi": (0, data("nvidia_smi_b200x8.txt"))})
    assert node.detect() == "cuda-sm100"


@pytest.mark.parametrize(
    "failure",
    [
        (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"),
        (0, ""),  # driver installed, no GPU
        subprocess.TimeoutExpired(["nvidia-smi"], 10),
        PermissionError(13, "Permission denied"),
    ],
)
def test_detect_nvidia_smi_failing_falls_through(
    failure: tuple[int, str] | BaseException,
) -> None:
    node = FakeNode(tools={"nvidia-smi": failure})
    assert node.detect() == "cpu-x86_64-avx2"


def test_detect_nvidia_smi_failing_falls_through_to_rocm() -> None:
    node = FakeNode(
        tools={
            "nvidia-smi": (9, "No devices were found\n"),
            "rocminfo": (0, data("rocminfo_mi300x.txt")),
        }
    )
    assert node.detect() == "rocm-gfx942"


def test_detect_rocminfo() -> None:
    node = FakeNode(tools={"rocminfo": (0, data("rocminfo_mi300x.txt"))})
    assert node.detect() == "rocm-gfx942"
    assert node.calls[0][0] == ["/usr/bin/rocminfo"]


def kfd_files(*fixtures: str) -> dict[str, str]:
    return {f"{KFD_NODES}/{i}/properties": data(f) for i, f in enumerate(fixtures)}


def test_detect_kfd_sysfs_without_rocminfo() -> None:
    node = FakeNode(
        files=kfd_files(
            "kfd_node0_cpu_properties.txt",
            "kfd_node0_cpu_properties.txt",
            *["kfd_node2_mi300x_properties.txt"] * 8,
        )
    )
    assert node.detect() == "rocm-gfx942"


def test_detect_rocminfo_failing_uses_kfd_sysfs() -> None:
    node = FakeNode(
        tools={"rocminfo": (1, "")},
        files=kfd_files("kfd_node0_cpu_properties.txt", "kfd_node2_mi250x_properties.txt"),
    )
    assert node.detect() == "rocm-gfx90a"


def test_detect_kfd_cpu_nodes_only_is_cpu() -> None:
    node = FakeNode(files=kfd_files("kfd_node0_cpu_properties.txt"))
    assert node.detect() == "cpu-x86_64-avx2"


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("cpuinfo_xeon_8480_spr.txt", "cpu-x86_64-avx512"),
        ("cpuinfo_epyc_7763_zen3.txt", "cpu-x86_64-avx2"),
        ("cpuinfo_xeon_e5_2670_sandybridge.txt", "cpu-x86_64-default"),
    ],
)
def test_detect_no_tools_is_cpu(fixture: str, expected: str) -> None:
    node = FakeNode(files={"/proc/cpuinfo": data(fixture)})
    assert node.detect() == expected
    assert node.calls == []


@pytest.mark.parametrize(
    ("vl_bytes", "expected"),
    [("32\n", "cpu-aarch64-sve256"), ("16\n", "cpu-aarch64-sve128"), (None, "cpu-aarch64-sve")],
)
def test_detect_aarch64_sve_length(vl_bytes: str | None, expected: str) -> None:
    files = {"/proc/cpuinfo": data("cpuinfo_neoverse_v1_graviton3.txt")}
    if vl_bytes is not None:
        files["/proc/sys/abi/sve_default_vector_length"] = vl_bytes
    assert FakeNode(files=files, machine="aarch64").detect() == expected


def test_detect_unreadable_cpuinfo() -> None:
    node = FakeNode()
    del node.files["/proc/cpuinfo"]
    assert node.detect() == "cpu-x86_64-default"


def test_detect_mixed_gpus_is_an_error() -> None:
    node = FakeNode(tools={"nvidia-smi": (0, data("nvidia_smi_mixed_a100_h100.txt"))})
    with pytest.raises(DeviceClassError, match=r"mixed classes \(cuda-sm80, cuda-sm90\)"):
        node.detect()


def test_detect_mixed_via_nvml_is_an_error() -> None:
    node = FakeNode(nvml=["cuda-sm80", "cuda-sm90"])
    with pytest.raises(DeviceClassError, match="--device-class"):
        node.detect()


# --- on this machine -------------------------------------------------------------------


def _has_gpu_tooling() -> bool:
    return bool(
        shutil.which("nvidia-smi") or shutil.which("rocminfo") or os.path.exists("/sys/class/kfd")
    )


needs_cpu_only_node = pytest.mark.skipif(
    _has_gpu_tooling(), reason="this machine has GPU tooling; expects a CPU-only node"
)


@needs_cpu_only_node
def test_real_detect_on_this_machine_is_cpu() -> None:
    cls = detect()
    assert cls.startswith("cpu-")
    assert validate_class_name(cls) == cls


@needs_cpu_only_node
@pytest.mark.parametrize("requested", [None, "auto"])
def test_resolve_auto(requested: str | None) -> None:
    assert resolve(requested).startswith("cpu-")


def test_resolve_explicit() -> None:
    assert resolve("cuda-sm90a") == "cuda-sm90a"
    with pytest.raises(DeviceClassError):
        resolve("sm90")
