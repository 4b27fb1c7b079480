"""What this machine has: RAM, CPU cores and features, NVIDIA GPUs, Apple Silicon.

`detect_device()` never raises for a missing or failing tool: a GPU tool that is
absent, times out or prints something unexpected leaves the device on the CPU and
adds a note saying why. Every reading is best effort; `qreg recommend` lets the user
override RAM, VRAM and backend.

Sources, per platform:
- Linux: /proc/meminfo (MemTotal, MemAvailable), the cgroup v2 or v1 memory limit
  of this process, /proc/cpuinfo flags, os.sched_getaffinity for usable cores.
- macOS: `sysctl` (hw.memsize, hw.optional.arm64, hw.optional.arm.FEAT_*,
  iogpu.wired_limit_mb) and `vm_stat` for free pages.
- Windows: GlobalMemoryStatusEx and IsProcessorFeaturePresent through ctypes.
- NVIDIA GPUs on any platform: `nvidia-smi --query-gpu`.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOOL_TIMEOUT_SECONDS = 10.0

# macOS lets Metal wire at most this share of RAM unless iogpu.wired_limit_mb sets
# another limit (Apple's recommendedMaxWorkingSetSize: about 2/3 up to 36 GiB, 3/4 above).
# NOTE: the shares are Apple's documented defaults, not measured here (no Mac available).
METAL_SHARE_SMALL = 2 / 3
METAL_SHARE_LARGE = 3 / 4
METAL_LARGE_RAM_BYTES = 36 << 30


@dataclass(frozen=True)
class GPU:
    """One GPU that llama.cpp could offload to."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    backend: str = "cuda"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "backend": self.backend,
        }


@dataclass(frozen=True)
class Device:
    """The memory, cores and accelerators qreg plans for.

    `ram_available_bytes` is what a new process can use now without swapping (Linux
    MemAvailable, capped by the cgroup limit). `cpu_features` contains the lower-case
    names of the SIMD features that decide llama.cpp's CPU weight repacking (avx2,
    avx512f, neon, dotprod, i8mm); None means they could not be read.
    """

    system: str
    machine: str
    backend: str
    cpu_cores: int
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    gpus: tuple[GPU, ...] = ()
    unified_memory: bool = False
    metal_budget_bytes: int | None = None
    cpu_features: frozenset[str] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def vram_free_bytes(self) -> int | None:
        """Return the free VRAM summed over the GPUs, or None without GPUs.

        llama.cpp splits layers across GPUs by default, so the sum is the budget for
        full offload. NOTE: it ignores how evenly the layers divide; one large GPU
        is a safer plan than several small ones with the same total.
        """
        if not self.gpus:
            return None
        return sum(gpu.free_bytes for gpu in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "machine": self.machine,
            "backend": self.backend,
            "cpu_cores": self.cpu_cores,
            "ram_total_bytes": self.ram_total_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "vram_free_bytes": self.vram_free_bytes,
            "unified_memory": self.unified_memory,
            "metal_budget_bytes": self.metal_budget_bytes,
            "cpu_features": sorted(self.cpu_features) if self.cpu_features is not None else None,
            "notes": list(self.notes),
        }


def detect_device() -> Device:
    """Detect RAM, cores, CPU features and GPUs of this machine; never raises for a missing tool."""
    system = platform.system()
    machine = platform.machine().lower()
    notes: list[str] = []

    if system == "Linux":
        total, available = linux_memory(notes)
    elif system == "Darwin":
        total, available = macos_memory(notes)
    elif system == "Windows":
        total, available = windows_memory(notes)
    else:
        total, available = None, None
        notes.append(f"memory detection is not implemented for {system}; pass --ram")

    gpus = nvidia_gpus(notes)
    apple_silicon = system == "Darwin" and macos_is_apple_silicon()
    metal_budget = macos_metal_budget(total) if apple_silicon else None

    if gpus:
        backend = "cuda"
    elif apple_silicon:
        backend = "metal"
    else:
        backend = "cpu"

    return Device(
        system=system,
        machine=machine,
        backend=backend,
        cpu_cores=usable_cores(),
        ram_total_bytes=total,
        ram_available_bytes=available,
        gpus=tuple(gpus),
        unified_memory=apple_silicon,
        metal_budget_bytes=metal_budget,
        cpu_features=detect_cpu_features(),
        notes=tuple(notes),
    )


def detect_cpu_features() -> frozenset[str] | None:
    """Return the SIMD features that decide llama.cpp's CPU repacking, or None when unreadable."""
    system = platform.system()
    if system == "Linux":
        return linux_cpu_features()
    if system == "Darwin":
        return macos_cpu_features()
    if system == "Windows":
        return windows_cpu_features()
    return None


def usable_cores() -> int:
    """Return the cores this process may run on (its CPU affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_tool(args: list[str], notes: list[str]) -> str | None:
    """Run a detection tool and return its stdout, or None (with a note) when it is absent or fails."""
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        notes.append(f"{args[0]} timed out after {TOOL_TIMEOUT_SECONDS:.0f} s; ignoring it")
        return None
    except OSError as error:
        notes.append(f"{args[0]} could not run ({error.strerror}); ignoring it")
        return None
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        detail = reason[0] if reason else f"exit code {result.returncode}"
        notes.append(f"{args[0]} failed ({detail}); ignoring it")
        return None
    return result.stdout


# Linux --------------------------------------------------------------------------------


def linux_memory(notes: list[str], proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """Read MemTotal and MemAvailable, both capped by this process's cgroup memory limit."""
    meminfo = _read_meminfo(proc / "meminfo")
    total = meminfo.get("MemTotal")
    available = meminfo.get("MemAvailable")
    if total is None or available is None:
        notes.append(f"{proc / 'meminfo'} has no MemTotal/MemAvailable; pass --ram")
        return total, available

    limit, usage = cgroup_memory(proc, cgroup_root)
    if limit is not None and limit < total:
        notes.append(f"a cgroup memory limit of {limit} bytes applies to this process")
        total = limit
        available = min(available, max(limit - (usage or 0), 0))
    return total, available


def _read_meminfo(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match[1]] = int(match[2]) * 1024
    return values


def cgroup_memory(proc: Path, cgroup_root: Path) -> tuple[int | None, int | None]:
    """Return (limit, usage) in bytes of this process's cgroup (v2, else v1), or (None, None)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None

    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            directory = cgroup_root / relative
            return _read_limit(directory / "memory.max"), _read_limit(directory / "memory.current")
        if "memory" in controllers.split(","):
            directory = cgroup_root / "memory" / relative
            return _read_limit(directory / "memory.limit_in_bytes"), _read_limit(directory / "memory.usage_in_bytes")
    return None, None


def _read_limit(path: Path) -> int | None:
    # "max" (v2) and the page-counter maximum (v1, about 2^63) both mean no limit.
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= 1 << 60 else value


def linux_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """Return the repack-relevant SIMD features from /proc/cpuinfo flags (x86) or Features (ARM)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    if match is None:
        return None
    flags = set(match[1].split())
    features = set()
    for flag, name in (("avx2", "avx2"), ("avx512f", "avx512f"), ("asimd", "neon"), ("asimddp", "dotprod"), ("i8mm", "i8mm")):
        if flag in flags:
            features.add(name)
    return frozenset(features)


# macOS --------------------------------------------------------------------------------


def _sysctl(name: str, notes: list[str]) -> str | None:
    output = run_tool(["sysctl", "-n", name], notes)
    return output.strip() if output is not None else None


def macos_memory(notes: list[str]) -> tuple[int | None, int | None]:
    """Read hw.memsize and the free, inactive and speculative pages that `vm_stat` reports."""
    total_text = _sysctl("hw.memsize", notes)
    total = int(total_text) if total_text and total_text.isdigit() else None

    available = None
    output = run_tool(["vm_stat"], notes)
    if output is not None:
        page_size = 4096
        size_match = re.search(r"page size of (\d+) bytes", output)
        if size_match:
            page_size = int(size_match[1])
        pages = 0
        for key in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
            match = re.search(rf"^{key}:\s+(\d+)", output, re.MULTILINE)
            if match:
                pages += int(match[1])
        available = pages * page_size if pages else None

    if total is None or available is None:
        notes.append("sysctl/vm_stat gave no memory figures; pass --ram")
    return total, available


def macos_is_apple_silicon() -> bool:
    return _sysctl("hw.optional.arm64", []) == "1"


def macos_cpu_features() -> frozenset[str] | None:
    features = set()
    if macos_is_apple_silicon():
        features.add("neon")
        if _sysctl("hw.optional.arm.FEAT_DotProd", []) == "1":
            features.add("dotprod")
        if _sysctl("hw.optional.arm.FEAT_I8MM", []) == "1":
            features.add("i8mm")
    else:
        leaf7 = _sysctl("machdep.cpu.leaf7_features", []) or ""
        if "AVX2" in leaf7.split():
            features.add("avx2")
        if "AVX512F" in leaf7.split():
            features.add("avx512f")
    return frozenset(features)


def macos_metal_budget(ram_total: int | None) -> int | None:
    """Return how much memory Metal may wire: iogpu.wired_limit_mb when set, else Apple's default share."""
    limit_text = _sysctl("iogpu.wired_limit_mb", [])
    if limit_text and limit_text.isdigit() and int(limit_text) > 0:
        return int(limit_text) << 20
    if ram_total is None:
        return None
    share = METAL_SHARE_LARGE if ram_total > METAL_LARGE_RAM_BYTES else METAL_SHARE_SMALL
    return int(ram_total * share)


# Windows ------------------------------------------------------------------------------

# IsProcessorFeaturePresent constants (winnt.h).
_PF_AVX2 = 40
_PF_AVX512F = 41
_PF_ARM_DOTPROD = 43


def windows_memory(notes: list[str], kernel32: Any = None) -> tuple[int | None, int | None]:
    """Read total and available physical memory with GlobalMemoryStatusEx."""
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong),
            ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong),
            ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong),
            ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong),
            ("ullAvailVirtual", ctypes.c_ulonglong),
            ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    if kernel32 is None:
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    if not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        notes.append("GlobalMemoryStatusEx failed; pass --ram")
        return None, None
    return int(status.ullTotalPhys), int(status.ullAvailPhys)


def windows_cpu_features(kernel32: Any = None) -> frozenset[str] | None:
    try:
        import ctypes

        if kernel32 is None:
            kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return None
    features = set()
    for constant, name in ((_PF_AVX2, "avx2"), (_PF_AVX512F, "avx512f"), (_PF_ARM_DOTPROD, "dotprod")):
        if kernel32.IsProcessorFeaturePresent(constant):
            features.add(name)
    return frozenset(features)


# NVIDIA -------------------------------------------------------------------------------


def nvidia_gpus(notes: list[str]) -> list[GPU]:
    """List NVIDIA GPUs with total and free VRAM from nvidia-smi; empty when it is absent or fails."""
    output = run_tool(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
        notes,
    )
    if output is None:
        return []

    gpus = []
    for line in output.strip().splitlines():
        fields = [part.strip() for part in line.split(",")]
        try:
            index, name, total_mib, free_mib = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            notes.append(f"nvidia-smi printed an unexpected line '{line.strip()}'; ignoring the GPUs")
            return []
        gpus.append(GPU(index=index, name=name, total_bytes=total_mib << 20, free_bytes=free_mib << 20))
    if not gpus:
        notes.append("nvidia-smi lists no GPU; using the CPU")
    return gpus
