"""Tests of device detection (registry.device).

GPU and macOS tools cannot run for real on the Linux test machines, so these tests put
stub executables named nvidia-smi, sysctl and vm_stat on PATH: small shell scripts in
tmp_path that print what the real tools print. Windows' kernel32 is replaced by a stub
object. Linux memory is read from real files laid out like /proc and /sys/fs/cgroup.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from registry import device as device_module
from registry.cli.main import cli
from registry.device import (
    detect_device,
    linux_cpu_features,
    linux_memory,
    macos_memory,
    macos_metal_budget,
    nvidia_gpus,
    windows_cpu_features,
    windows_memory,
)

GIB = 1 << 30

NVIDIA_TWO_GPUS = "0, NVIDIA GeForce RTX 4090, 24564, 23000\n1, NVIDIA A10, 23028, 20000\n"


def write_stub(directory: Path, name: str, body: str) -> Path:
    """Write an executable shell script stub standing in for a system tool."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a folder that comes first on PATH, for stub tools."""
    directory = tmp_path / "stubs"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


@pytest.fixture
def no_gpu_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any real nvidia-smi: PATH keeps only the folders that do not contain one."""
    kept = [entry for entry in os.environ["PATH"].split(os.pathsep) if not (Path(entry) / "nvidia-smi").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))


# nvidia-smi -------------------------------------------------------------------------


def test_nvidia_gpus_parsed(stub_dir):
    write_stub(stub_dir, "nvidia-smi", f"printf '{NVIDIA_TWO_GPUS}'\n")
    notes: list[str] = []
    gpus = nvidia_gpus(notes)
    assert [gpu.name for gpu in gpus] == ["NVIDIA GeForce RTX 4090", "NVIDIA A10"]
    assert gpus[0].total_bytes == 24564 << 20
    assert gpus[0].free_bytes == 23000 << 20
    assert notes == []


def test_nvidia_missing_no_note(no_gpu_tools):
    notes: list[str] = []
    assert nvidia_gpus(notes) == []
    assert notes == []


def test_nvidia_failing_falls_back(stub_dir):
    write_stub(stub_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n")
    notes: list[str] = []
    assert nvidia_gpus(notes) == []
    assert len(notes) == 1
    assert "nvidia-smi failed" in notes[0]
    assert "could not communicate" in notes[0]


def test_nvidia_garbage_falls_back(stub_dir):
    write_stub(stub_dir, "nvidia-smi", "echo 'No devices were found, or something'\n")
    notes: list[str] = []
    assert nvidia_gpus(notes) == []
    assert "unexpected line" in notes[0]


def test_nvidia_hanging_times_out(stub_dir, monkeypatch):
    monkeypatch.setattr(device_module, "TOOL_TIMEOUT_SECONDS", 0.5)
    write_stub(stub_dir, "nvidia-smi", "sleep 30\n")
    notes: list[str] = []
    assert nvidia_gpus(notes) == []
    assert "timed out" in notes[0]


def test_nvidia_not_executable_falls_back(stub_dir):
    path = stub_dir / "nvidia-smi"
    path.write_text("#!/nonexistent/interpreter\n")
    path.chmod(0o755)
    notes: list[str] = []
    assert nvidia_gpus(notes) == []
    assert "could not run" in notes[0]


def test_detect_device_cuda_with_gpu(stub_dir):
    write_stub(stub_dir, "nvidia-smi", f"printf '{NVIDIA_TWO_GPUS}'\n")
    device = detect_device()
    assert device.backend == "cuda"
    assert device.vram_free_bytes == (23000 + 20000) << 20


def test_detect_device_cpu_without_gpu(no_gpu_tools):
    device = detect_device()
    assert device.backend == ("metal" if platform.system() == "Darwin" else "cpu")
    assert device.cpu_cores >= 1
    assert device.gpus == ()


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_detect_device_linux_memory_real():
    device = detect_device()
    assert device.ram_total_bytes > 0
    assert 0 < device.ram_available_bytes <= device.ram_total_bytes


# Linux /proc and cgroups ----------------------------------------------------------------


def write_proc(root: Path, meminfo: str, cgroup: str) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(meminfo)
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"


def test_linux_memory_no_cgroup_limit(tmp_path):
    proc = write_proc(tmp_path, MEMINFO, "0::/user.slice\n")
    cgroup = tmp_path / "cgroup" / "user.slice"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text("max\n")
    notes: list[str] = []
    total, available = linux_memory(notes, proc, tmp_path / "cgroup")
    assert total == 16000000 * 1024
    assert available == 8000000 * 1024
    assert notes == []


def test_linux_memory_cgroup_v2_limit(tmp_path):
    proc = write_proc(tmp_path, MEMINFO, "0::/docker/abc\n")
    cgroup = tmp_path / "cgroup" / "docker" / "abc"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(str(4 * GIB))
    (cgroup / "memory.current").write_text(str(1 * GIB))
    notes: list[str] = []
    total, available = linux_memory(notes, proc, tmp_path / "cgroup")
    assert total == 4 * GIB
    assert available == 3 * GIB
    assert "cgroup memory limit" in notes[0]


def test_linux_memory_cgroup_v1_limit(tmp_path):
    proc = write_proc(tmp_path, MEMINFO, "12:cpu,cpuacct:/x\n9:memory:/kubepods/pod1\n")
    cgroup = tmp_path / "cgroup" / "memory" / "kubepods" / "pod1"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (cgroup / "memory.usage_in_bytes").write_text(str(GIB // 2))
    notes: list[str] = []
    total, available = linux_memory(notes, proc, tmp_path / "cgroup")
    assert total == 2 * GIB
    assert available == GIB + GIB // 2


def test_linux_memory_v1_unlimited(tmp_path):
    proc = write_proc(tmp_path, MEMINFO, "9:memory:/\n")
    cgroup = tmp_path / "cgroup" / "memory"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    total, _ = linux_memory([], proc, tmp_path / "cgroup")
    assert total == 16000000 * 1024


def test_linux_memory_unreadable_meminfo(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    notes: list[str] = []
    assert linux_memory(notes, proc, tmp_path) == (None, None)
    assert "pass --ram" in notes[0]


def test_linux_cpu_features_x86(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n")
    assert linux_cpu_features(cpuinfo) == frozenset({"avx2", "avx512f"})


def test_linux_cpu_features_arm(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm\n")
    assert linux_cpu_features(cpuinfo) == frozenset({"neon", "dotprod", "i8mm"})


def test_linux_cpu_features_missing(tmp_path):
    assert linux_cpu_features(tmp_path / "absent") is None


# macOS (stubbed sysctl and vm_stat) -------------------------------------------------


SYSCTL_M2_16GB = """case "$2" in
  hw.memsize) echo 17179869184 ;;
  hw.optional.arm64) echo 1 ;;
  hw.optional.arm.FEAT_DotProd) echo 1 ;;
  hw.optional.arm.FEAT_I8MM) echo 1 ;;
  iogpu.wired_limit_mb) echo 0 ;;
  *) echo "sysctl: unknown oid '$2'" >&2; exit 1 ;;
esac
"""

VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               100000.
Pages active:                             300000.
Pages inactive:                           200000.
Pages speculative:                         10000.
Pages purgeable:                            5000.
"""


def test_macos_memory_from_stubs(stub_dir):
    write_stub(stub_dir, "sysctl", SYSCTL_M2_16GB)
    write_stub(stub_dir, "vm_stat", f"cat <<'EOF'\n{VM_STAT}EOF\n")
    notes: list[str] = []
    total, available = macos_memory(notes)
    assert total == 16 * GIB
    assert available == (100000 + 200000 + 10000 + 5000) * 16384
    assert notes == []


def test_macos_metal_budget_default_share(stub_dir):
    write_stub(stub_dir, "sysctl", SYSCTL_M2_16GB)
    assert macos_metal_budget(16 * GIB) == int(16 * GIB * 2 / 3)
    assert macos_metal_budget(64 * GIB) == int(64 * GIB * 3 / 4)


def test_macos_metal_budget_wired_limit(stub_dir):
    write_stub(stub_dir, "sysctl", 'if [ "$2" = iogpu.wired_limit_mb ]; then echo 12288; else exit 1; fi\n')
    assert macos_metal_budget(16 * GIB) == 12 * GIB


def test_detect_device_apple_silicon(stub_dir, monkeypatch):
    # platform.system is patched so the Darwin branch runs on this machine; sysctl and vm_stat are stubs.
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    write_stub(stub_dir, "sysctl", SYSCTL_M2_16GB)
    write_stub(stub_dir, "vm_stat", f"cat <<'EOF'\n{VM_STAT}EOF\n")
    write_stub(stub_dir, "nvidia-smi", "exit 127\n")
    device = detect_device()
    assert device.backend == "metal"
    assert device.unified_memory
    assert device.ram_total_bytes == 16 * GIB
    assert device.metal_budget_bytes == int(16 * GIB * 2 / 3)
    assert device.cpu_features == frozenset({"neon", "dotprod", "i8mm"})


def test_detect_device_macos_broken_sysctl(stub_dir, monkeypatch):
    # platform.system is patched so the Darwin branch runs; the sysctl stub fails like a broken tool.
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    write_stub(stub_dir, "sysctl", "echo 'sysctl: permission denied' >&2\nexit 1\n")
    write_stub(stub_dir, "vm_stat", "exit 1\n")
    write_stub(stub_dir, "nvidia-smi", "exit 127\n")
    device = detect_device()
    assert device.backend == "cpu"
    assert device.ram_available_bytes is None
    assert any("pass --ram" in note for note in device.notes)


# Windows (stubbed kernel32) -------------------------------------------------------------


class StubKernel32:
    """Stands in for ctypes.windll.kernel32: fills MEMORYSTATUSEX like Windows does."""

    def __init__(self, ok: bool = True, features: set[int] | None = None):
        self.ok = ok
        self.features = features or set()

    def GlobalMemoryStatusEx(self, pointer) -> int:  # noqa: N802 - the Windows API's name
        if not self.ok:
            return 0
        status = pointer._obj
        assert status.dwLength == ctypes.sizeof(status)
        status.ullTotalPhys = 32 * GIB
        status.ullAvailPhys = 20 * GIB
        return 1

    def IsProcessorFeaturePresent(self, feature: int) -> int:  # noqa: N802
        return int(feature in self.features)


def test_windows_memory_from_stub():
    notes: list[str] = []
    assert windows_memory(notes, StubKernel32()) == (32 * GIB, 20 * GIB)
    assert notes == []


def test_windows_memory_call_fails():
    notes: list[str] = []
    assert windows_memory(notes, StubKernel32(ok=False)) == (None, None)
    assert "GlobalMemoryStatusEx failed" in notes[0]


def test_windows_cpu_features_from_stub():
    assert windows_cpu_features(StubKernel32(features={40})) == frozenset({"avx2"})
    assert windows_cpu_features(StubKernel32(features={40, 41})) == frozenset({"avx2", "avx512f"})


# qreg recommend --show-device --------------------------------------------------------------


def test_show_device_json_with_stub_gpu(stub_dir):
    write_stub(stub_dir, "nvidia-smi", f"printf '{NVIDIA_TWO_GPUS}'\n")
    result = CliRunner().invoke(cli, ["recommend", "--show-device", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "cuda"
    assert len(data["gpus"]) == 2
    assert data["vram_free_bytes"] == (23000 + 20000) << 20


def test_show_device_text_failing_gpu_tool(stub_dir):
    write_stub(stub_dir, "nvidia-smi", "echo 'driver mismatch' >&2\nexit 18\n")
    result = CliRunner().invoke(cli, ["recommend", "--show-device"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "note: nvidia-smi failed (driver mismatch)" in result.output
    assert "RAM:" in result.output
