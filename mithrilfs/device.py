"""Device-class detection: naming the kind of accelerator (or CPU ISA) a node has.

This module owns the device-class vocabulary (``cuda-sm90``, ``rocm-gfx942``,
``cpu-x86_64-avx512`` ...), its validation, and detecting the class of the
local node. Parsing is kept in pure functions over recorded tool output so it
can be tested without the hardware; the I/O layer (:func:`detect`) takes its
dependencies as arguments for the same reason. Nothing here imports torch or
triton: detection must be cheap and must run before either is loaded.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import importlib
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DeviceClassError",
    "choose_class",
    "cpu_class_from_cpuinfo",
    "detect",
    "parse_kfd_properties",
    "parse_nvidia_smi",
    "parse_rocminfo",
    "resolve",
    "validate_class_name",
]

MAX_CLASS_NAME_LEN = 64
_CLASS_NAME_RE = re.compile(
    r"cuda-sm[0-9]{2,3}[a-z]?"
    r"|rocm-gfx[0-9a-f]{3,5}[a-z]?"
    r"|cpu-[a-z0-9_]+(-[a-z0-9_]+)?",
    re.ASCII,
)
_TOOL_TIMEOUT_S = 10
_KFD_NODES_GLOB = "/sys/class/kfd/kfd/topology/nodes/*/properties"
_SVE_DEFAULT_VL_PATH = "/proc/sys/abi/sve_default_vector_length"

# The vector ISA torch inductor compiles CPU kernels for, in its order of
# preference (torch/_inductor/cpu_vec_isa.py, supported_vec_isa_list). Inductor
# gates AVX-512 on cpuinfo's avx512_f alone but then builds with
# "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma", and AVX2 with
# "-mavx2 -mfma -mf16c"; we require every feature those flags emit so that a
# node only gets a class whose kernels it can actually execute.
_X86_ISAS: tuple[tuple[str, frozenset[str]], ...] = (
    ("avx512", frozenset({"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"})),
    ("avx2", frozenset({"avx2", "fma", "f16c"})),
)


class DeviceClassError(Exception):
    """A device class could not be determined or is not acceptable."""


def validate_class_name(name: str) -> str:
    """Return ``name`` if it is a well-formed device class, else raise."""
    if len(name) > MAX_CLASS_NAME_LEN or not _CLASS_NAME_RE.fullmatch(name):
        raise DeviceClassError(
            f"invalid device class {name!r}: expected a name like cuda-sm90, "
            "rocm-gfx942 or cpu-x86_64-avx2"
        )
    return name


def parse_nvidia_smi(output: str) -> list[str]:
    """Classes from ``nvidia-smi --query-gpu=compute_cap --format=csv,noheader``."""
    classes = []
    for line in output.splitlines():
        value = line.strip()
        if not value:
            continue
        m = re.fullmatch(r"([0-9]+)\.([0-9]+)", value)
        if m is None:
            # Refuse rather than skip: a GPU we cannot classify must not make
            # the node silently fall back to some other class.
            raise DeviceClassError(
                f"unexpected compute capability {value!r} from nvidia-smi; "
                "pass --device-class to choose one"
            )
        classes.append(f"cuda-sm{m.group(1)}{m.group(2)}")
    return classes


def parse_rocminfo(output: str) -> list[str]:
    """One ``rocm-gfx...`` class per GPU agent in ``rocminfo`` output."""
    # Only GPU agents are named after their ISA ("Name: gfx942"); CPU agents
    # carry the processor's brand string, and the per-ISA "Name:" lines read
    # "amdgcn-amd-amdhsa--gfx942:...", so neither matches.
    names = re.findall(r"^\s*Name:\s+(gfx[0-9a-f]+)\s*$", output, re.MULTILINE)
    return [f"rocm-{name}" for name in names]


def parse_kfd_properties(text: str) -> str | None:
    """Class of one KFD topology node, or None for a CPU (or unknown) node."""
    m = re.search(r"^gfx_target_version\s+([0-9]+)\s*$", text, re.MULTILINE)
    if m is None:
        return None
    version = int(m.group(1))
    if version == 0:
        return None
    # The kernel encodes major*10000 + minor*100 + stepping; the gfx name
    # prints minor and stepping as one hex digit each (90010 -> gfx90a).
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"rocm-gfx{major}{minor:x}{stepping:x}"


def cpu_class_from_cpuinfo(machine: str, cpuinfo: str, sve_vector_bits: int | None = None) -> str:
    """CPU class from ``platform.machine()`` and ``/proc/cpuinfo`` text.

    ``sve_vector_bits`` is the SVE vector length, which /proc/cpuinfo does not
    show; :func:`detect` reads it from /proc/sys/abi/sve_default_vector_length.
    """
    arch = machine.lower()
    m = re.search(r"^(?:flags|features)\s*:(.*)$", cpuinfo, re.MULTILINE | re.I)
    features = set(m.group(1).split()) if m else set()

    if arch in ("x86_64", "amd64"):
        for isa, required in _X86_ISAS:
            if required <= features:
                return f"cpu-x86_64-{isa}"
        return "cpu-x86_64-default"

    if arch in ("aarch64", "arm64"):
        # Inductor uses SVE only with bf16 as well, and then picks VecSVE(128)
        # when the vector length is 128 bits and VecSVE(256) otherwise
        # (cpu_vec_isa.py, valid_vec_isa_list); else NEON.
        if not ({"sve", "sve2"} & features and "bf16" in features):
            return "cpu-aarch64"
        if sve_vector_bits is None:
            # Without the length we cannot tell which of the two inductor
            # would pick, so keep such nodes apart from both.
            return "cpu-aarch64-sve"
        return "cpu-aarch64-sve128" if sve_vector_bits == 128 else "cpu-aarch64-sve256"

    if arch == "s390x" and "vxe" in features:
        return "cpu-s390x-zvector"
    return "cpu-" + (re.sub(r"[^a-z0-9_]", "_", arch) or "unknown")


def choose_class(candidates: list[str]) -> str:
    """The single class among ``candidates``; mixed classes are an error."""
    distinct = sorted(set(candidates))
    if not distinct:
        raise DeviceClassError("no device found; pass --device-class to choose one")
    if len(distinct) > 1:
        raise DeviceClassError(
            f"this node has GPUs of mixed classes ({', '.join(distinct)}); "
            "pass --device-class to choose one"
        )
    return validate_class_name(distinct[0])


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _query_nvml() -> list[str]:
    """Classes of all NVIDIA GPUs via NVML; raises if NVML is unusable."""
    # Looked up by name so that nvidia-ml-py stays optional and untyped.
    nvml: Any = importlib.import_module("pynvml")
    nvml.nvmlInit()
    try:
        classes = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            classes.append(f"cuda-sm{int(major)}{int(minor)}")
        return classes
    finally:
        nvml.nvmlShutdown()


def _run_tool(run: Callable[..., subprocess.CompletedProcess[str]], argv: list[str]) -> str | None:
    """stdout of ``argv``, or None if it could not run or failed."""
    try:
        proc = run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _kfd_classes(
    glob: Callable[[str], Iterable[str]], read_text: Callable[[str], str]
) -> list[str]:
    classes = []
    for path in sorted(glob(_KFD_NODES_GLOB)):
        try:
            cls = parse_kfd_properties(read_text(path))
        except OSError:
            continue
        if cls is not None:
            classes.append(cls)
    return classes


def detect(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    read_text: Callable[[str], str] = _read_text,
    which: Callable[[str], str | None] = shutil.which,
    machine: str | None = None,
    *,
    nvml: Callable[[], list[str]] = _query_nvml,
    glob: Callable[[str], Iterable[str]] = _glob.glob,
) -> str:
    """Detect this node's device class: NVIDIA, then AMD, then the CPU.

    Each source that is missing or fails falls through to the next one; only a
    node whose GPUs disagree (or report something unparseable) is an error.
    """
    # NVML first: it needs no subprocess and works where nvidia-smi is not
    # installed. Any failure (no module, no driver, no GPU) just falls through.
    try:
        classes = nvml()
    except Exception:
        classes = []
    if not classes and (smi := which("nvidia-smi")):
        out = _run_tool(run, [smi, "--query-gpu=compute_cap", "--format=csv,noheader"])
        if out is not None:
            classes = parse_nvidia_smi(out)
    if classes:
        return choose_class(classes)

    if rocminfo := which("rocminfo"):
        out = _run_tool(run, [rocminfo])
        if out is not None:
            classes = parse_rocminfo(out)
    if not classes:
        # The KFD topology is what rocminfo reads itself; it is there whenever
        # the amdgpu driver is loaded, even without ROCm user space.
        classes = _kfd_classes(glob, read_text)
    if classes:
        return choose_class(classes)

    try:
        cpuinfo = read_text("/proc/cpuinfo")
    except OSError:
        cpuinfo = ""
    sve_bits = None
    with contextlib.suppress(OSError, ValueError):
        sve_bits = int(read_text(_SVE_DEFAULT_VL_PATH).strip()) * 8
    return validate_class_name(
        cpu_class_from_cpuinfo(machine or platform.machine(), cpuinfo, sve_bits)
    )


def resolve(requested: str | None) -> str:
    """The device class to use: detected for None/"auto", else validated."""
    if requested is None or requested == "auto":
        return detect()
    return validate_class_name(requested)
