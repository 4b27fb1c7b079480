"""Helpers for tests that run the real llama-server, directly or through `qreg serve`.

Every helper that starts a process stops it on exit and checks that it is gone, so
no llama-server outlives a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

HEALTH_TIMEOUT = 60.0


def _die_with_pytest() -> None:
    """Run in a child between fork and exec: have Linux kill it when pytest dies.

    Without it, a pytest stopped by SIGTERM or SIGKILL leaves its llama-servers running.
    """
    import ctypes

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def child_options() -> dict:
    """Return Popen options that tie a test's server process to pytest's life (Linux only)."""
    import sys

    return {"preexec_fn": _die_with_pytest} if sys.platform.startswith("linux") else {}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code
    except httpx.TransportError:
        return None


def wait_healthy(process: subprocess.Popen, url: str, timeout: float = HEALTH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while health(url) != 200:
        assert process.poll() is None, f"llama-server exited with {process.returncode} before it was healthy"
        assert time.monotonic() < deadline, f"llama-server at {url} was not healthy within {timeout} s"
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    """Tell whether pid no longer runs: absent from /proc, or a zombie that no process has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def children_of(pid: int) -> list[int]:
    """Return the pids of the running llama-server processes whose parent is pid (Linux /proc).

    Only servers count, not the short `llama-server --version` and `--help` probes.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) != pid or fields[0] in ("Z", "X"):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--embedding" in argv:
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def llama_server(binary: Path, model: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run llama-server directly with --embedding on a free port; yield its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(binary), "-m", str(model), "--embedding", "--host", "127.0.0.1", "--port", str(port), *args]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        **child_options(),
    )
    try:
        wait_healthy(process, url)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process_gone(process.pid)


class QregServe:
    """A `qreg serve ... --json` subprocess, read until its ready document or its exit."""

    def __init__(self, qreg_exe: str, args: list[str], env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [qreg_exe, "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            **child_options(),
        )
        self.stdout = ""
        self.stderr = ""
        self.ready: dict | None = None

    @property
    def server_pid(self) -> int | None:
        return self.ready["pid"] if self.ready else None

    def wait_ready(self, timeout: float = HEALTH_TIMEOUT) -> dict | None:
        """Read stdout until it contains one whole JSON document (returned) or qreg exits (None)."""
        # os.read on the descriptor, since a buffered reader would hide data from select().
        deadline = time.monotonic() + timeout
        descriptor = self.process.stdout.fileno()
        selector = selectors.DefaultSelector()
        selector.register(descriptor, selectors.EVENT_READ)
        received = b""
        while self.ready is None and time.monotonic() < deadline:
            if not selector.select(timeout=0.1):
                continue
            chunk = os.read(descriptor, 65536)
            if not chunk:
                break
            received += chunk
            with contextlib.suppress(ValueError):
                self.ready = json.loads(received.decode())
        selector.close()
        self.stdout += received.decode(errors="replace")
        return self.ready

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for qreg to exit and collect the rest of its output; return its exit code."""
        out, err = self.process.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.process.returncode

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def cleanup(self) -> None:
        """Kill qreg and its llama-server if a test left them running, then check both are gone."""
        server_pid = self.server_pid
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)
        if server_pid is not None:
            if not wait_gone(server_pid, 10):
                os.kill(server_pid, signal.SIGKILL)
                raise AssertionError(f"llama-server pid {server_pid} outlived qreg serve")


def copy_with_patch(source: Path, target: Path, old: bytes, new: bytes) -> None:
    """Copy a GGUF file and replace the one occurrence of `old` in its header with `new` (same length)."""
    assert len(old) == len(new)
    shutil.copyfile(source, target)
    with open(target, "r+b") as handle:
        # The tokenizer's token and merge arrays come first, so the key can lie several MiB in.
        head = handle.read(32 << 20)
        offset = head.find(old)
        assert offset >= 0, f"{old!r} not found in the first 32 MiB"
        assert head.find(old, offset + 1) < 0, f"{old!r} occurs more than once"
        handle.seek(offset)
        handle.write(new)


def set_add_eos(source: Path, target: Path) -> None:
    """Copy a GGUF file whose tokenizer.ggml.add_eos_token is false, with it set to true."""
    key = b"tokenizer.ggml.add_eos_token"
    bool_type = (7).to_bytes(4, "little")
    copy_with_patch(source, target, key + bool_type + b"\x00", key + bool_type + b"\x01")
