#!/usr/bin/env python3
"""Time `qreg pull` against curl and huggingface_hub's `hf_hub_download` on one ~600 MB file.

The file (the shape-faithful twin's Q8_0 when it is in the fixture cache, else 609.5 MiB
of random bytes, or --file) is served by the loopback mirror (`python -m
registry.mirror`) in its own process. Each run downloads it three ways, each as a
subprocess timed from start to exit, into an empty cache, after flushing the page cache (os.sync, untimed) so that no tool
pays for writing back another's file; the tools take turns going first:

  curl             curl -sSL -o FILE <endpoint>/<repo>/resolve/main/<file> (follows the 302)
  hf_hub_download  python -c 'hf_hub_download(...)' (no sha256 check)
  qreg pull        the installed command, sha256 pinned in a manifest and checked

The two Python runs are also timed inside the download call, after the interpreter
started and imported its modules ("hf_hub_download call", "hub.pull call": registry.hub.pull
with a pinned sha256), which separates the fixed start cost from the transfer. It also
times hashlib's sha256 of the file. Prints each run and the medians with the ratios.

Usage: benchmarks/pull.py [--runs N] [--file PATH] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import installed_command, load_make_fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RANDOM_SIZE = int(609.5 * MIB)
REPO = "bench/Bench-GGUF"
PARAMETERS = 595_776_512
RUN_TIMEOUT_SECONDS = 600

# Both Python runs print the seconds spent inside the download call, after imports.
HF_DOWNLOAD = (
    "import sys, time\n"
    "from huggingface_hub import hf_hub_download\n"
    "started = time.perf_counter()\n"
    "hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], endpoint=sys.argv[4])\n"
    "print(time.perf_counter() - started)\n"
)
QREG_PULL = (
    "import sys, time\n"
    "from registry import hub\n"
    "from registry.manifest import load_manifest\n"
    "import huggingface_hub.file_download, httpx\n"
    "manifest = load_manifest(sys.argv[1])\n"
    "started = time.perf_counter()\n"
    "hub.pull(manifest, 'Q8_0')\n"
    "print(time.perf_counter() - started)\n"
)


def twin_q8_0() -> Path | None:
    """Return the twin's Q8_0 (quantized on first use, minutes), or None when llama.cpp is unavailable."""
    try:
        module = load_make_fixtures()
        return module.Twin(module.find_llama_bin_dir()).ensure("Q8_0")
    except Exception as error:  # no llama.cpp build: fall back to random bytes
        print(f"benchmark: twin Q8_0 unavailable ({error}); using random bytes", file=sys.stderr)
        return None


def random_file(folder: Path) -> Path:
    path = folder / "Bench-Q8_0.gguf"
    with open(path, "wb") as handle:
        for _ in range(RANDOM_SIZE // MIB):
            handle.write(os.urandom(MIB))
        handle.write(os.urandom(RANDOM_SIZE % MIB))
    return path


def sha256_seconds(path: Path) -> tuple[str, float]:
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest(), time.perf_counter() - started


def write_manifest(path: Path, file: Path, sha256: str) -> None:
    """Write a one-variant manifest in the shipped schema that pins the file's sha256 and size."""
    import tomli_w

    from registry.manifest import derive_status

    size = file.stat().st_size
    size_mib = round(size / MIB, 2)
    bits = round(size_mib * MIB * 8 / PARAMETERS, 2)
    variant = {
        "name": "Q8_0", "file": file.name, "size_mib": size_mib, "bits_per_weight": bits, "imatrix": False,
        "strategy": "standard", "status": derive_status(name="Q8_0", bits=bits, diverges=False, card_role=""),
        "backends": ["cpu"], "sha256": sha256, "size_bytes": size,
    }
    prefix = file.name[: -len("Q8_0.gguf")]
    model = {
        "name": "Bench", "repo": REPO, "revision": "", "file_prefix": prefix, "architecture": "qwen3",
        "parameters": PARAMETERS, "context_length": 32768, "embedding_length": 1024, "block_count": 28,
        "head_count": 16, "head_count_kv": 8, "key_length": 128, "value_length": 128,
        "feed_forward_length": 3072, "vocab_size": 151669, "pooling": "last", "eos_token_id": 151643,
    }
    document = {"schema_version": 1, "model": model, "variants": [variant]}
    path.write_text(tomli_w.dumps(document), encoding="utf-8")


def start_mirror(file: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "registry.mirror", "--repo", REPO, str(file)],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    endpoint = process.stdout.readline().strip()
    if not endpoint.startswith("http://127.0.0.1:"):
        process.kill()
        raise SystemExit(f"benchmark: the mirror did not start (printed {endpoint!r})")
    return process, endpoint


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a command; return its wall time in seconds and its stdout."""
    started = time.perf_counter()
    result = subprocess.run(command, check=True, env=env, timeout=RUN_TIMEOUT_SECONDS,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - started, result.stdout


def one_run(file: Path, endpoint: str, manifest: Path, work: Path, index: int) -> dict[str, float]:
    """Download the file once with each tool into fresh folders; return seconds per tool.

    The tools take turns going first, and the page cache is flushed (os.sync, untimed)
    before each one, so no tool pays for writing back the previous tool's file.
    """
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "XDG_DATA_HOME": str(work / "data"),
           "HF_HUB_CACHE": str(work / "qreg-cache"), "XDG_CONFIG_HOME": str(work / "config")}
    url = f"{endpoint}/{REPO}/resolve/main/{file.name}"
    commands = {
        "curl": ["curl", "-sSL", "-o", str(work / "curl.out"), url],
        "hf_hub_download": [sys.executable, "-c", HF_DOWNLOAD, REPO, file.name, str(work / "hf-cache"), endpoint],
        "qreg pull": [installed_command("qreg"), "pull", "Q8_0", "--manifest", str(manifest), "-q"],
        "hub.pull call": [sys.executable, "-c", QREG_PULL, str(manifest)],
    }
    names = list(commands)
    names = names[index % len(names):] + names[:index % len(names)]
    seconds: dict[str, float] = {}
    for name in names:
        for leftover in ("curl.out", "hf-cache", "data", "qreg-cache"):
            remove(work / leftover)
        os.sync()
        wall, printed = timed(commands[name], env)
        seconds[name] = wall
        if name == "hf_hub_download":
            seconds["hf_hub_download call"] = float(printed)
        elif name == "hub.pull call":
            seconds[name] = float(printed)
    shutil.rmtree(work, ignore_errors=True)
    return {name: seconds[name] for name in ("curl", "hf_hub_download", "qreg pull",
                                             "hf_hub_download call", "hub.pull call")}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Time qreg pull against curl and hf_hub_download.")
    parser.add_argument("--runs", type=int, default=3, help="downloads per tool [default: 3]")
    parser.add_argument("--file", type=Path, help="file to serve [default: twin Q8_0, else random bytes]")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("benchmark: curl not found; install it (apt-get install -y curl)")

    with tempfile.TemporaryDirectory(prefix="qreg-bench-pull.") as temporary:
        folder = Path(temporary)
        file = args.file or twin_q8_0() or random_file(folder)
        sha256, hash_seconds = sha256_seconds(file)
        manifest = folder / "bench-manifest.toml"
        write_manifest(manifest, file, sha256)
        mirror, endpoint = start_mirror(file)
        try:
            runs = [one_run(file, endpoint, manifest, folder / "work", index) for index in range(args.runs)]
        finally:
            mirror.terminate()
            mirror.wait(timeout=10)

    report(file, hash_seconds, runs, args.json)


def report(file: Path, hash_seconds: float, runs: list[dict[str, float]], as_json: bool) -> None:
    medians = {tool: statistics.median(run[tool] for run in runs) for tool in runs[0]}
    ratios = {
        "qreg/curl": medians["qreg pull"] / medians["curl"],
        "qreg/hf_hub_download": medians["qreg pull"] / medians["hf_hub_download"],
        "hf_hub_download/curl": medians["hf_hub_download"] / medians["curl"],
        "hub.pull call/curl": medians["hub.pull call"] / medians["curl"],
    }
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if as_json:
        print(json.dumps({"file": str(file), "size": file.stat().st_size, "sha256_seconds": hash_seconds,
                          "runs": runs, "medians": medians, "ratios": ratios, "machine": machine}, indent=2))
        return
    print(f"file: {file} ({file.stat().st_size / MIB:.1f} MiB); machine: {machine}")
    print(f"hashlib sha256 of the file: {hash_seconds:.2f} s")
    for index, run in enumerate(runs, 1):
        print(f"run {index}: " + ", ".join(f"{tool} {value:.2f} s" for tool, value in run.items()))
    print("median: " + ", ".join(f"{tool} {value:.2f} s" for tool, value in medians.items()))
    print("ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))


if __name__ == "__main__":
    main()
