#!/usr/bin/env python3
"""Time `qreg inspect --json` against `gguf-dump --json` on the same GGUF files.

Both are run as installed commands, in subprocesses, several times per file. The
script prints the median wall and CPU times of each and the ratio of the wall times. The default files are the
tiny fixture Q4_K_M (Qwen vocabulary of 151,669 tokens and 151,387 merges) and,
when they are in the fixture cache, the shape-faithful twin's BF16 and Q4_K_M
(595,776,512 parameters); --build-twin quantizes the twin first (minutes).

Both commands run with a bytecode cache (PYTHONPYCACHEPREFIX in a temporary
directory, warmed by one untimed run), as in a normal install. Without it, an
environment that sets PYTHONDONTWRITEBYTECODE compiles qreg's modules from source on
every run; --no-bytecode-cache measures that case.

Usage: benchmarks/inspect_speed.py [--runs N] [--dump-runs N] [--build-twin] [--no-bytecode-cache] [FILE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import installed_command, load_make_fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RUN_TIMEOUT_SECONDS = 600


def default_files(build_twin: bool) -> list[tuple[str, Path]]:
    """Return (label, path) of the tiny fixture Q4_K_M and of the twin files that exist."""
    make_fixtures = load_make_fixtures()
    bin_dir = make_fixtures.find_llama_bin_dir()
    tiny = make_fixtures.build_tiny(bin_dir)
    files = [("tiny Q4_K_M, 151k vocabulary", tiny.files["Q4_K_M"])]

    twin = make_fixtures.Twin(bin_dir)
    for variant in ("BF16", "Q4_K_M"):
        path = twin.ensure(variant) if build_twin else twin.path_of(variant)
        if path.is_file():
            files.append((f"twin {variant}", path))
        else:
            print(f"benchmark: twin {variant} not in the fixture cache; pass --build-twin to build it", file=sys.stderr)
    return files


def median_seconds(command: list[str], runs: int, env: dict[str, str]) -> tuple[float, float]:
    """Run a command once untimed, then `runs` times with its output captured.

    Returns the median wall time and the median CPU time (user + system) of the
    child. On a loaded machine the CPU time shows what the wall time would be idle.
    """
    wall_times = []
    cpu_times = []
    for run in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT_SECONDS, env=env)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()[-500:]
            raise SystemExit(f"benchmark: {' '.join(command)} failed (exit {result.returncode}): {stderr}")
        if run > 0:
            wall_times.append(elapsed)
            cpu_times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(wall_times), statistics.median(cpu_times)


def run_environment(bytecode_cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if bytecode_cache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
    return env


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, load average {load_average():.2f}"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="GGUF files to time (default: the fixture files)")
    parser.add_argument("--runs", type=int, default=7, help="runs of qreg inspect per file (default 7)")
    parser.add_argument("--dump-runs", type=int, default=3, help="runs of gguf-dump per file (default 3)")
    parser.add_argument("--build-twin", action="store_true", help="quantize the twin's BF16 and Q4_K_M if missing")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run with the caller's environment, even if it disables writing bytecode",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = [(path.name, path) for path in args.files] or default_files(args.build_twin)
    qreg = installed_command("qreg")
    gguf_dump = installed_command("gguf-dump")

    with tempfile.TemporaryDirectory(prefix="qreg-bench-pyc-") as cache:
        env = run_environment(None if args.no_bytecode_cache else Path(cache))
        print(f"machine: {machine_line()}")
        print(f"qreg inspect --json: {qreg} ({args.runs} runs); gguf-dump --json: {gguf_dump} ({args.dump_runs} runs)")
        print(f"bytecode cache: {'off (caller environment)' if args.no_bytecode_cache else 'on'}")
        print("medians; wall time, then CPU time (user + system) in brackets")
        print(f"{'file':<30} {'MiB':>7} {'qreg s':>15} {'gguf-dump s':>15} {'ratio':>6}")
        for label, path in files:
            qreg_wall, qreg_cpu = median_seconds([qreg, "inspect", "--json", str(path)], args.runs, env)
            dump_wall, dump_cpu = median_seconds([gguf_dump, "--json", str(path)], args.dump_runs, env)
            size = path.stat().st_size / MIB
            qreg_text = f"{qreg_wall:.3f} ({qreg_cpu:.3f})"
            dump_text = f"{dump_wall:.2f} ({dump_cpu:.2f})"
            print(f"{label:<30} {size:>7.1f} {qreg_text:>15} {dump_text:>15} {dump_wall / qreg_wall:>5.1f}x")
        print(f"load average after: {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
