#!/usr/bin/env python3
"""Time `qreg serve` against llama-server started directly, and compare embedding throughput.

Both measurements use the shape-faithful twin of Qwen3-Embedding-0.6B, Q4_K_M and
Q8_0 by default. The twin has every tensor shape of the real model and random weights,
quantized by llama-quantize (docs/fixtures.md).

1. Start time: the wall time from spawning the process to the first 200 from
   /health, polled every 5 ms by this script, for `qreg serve --model FILE` and for
   llama-server run directly with the command line `qreg serve --dry-run` prints.
   qreg's first start on a file reads its GGUF header ("cold"); later starts use the
   cached facts ("warm"). qreg runs with a bytecode cache, as in a normal install.
2. Throughput: 64 requests of 256 tokens each (EOS included), from 8 client threads,
   against qreg's default flags (`-b`/`-ub` 512), against `qreg serve --ctx 4096
   --parallel 8` (the card's -c with qreg's batch sizes), against qreg's defaults with
   `--ubatch 8192` (one micro-batch per input, qreg's flags before --ubatch existed),
   and against the card's own command line (`-c 32768 -np 8`, default batch). Every
   text is different, so no slot reuses a cached prefix. Then single inputs of 600,
   2,000 and 4,100 tokens show which lengths each command line serves. With
   --rounds N the setups take turns N times and the median rate is reported, which
   evens out a machine whose speed drifts during the run.
3. With --ubatch-sweep (off by default): for each micro-batch size in UBATCH_SWEEP,
   `qreg serve --ctx 4096 --ubatch N`, the time of one 2,000-token input (the median
   of 3) and the throughput of the 64 short requests, with llama-server's peak RSS.

Results are printed as Markdown tables and, with --json FILE, written as JSON.

Usage: benchmarks/serve.py [--variants Q4_K_M,Q8_0] [--runs N] [--requests N] [--json FILE] [--build-twin]
                           [--skip-starts] [--skip-throughput] [--ubatch-sweep]
                           [--setups defaults,parallel8,ubatch8192,card] [--rounds N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import installed_command, load_make_fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS_TEXT = "<|endoftext|>"
POLL_SECONDS = 0.005
START_TIMEOUT = 300.0
REQUEST_TIMEOUT = 900.0
TOKENS_PER_REQUEST = 256
CLIENT_THREADS = 8
LONG_INPUTS = (600, 2000, 4100)
UBATCH_SWEEP = (64, 128, 256, 512, 1024, 2048)
SWEEP_INPUT_TOKENS = 2000
SWEEP_REPEATS = 3
CARD_ARGS = ("--embedding", "--pooling", "last", "-c", "32768", "-np", "8")

# Common English words that Qwen's tokenizer encodes as one token each with a leading space.
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or has had "
    "not but also have one its new after who they two her she been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made first"
).split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code
    except httpx.TransportError:
        return None


class Server:
    """A server process (qreg serve or llama-server) on a free port, stopped on exit."""

    def __init__(self, command: list[str], port: int, env: dict[str, str]):
        self.url = f"http://127.0.0.1:{port}"
        # stderr goes to a file: a pipe that nobody reads would block a chatty llama-server.
        self.stderr = tempfile.TemporaryFile()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env
        )

    def wait_healthy(self) -> float:
        deadline = self.started + START_TIMEOUT
        while health_status(self.url) != 200:
            if self.process.poll() is not None:
                self.stderr.seek(0)
                error = self.stderr.read().decode(errors="replace")[-1000:]
                raise SystemExit(f"benchmark: server exited with {self.process.returncode}: {error}")
            if time.perf_counter() > deadline:
                raise SystemExit(f"benchmark: {self.url} was not healthy within {START_TIMEOUT} s")
            time.sleep(POLL_SECONDS)
        return time.perf_counter() - self.started

    def peak_rss_mib(self) -> float | None:
        """Return VmHWM of the llama-server process (the child, when this is qreg)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.is_file() and children.read_text().split():
            pid = int(children.read_text().split()[0])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def qreg_env(home: Path, bytecode_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        env[name] = str(home / name.lower())
    for name in ("QREG_CTX", "QREG_PARALLEL", "QREG_CACHE_TYPE", "QREG_UBATCH", "QREG_API_KEY", "QREG_HOST", "QREG_PORT"):
        env.pop(name, None)
    return env


def dry_run_command(qreg: str, model: Path, server_bin: Path, port: int, env: dict[str, str], *options: str) -> list[str]:
    result = subprocess.run(
        [qreg, "serve", "--model", str(model), "--server-bin", str(server_bin), "--port", str(port), *options, "--dry-run", "-q"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    if result.returncode != 0:
        raise SystemExit(f"benchmark: qreg serve --dry-run failed: {result.stderr}")
    return shlex.split(result.stdout.strip())


# --- start time -------------------------------------------------------------------------------


def time_starts(qreg: str, model: Path, server_bin: Path, runs: int, home: Path, bytecode: Path) -> dict:
    """Return the start times (s) of llama-server direct, qreg cold and qreg warm."""
    env = qreg_env(home, bytecode)
    subprocess.run([qreg, "--help"], capture_output=True, env=env, check=True)  # fill the bytecode cache

    direct, cold, warm = [], [], []
    for run in range(runs):
        shutil.rmtree(home / "xdg_data_home", ignore_errors=True)  # forget qreg's cached header facts
        for label, times in (("cold", cold), ("warm", warm), ("direct", direct)):
            port = free_port()
            if label == "direct":
                command = dry_run_command(qreg, model, server_bin, port, env)
            else:
                command = [qreg, "serve", "--model", str(model), "--server-bin", str(server_bin), "--port", str(port), "-q"]
            with Server(command, port, env) as server:
                times.append(server.wait_healthy())
    return {"direct": direct, "qreg_cold": cold, "qreg_warm": warm}


# --- throughput --------------------------------------------------------------------------------


def make_texts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def token_count(url: str, text: str) -> int:
    response = httpx.post(f"{url}/tokenize", json={"content": text, "add_special": True}, timeout=60)
    response.raise_for_status()
    return len(response.json()["tokens"])


def run_load(url: str, texts: list[str]) -> dict:
    """Post each text as one request from CLIENT_THREADS threads; return time, token rate and failures."""
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:

        def post(text: str) -> tuple[int, int]:
            response = client.post(f"{url}/v1/embeddings", json={"input": [text]})
            tokens = response.json().get("usage", {}).get("prompt_tokens", 0) if response.status_code == 200 else 0
            return response.status_code, tokens

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENT_THREADS) as pool:
            results = list(pool.map(post, texts))
        elapsed = time.perf_counter() - started

    tokens = sum(count for _status, count in results)
    failed = sum(1 for status, _count in results if status != 200)
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_second": tokens / elapsed, "failed": failed}


def long_inputs(url: str, appends_eos: bool) -> dict[int, int]:
    """Post one input per length in LONG_INPUTS (tokens with EOS); return length -> HTTP status."""
    statuses = {}
    for length in LONG_INPUTS:
        text = " ".join(["the"] * (length - 1)) + ("" if appends_eos else EOS_TEXT)
        response = httpx.post(f"{url}/v1/embeddings", json={"input": [text]}, timeout=REQUEST_TIMEOUT)
        statuses[length] = response.status_code
    return statuses


# Throughput setups, by the short name --setups takes: (label, kind, qreg serve options).
SETUPS = {
    "defaults": ("qreg defaults (--ctx 8192 --parallel 1)", "qreg", ()),
    "parallel8": ("qreg --ctx 4096 --parallel 8", "qreg", ("--ctx", "4096", "--parallel", "8")),
    "ubatch8192": ("qreg --ubatch 8192", "qreg", ("--ubatch", "8192")),
    "card": ("card: -c 32768 -np 8, default batch", "card", ()),
}


def throughput(qreg: str, model: Path, server_bin: Path, requests: int, home: Path, bytecode: Path,
               setups: list[str], rounds: int) -> dict:
    """Run each setup `rounds` times, taking turns, and report the median rate per setup.

    The long inputs and the peak RSS are measured in the first round only.
    """
    env = qreg_env(home, bytecode)
    results: dict[str, dict] = {}
    for round_index in range(rounds):
        order = setups[round_index % len(setups):] + setups[:round_index % len(setups)]
        for name in order:
            label = SETUPS[name][0]
            load = throughput_once(qreg, model, server_bin, requests, env, name, first=round_index == 0)
            if label in results:
                results[label]["rounds_tokens_per_second"].append(load["tokens_per_second"])
                results[label]["failed"] += load["failed"]
            else:
                results[label] = {**load, "rounds_tokens_per_second": [load["tokens_per_second"]]}
            print(f"  round {round_index + 1}, {label}: {load['tokens_per_second']:.0f} tokens/s", file=sys.stderr)

    for load in results.values():
        load["tokens_per_second"] = statistics.median(load["rounds_tokens_per_second"])
    return results


def throughput_once(qreg: str, model: Path, server_bin: Path, requests: int, env: dict, name: str, *, first: bool) -> dict:
    _label, kind, options = SETUPS[name]
    port = free_port()
    if kind == "qreg":
        command = [qreg, "serve", "--model", str(model), "--server-bin", str(server_bin), "--port", str(port), "-q", *options]
    else:
        command = [str(server_bin), "-m", str(model), *CARD_ARGS, "--host", "127.0.0.1", "--port", str(port)]
    appends_eos = kind == "qreg"

    with Server(command, port, env) as server:
        server.wait_healthy()
        # Every setup embeds the same tokens: 255 words and one EOS, appended by the server or here.
        seed = list(SETUPS).index(name)
        texts = make_texts(requests, TOKENS_PER_REQUEST - 1, seed=1000 + seed)
        if not appends_eos:
            texts = [text + EOS_TEXT for text in texts]
        mean_tokens = statistics.mean(token_count(server.url, text) for text in texts[:8])
        load = run_load(server.url, texts)
        load["mean_tokens_sampled"] = mean_tokens
        if first:
            load["long_inputs"] = long_inputs(server.url, appends_eos)
            load["peak_rss_mib"] = server.peak_rss_mib()
    return load


def ubatch_sweep(qreg: str, model: Path, server_bin: Path, requests: int, home: Path, bytecode: Path) -> dict:
    """Return, per micro-batch size, the seconds of one long input, the short-request rate and peak RSS."""
    env = qreg_env(home, bytecode)
    results = {}
    for seed, ubatch in enumerate(UBATCH_SWEEP):
        port = free_port()
        command = [
            qreg, "serve", "--model", str(model), "--server-bin", str(server_bin), "--port", str(port), "-q",
            "--ctx", "4096", "--ubatch", str(ubatch),
        ]
        with Server(command, port, env) as server:
            server.wait_healthy()
            long_seconds = []
            for repeat in range(SWEEP_REPEATS):
                # A different text each time, so no cached prefix shortens the work.
                [text] = make_texts(1, SWEEP_INPUT_TOKENS - 1, seed=2000 + 10 * seed + repeat)
                started = time.perf_counter()
                httpx.post(f"{server.url}/v1/embeddings", json={"input": [text]}, timeout=REQUEST_TIMEOUT).raise_for_status()
                long_seconds.append(time.perf_counter() - started)
            load = run_load(server.url, make_texts(requests, TOKENS_PER_REQUEST - 1, seed=3000 + seed))
            results[ubatch] = {
                "long_input_seconds": statistics.median(long_seconds),
                "tokens_per_second": load["tokens_per_second"],
                "failed": load["failed"],
                "peak_rss_mib": server.peak_rss_mib(),
            }
        print(f"  --ubatch {ubatch}: {results[ubatch]}", file=sys.stderr)
    return results


# --- report --------------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, load average {load:.2f}"


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}")
    if report["starts"]:
        print_starts(report["starts"])
    if report["throughput"]:
        print_throughput(report)
    if report["ubatch_sweep"]:
        print_sweep(report)


def print_starts(starts: dict) -> None:
    print("\n### Start time to healthy (s)\n")
    print("| variant | llama-server direct | qreg serve, cold | qreg serve, warm | warm - direct |")
    print("|---|---:|---:|---:|---:|")
    for variant, times in starts.items():
        direct, cold, warm = (statistics.median(times[key]) for key in ("direct", "qreg_cold", "qreg_warm"))
        print(f"| {variant} | {direct:.3f} | {cold:.3f} | {warm:.3f} | {warm - direct:+.3f} |")


def print_throughput(report: dict) -> None:
    print(f"\n### Throughput: {report['requests']} requests of {TOKENS_PER_REQUEST} tokens, {CLIENT_THREADS} client threads\n")
    lengths = " | ".join(f"{length} tokens" for length in LONG_INPUTS)
    print(f"| variant | command line | tokens/s | failed | peak RSS MiB | {lengths} |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(LONG_INPUTS))
    for variant, setups in report["throughput"].items():
        for label, load in setups.items():
            statuses = " | ".join(str(load["long_inputs"][length]) for length in LONG_INPUTS)
            rss = f"{load['peak_rss_mib']:.0f}" if load["peak_rss_mib"] else "-"
            rate = f"{load['tokens_per_second']:.0f}"
            if len(load["rounds_tokens_per_second"]) > 1:
                rate += " (" + ", ".join(f"{value:.0f}" for value in load["rounds_tokens_per_second"]) + ")"
            print(f"| {variant} | {label} | {rate} | {load['failed']} | {rss} | {statuses} |")


def print_sweep(report: dict) -> None:
    print(f"\n### Micro-batch size: --ctx 4096, one {SWEEP_INPUT_TOKENS}-token input (median of {SWEEP_REPEATS}), "
          f"then {report['requests']} requests of {TOKENS_PER_REQUEST} tokens\n")
    print(f"| variant | --ubatch | {SWEEP_INPUT_TOKENS}-token input s | tokens/s, short requests | failed | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, sizes in report["ubatch_sweep"].items():
        for ubatch, result in sizes.items():
            rss = f"{result['peak_rss_mib']:.0f}" if result["peak_rss_mib"] else "-"
            print(
                f"| {variant} | {ubatch} | {result['long_input_seconds']:.2f} | {result['tokens_per_second']:.0f} "
                f"| {result['failed']} | {rss} |"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="Q4_K_M,Q8_0", help="twin variants to use (default Q4_K_M,Q8_0)")
    parser.add_argument("--runs", type=int, default=5, help="start-time runs per command (default 5)")
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput run (default 64)")
    parser.add_argument("--skip-throughput", action="store_true", help="measure start times only")
    parser.add_argument("--skip-starts", action="store_true", help="measure throughput only")
    parser.add_argument("--ubatch-sweep", action="store_true", help=f"also time --ubatch {', '.join(map(str, UBATCH_SWEEP))}")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"throughput setups to run, from {', '.join(SETUPS)} (default all)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="throughput rounds; setups take turns and the median is reported (default 1)")
    parser.add_argument("--build-twin", action="store_true", help="quantize missing twin variants first (minutes)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setups = args.setups.split(",")
    unknown = [name for name in setups if name not in SETUPS]
    if unknown or args.rounds < 1:
        raise SystemExit(f"benchmark: unknown setup {', '.join(unknown)} or --rounds below 1; setups: {', '.join(SETUPS)}")
    # SIGTERM becomes SystemExit, so the servers this script started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    make_fixtures = load_make_fixtures()
    bin_dir = make_fixtures.find_llama_bin_dir()
    server_bin = bin_dir / "llama-server"
    twin = make_fixtures.Twin(bin_dir)
    qreg = installed_command("qreg")

    report = {"machine": machine_line(), "requests": args.requests, "starts": {}, "throughput": {}, "ubatch_sweep": {}}
    with tempfile.TemporaryDirectory(prefix="qreg-bench-serve.") as scratch:
        home, bytecode = Path(scratch) / "home", Path(scratch) / "pycache"
        for variant in args.variants.split(","):
            model = twin.ensure(variant) if args.build_twin else twin.path_of(variant)
            if not model.is_file():
                print(f"benchmark: twin {variant} is not in the fixture cache; pass --build-twin", file=sys.stderr)
                continue
            if not args.skip_starts:
                print(f"{variant}: start times", file=sys.stderr)
                report["starts"][variant] = time_starts(qreg, model, server_bin, args.runs, home, bytecode)
            if not args.skip_throughput:
                print(f"{variant}: throughput", file=sys.stderr)
                report["throughput"][variant] = throughput(qreg, model, server_bin, args.requests, home, bytecode,
                                                          setups, args.rounds)
            if args.ubatch_sweep:
                print(f"{variant}: micro-batch sizes", file=sys.stderr)
                report["ubatch_sweep"][variant] = ubatch_sweep(qreg, model, server_bin, args.requests, home, bytecode)

    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
