#!/usr/bin/env python3
"""Compare registry.estimate's memory estimate with what the real llama-server uses.

For each case, llama-server starts on the shape-faithful twin of Qwen3-Embedding-0.6B
(595,776,512 parameters, the card's file sizes; made by scripts/make_fixtures.py) with
the arguments `qreg serve` builds (registry.server.build_server_args), mmap on as by
default. After /health answers 200, one /v1/embeddings request of about 200 tokens
(or, for "full" cases, of the longest input a slot accepts) is sent, then the peak
resident memory VmHWM is read from /proc/PID/status and the server is stopped.

The estimate is `estimate_memory` for the same variant and settings, computed from
the shipped manifest as `qreg recommend` does, for the request's token count. Each
row prints both, the error, and the sum of the buffers llama.cpp logs (model, KV,
output, compute; -lv 4 makes it log them). Those are reserved sizes, and no
prediction of VmHWM. The compute buffer is reserved for a full micro-batch and only
partly touched by a short request. The output buffer is logged at its first size,
one row per slot, before a request grows it. The process itself is left out.

Linux only (VmHWM). The default matrix takes about 6 minutes on 2 cores once the
twin's files are cached, 3 of them for the 8191-token input; building the files
first takes a few more.

Usage: benchmarks/memory.py [--quick] [--json FILE] [--case VARIANT:CTX:SLOTS:CACHE:LENGTH[:UBATCH]] [--type-mix]
"""

from __future__ import annotations

import os
import sys

# This folder, for benchmarks/common.py when the module is loaded by path (as
# tests/test_estimate.py does), and the repository root, for `registry` when qreg is
# not installed.
_FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [path for path in (_FOLDER, os.path.dirname(_FOLDER)) if path not in sys.path]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import load_make_fixtures  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

from registry.estimate import MemoryEstimate, estimate_memory  # noqa: E402
from registry.manifest import MIB, Manifest, load_manifest  # noqa: E402
from registry.serving import DEFAULT_UBATCH, ServeSettings  # noqa: E402

SHORT_REQUEST_TOKENS = 200
REQUEST_TIMEOUT_SECONDS = 1800.0
START_TIMEOUT_SECONDS = 300.0

# Each word is one token of the Qwen2 vocabulary (with its leading space), so a text of
# n words is n tokens. request_text checks the count with llama-server's /tokenize.
WORDS = ("market", "revenue", "growth", "risk", "bond", "price", "rate", "cash", "debt", "stock")

# With -lv 4, llama.cpp logs each buffer it allocates, such as
# "load_tensors:   CPU_REPACK model buffer size =   204.75 MiB".
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|output|compute) buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True)
class Case:
    """One server start: variant, per-slot context, slots, KV cache type, request length, micro-batch."""

    variant: str
    ctx: int
    parallel: int = 1
    cache_type: str = "f16"
    request: str = "short"  # "short" (about 200 tokens) or "full" (the longest a slot accepts)
    ubatch: int = DEFAULT_UBATCH

    @property
    def label(self) -> str:
        return f"{self.variant} ctx {self.ctx} x{self.parallel} {self.cache_type} ub {self.settings.ubatch} {self.request}"

    @property
    def settings(self) -> ServeSettings:
        return ServeSettings(ctx=self.ctx, parallel=self.parallel, cache_type=self.cache_type, backend="cpu", ubatch_size=self.ubatch)


@dataclass
class Measurement:
    """The memory one llama-server run used, from /proc/PID/status and its log."""

    prompt_tokens: int
    vmhwm_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    llama_breakdown_mib: dict[str, int] = field(default_factory=dict)


def default_cases(quick: bool) -> list[Case]:
    """Return the matrix: three variants x (512, 8192, 32768 with 1 slot; 8192 with 4) x (f16, q8_0), plus full inputs.

    Every case uses qreg's default micro-batch except one, which sets -ub to the
    per-slot context, as qreg did before it had --ubatch. The full inputs of 2048
    and 8192 tokens run as 4 and 16 micro-batches.
    """
    variants = ("Q8_0", "Q4_K_M", "Q2_K")
    shapes = ((512, 1), (8192, 1), (32768, 1), (8192, 4))
    if quick:
        return [Case("Q4_K_M", 512), Case("Q4_K_M", 8192, 4, "q8_0"), Case("Q8_0", 2048, request="full")]

    cases = [Case(v, ctx, parallel, cache) for v in variants for ctx, parallel in shapes for cache in ("f16", "q8_0")]
    cases += [Case(v, 512, request="full") for v in variants]
    cases += [Case("Q4_K_M", 2048, request="full"), Case("Q8_0", 512, 2, "q8_0", request="full")]
    cases += [Case("Q4_K_M", 2048, request="full", ubatch=2048), Case("Q2_K", 8192, request="full")]
    return cases


def parse_case(text: str) -> Case:
    """Parse VARIANT:CTX:SLOTS:CACHE:LENGTH[:UBATCH], such as Q4_K_M:8192:1:f16:full or Q8_0:2048:1:f16:full:2048."""
    parts = text.split(":")
    if len(parts) not in (5, 6) or parts[4] not in ("short", "full"):
        raise SystemExit(
            f"invalid --case '{text}': expected VARIANT:CTX:SLOTS:CACHE:LENGTH[:UBATCH], such as Q4_K_M:8192:1:f16:full"
        )
    variant, ctx, parallel, cache_type, length = parts[:5]
    ubatch = int(parts[5]) if len(parts) == 6 else DEFAULT_UBATCH
    return Case(variant, int(ctx), int(parallel), cache_type, length, ubatch)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_status(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/PID/status (VmHWM, RssAnon, RssFile, ...) in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        match = re.match(r"^(\w+):\s+(\d+) kB$", line)
        if match:
            values[match[1]] = int(match[2]) * 1024
    return values


def request_text(base_url: str, tokens: int) -> tuple[str, int]:
    """Build a text of `tokens` tokens (checked with /tokenize); return it and its token count."""
    import httpx

    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    text = " ".join(words)
    counted = len(httpx.post(f"{base_url}/tokenize", json={"content": text}, timeout=60).json()["tokens"])
    while counted > tokens:
        words = words[: len(words) - (counted - tokens)]
        text = " ".join(words)
        counted = len(httpx.post(f"{base_url}/tokenize", json={"content": text}, timeout=60).json()["tokens"])
    return text, counted


def measure(server_bin: Path, model_path: Path, settings: ServeSettings, request: str, log_dir: Path) -> Measurement:
    """Start llama-server as `qreg serve` would, send one embedding request, read VmHWM, stop it."""
    import httpx

    from registry.server import LaunchSpec, ServerProcess, build_server_args, server_env

    port = free_port()
    # -lv 4 only makes llama.cpp log its buffer sizes; it allocates nothing.
    spec = LaunchSpec(model_path=model_path, settings=settings, port=port, extra_args=("-lv", "4"))
    log_path = log_dir / f"llama-server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess.start(server_bin, build_server_args(spec), env=server_env(None), url=url, log_path=log_path)
    try:
        server.wait_until_healthy(START_TIMEOUT_SECONDS)
        # The server appends EOS (qreg's add_eos override), so a slot's limit is ctx - 1 tokens in all.
        target = SHORT_REQUEST_TOKENS - 1 if request == "short" else spec.slot_token_limit - 1
        text, _ = request_text(url, target)
        response = httpx.post(f"{url}/v1/embeddings", json={"input": text}, timeout=REQUEST_TIMEOUT_SECONDS)
        response.raise_for_status()
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        status = read_status(server.pid)
    finally:
        server.stop(timeout=30)

    return Measurement(
        prompt_tokens=prompt_tokens,
        vmhwm_bytes=status["VmHWM"],
        rss_anon_bytes=status.get("RssAnon", 0),
        rss_file_bytes=status.get("RssFile", 0),
        llama_breakdown_mib=llama_breakdown(log_path),
    )


def llama_breakdown(log_path: Path) -> dict[str, float]:
    """Return the buffers llama.cpp logged, in MiB, by kind and buffer type ("model CPU_REPACK")."""
    sizes: dict[str, float] = {}
    for buffer_type, kind, mib in _BUFFER_RE.findall(log_path.read_text(errors="replace")):
        sizes[f"{kind} {buffer_type}"] = float(mib)  # a later reallocation replaces the earlier size
    return sizes


def estimate_case(manifest: Manifest, case: Case, tokens: int) -> MemoryEstimate:
    return estimate_memory(manifest.model, manifest.resolve(case.variant), case.settings, request_tokens=tokens)


def run_case(manifest: Manifest, server_bin: Path, model_path: Path, case: Case, log_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    measured = measure(server_bin, model_path, case.settings, case.request, log_dir)
    estimate = estimate_case(manifest, case, measured.prompt_tokens)
    error = (estimate.total_bytes - measured.vmhwm_bytes) / measured.vmhwm_bytes
    return {
        "case": asdict(case),
        "label": case.label,
        "tokens": measured.prompt_tokens,
        "estimate_bytes": estimate.total_bytes,
        "estimate_terms": estimate.terms,
        "vmhwm_bytes": measured.vmhwm_bytes,
        "rss_anon_bytes": measured.rss_anon_bytes,
        "rss_file_bytes": measured.rss_file_bytes,
        "llama_breakdown_mib": measured.llama_breakdown_mib,
        "error": error,
        "seconds": round(time.monotonic() - started, 1),
    }


def format_row(row: dict[str, Any]) -> str:
    logged = sum(row["llama_breakdown_mib"].values())
    return (
        f"{row['label']:<40} {row['tokens']:>6} {row['estimate_bytes'] / MIB:>10.1f} "
        f"{row['vmhwm_bytes'] / MIB:>10.1f} {row['error'] * 100:>+7.2f}%  {logged:>10.1f} {row['seconds']:>6.1f}"
    )


def print_type_mix(make_fixtures: Any, bin_dir: Path) -> None:
    """Print TYPE_MIX for registry/estimate.py from llama-quantize --dry-run on the BF16 twin."""
    import subprocess
    from collections import Counter

    twin = make_fixtures.Twin(bin_dir)
    twin.ensure_base()
    line_re = re.compile(r"\]\s+(\S+)\s+-\s+\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\],\s+type =\s+(\w+),.*?(?:\((\w+)\))?\s*$")
    for variant in load_manifest().variants:
        args = [str(bin_dir / "llama-quantize"), "--dry-run", str(twin.base), variant.name]
        result = subprocess.run(args, capture_output=True, text=True, timeout=600)
        matrices: Counter[str] = Counter()
        token_embd = "?"
        for line in (result.stdout + result.stderr).splitlines():
            match = line_re.search(line)
            if match is None:
                continue
            name, rows, ggml_type = match[1], int(match[3]), (match[7] or match[6]).lower()
            if name == "token_embd.weight":
                token_embd = ggml_type
            elif name.startswith("blk.") and rows > 1:
                matrices[ggml_type] += int(match[2]) * rows
        total = sum(matrices.values())
        shares = {ggml_type: round(count / total, 4) for ggml_type, count in matrices.items()}
        print(f'    "{variant.name}": ("{token_embd}", {shares}),')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run 3 cases instead of the full matrix")
    parser.add_argument("--json", type=Path, help="also write every row as JSON to this file")
    parser.add_argument(
        "--case",
        action="append",
        metavar="VARIANT:CTX:SLOTS:CACHE:LENGTH[:UBATCH]",
        help="run this case instead of the matrix, such as Q4_K_M:8192:1:f16:full (LENGTH is short or full; "
        f"UBATCH defaults to {DEFAULT_UBATCH}); repeatable",
    )
    parser.add_argument("--type-mix", action="store_true", help="print registry.estimate.TYPE_MIX from llama-quantize --dry-run and exit")
    args = parser.parse_args(argv)
    if platform.system() != "Linux":
        raise SystemExit("benchmarks/memory.py reads /proc/PID/status, so it runs on Linux only")

    make_fixtures = load_make_fixtures()
    bin_dir = make_fixtures.find_llama_bin_dir()
    if args.type_mix:
        print_type_mix(make_fixtures, bin_dir)
        return 0

    manifest = load_manifest()
    cases = [parse_case(text) for text in args.case] if args.case else default_cases(args.quick)
    twin = make_fixtures.Twin(bin_dir)
    files = {variant: twin.ensure(variant) for variant in sorted({case.variant for case in cases})}
    log_dir = Path(make_fixtures.cache_root()) / "memory-benchmark-logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    print(f"llama.cpp {make_fixtures.llama_version(bin_dir)}, {platform.machine()}, twin files in {twin.dir}")
    print(f"{'case':<40} {'tokens':>6} {'estimate':>10} {'VmHWM':>10} {'error':>8}  {'logged':>10} {'s':>6}")
    rows = []
    for case in cases:
        row = run_case(manifest, bin_dir / "llama-server", files[case.variant], case, log_dir)
        rows.append(row)
        print(format_row(row), flush=True)

    worst = max(rows, key=lambda row: abs(row["error"]))
    print(f"worst error: {worst['error'] * 100:+.2f}% ({worst['label']})")
    print("MiB; logged = the buffers llama.cpp logs (model, KV, output, compute) at their reserved size")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if abs(worst["error"]) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
