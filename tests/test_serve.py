"""Tests of `qreg serve`, `qreg ps` and `qreg stop` with the real llama-server.

Each test runs the installed `qreg` command as a subprocess on a free loopback port
and checks, on the way out, that no llama-server it started is left running.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from registry.errors import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    NotFoundError,
    PortInUseError,
    ServerBinaryError,
    ServerError,
)
from server_helpers import QregServe, children_of, copy_with_patch, free_port, health, process_gone, wait_gone


@pytest.fixture
def tiny_q4(fixture_ggufs) -> Path:
    return fixture_ggufs.files["Q4_K_M"]


@pytest.fixture
def serve(qreg_exe, llama_server_bin):
    """Start `qreg serve --json` with extra arguments; clean up every run at teardown."""
    runs: list[QregServe] = []

    def start(*args: str, env: dict | None = None) -> QregServe:
        full_env = {**os.environ, **(env or {})}
        run = QregServe(qreg_exe, ["--server-bin", str(llama_server_bin), "--json", *args], env=full_env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embed_once(url: str, text: str = "hello", headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"input": [text]}, headers=headers or {}, timeout=30)


# --- serving and stopping -------------------------------------------------------------


def test_serve_ready_then_sigint(serve, tiny_q4):
    port = free_port()
    run = serve("--model", str(tiny_q4), "--port", str(port), "--ctx", "1024")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    assert ready["url"] == f"http://127.0.0.1:{port}"
    assert ready["slot_token_limit"] == 1023
    assert f"curl -s http://127.0.0.1:{port}/v1/embeddings" in ready["curl"]
    assert health(ready["url"]) == 200
    assert embed_once(ready["url"]).status_code == 200

    run.signal(signal.SIGINT)
    assert run.finish() == EXIT_INTERRUPTED
    assert wait_gone(ready["pid"])


def test_serve_sigterm_exits_143(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    run.signal(signal.SIGTERM)
    assert run.finish() == EXIT_TERMINATED
    assert wait_gone(ready["pid"])


def test_second_sigterm_does_not_break_stop(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    run.signal(signal.SIGTERM)
    run.signal(signal.SIGTERM)
    assert run.finish() == EXIT_TERMINATED
    assert "Traceback" not in run.stderr
    assert wait_gone(ready["pid"])


def test_sighup_exits_129(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    run.signal(signal.SIGHUP)
    assert run.finish() == 128 + signal.SIGHUP
    assert wait_gone(ready["pid"])


def test_serve_child_in_own_group_with_pdeathsig(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    stat = Path(f"/proc/{ready['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    parent, group = int(stat[1]), int(stat[2])
    assert parent == run.process.pid
    assert group == ready["pid"]  # its own process group: a terminal's Ctrl-C reaches only qreg
    run.signal(signal.SIGINT)
    assert run.finish() == EXIT_INTERRUPTED


def test_sigkill_of_qreg_kills_server(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    run.signal(signal.SIGKILL)
    run.finish()
    assert wait_gone(ready["pid"], 5), "llama-server outlived qreg killed by SIGKILL"


def test_sigint_while_loading(serve, fixture_ggufs):
    # BF16 is the largest fixture file, so its load leaves the widest window of 503s.
    port = free_port()
    run = serve("--model", str(fixture_ggufs.files["BF16"]), "--port", str(port), "--ctx", "512")
    url = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 30
    status = None
    while status != 503 and time.monotonic() < deadline:
        status = health(url)
        if status == 200:
            pytest.fail("the model loaded before a 503 was seen; the loading window is too short to test")
        time.sleep(0.005)
    assert status == 503, "llama-server never reported that it was loading"

    server_pids = children_of(run.process.pid)
    run.signal(signal.SIGINT)
    assert run.finish() == EXIT_INTERRUPTED
    assert server_pids
    for pid in server_pids:
        assert wait_gone(pid)


def test_sigint_while_starting(serve, tiny_q4):
    port = free_port()
    run = serve("--model", str(tiny_q4), "--port", str(port), "--ctx", "512")
    deadline = time.monotonic() + 30
    while not children_of(run.process.pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    server_pids = children_of(run.process.pid)
    assert server_pids, "qreg never started llama-server"

    run.signal(signal.SIGINT)
    assert run.finish() == EXIT_INTERRUPTED
    for pid in server_pids:
        assert wait_gone(pid)


def test_server_exit_while_serving_shows_log(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    ready = run.wait_ready()
    assert ready is not None, run.stderr

    os.kill(ready["pid"], signal.SIGKILL)
    assert run.finish() == ServerError.exit_code
    assert "llama-server exited with signal SIGKILL while serving" in run.stderr
    assert f"lines of {ready['log']}" in run.stderr


# --- failures before and during start ------------------------------------------------------


def test_port_in_use(serve, tiny_q4):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve("--model", str(tiny_q4), "--port", str(port))
        assert run.finish() == PortInUseError.exit_code
    assert f"port {port} on 127.0.0.1 is already in use" in run.stderr
    assert "--port" in run.stderr
    assert json.loads(run.stdout)["error"]["type"] == "port_in_use"


def test_missing_binary_option(qreg_exe, tiny_q4, tmp_path):
    result = subprocess.run(
        [qreg_exe, "serve", "--model", str(tiny_q4), "--server-bin", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == ServerBinaryError.exit_code
    assert f"llama-server {tmp_path / 'nope'} (from option) not found" in result.stderr
    assert "QREG_LLAMA_SERVER" in result.stderr


def test_missing_binary_on_path(qreg_exe, tiny_q4, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [qreg_exe, "serve", "--model", str(tiny_q4)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == ServerBinaryError.exit_code
    assert "llama-server not found on PATH" in result.stderr


def test_corrupt_model_shows_log_tail(serve, tiny_q4, tmp_path):
    # An unknown architecture passes qreg's header checks but makes llama-server exit while loading.
    corrupt = tmp_path / "corrupt.gguf"
    copy_with_patch(tiny_q4, corrupt, b"\x05\x00\x00\x00\x00\x00\x00\x00qwen3", b"\x05\x00\x00\x00\x00\x00\x00\x00qwenX")
    digest = sha256(corrupt)

    run = serve("--model", str(corrupt), "--port", str(free_port()), "--ctx", "512")
    assert run.finish() == ServerError.exit_code
    assert "llama-server exited with exit code 1 before it was healthy" in run.stderr
    assert "lines of " in run.stderr
    assert "qwenX" in run.stderr  # llama-server's own message about the architecture, from the log tail
    assert sha256(corrupt) == digest
    assert children_of(run.process.pid) == []


def test_start_timeout_stops_server(serve, fixture_ggufs):
    run = serve("--model", str(fixture_ggufs.files["BF16"]), "--port", str(free_port()), "--timeout", "0.1")
    assert run.finish() == ServerError.exit_code
    assert "was not healthy within 0.1 s" in run.stderr
    assert "--timeout" in run.stderr


def test_variant_not_pulled(serve, fixture_ggufs):
    run = serve("Q4_K_M", "--manifest", str(fixture_ggufs.manifest_path), "--port", str(free_port()))
    assert run.finish() == NotFoundError.exit_code
    assert "variant Q4_K_M is not pulled" in run.stderr
    assert "qreg pull Q4_K_M" in run.stderr
    assert "--pull" in run.stderr


# --- the API key ------------------------------------------------------------------------


def test_api_key_only_in_environment(serve, tiny_q4):
    secret = "k3y-that-must-not-leak"
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512", env={"QREG_API_KEY": secret})
    ready = run.wait_ready()
    assert ready is not None, run.stderr
    pid = ready["pid"]

    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert not any(secret.encode() in arg for arg in argv)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"LLAMA_API_KEY={secret}".encode() in environ

    assert embed_once(ready["url"]).status_code == 401
    assert embed_once(ready["url"], headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert "$QREG_API_KEY" in ready["curl"]

    run.signal(signal.SIGTERM)
    assert run.finish() == EXIT_TERMINATED
    assert secret not in run.stdout
    assert secret not in run.stderr
    assert secret not in Path(ready["log"]).read_text(errors="replace")


def test_api_key_option_not_in_server_argv(serve, tiny_q4):
    secret = "option-k3y"
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512", "--api-key", secret)
    ready = run.wait_ready()
    assert ready is not None, run.stderr
    argv = Path(f"/proc/{ready['pid']}/cmdline").read_bytes()
    assert secret.encode() not in argv
    assert secret not in json.dumps(ready)


# --- detached servers -------------------------------------------------------------------


def qreg(qreg_exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([qreg_exe, *args], capture_output=True, text=True, timeout=120)


def test_detach_ps_stop(qreg_exe, llama_server_bin, tiny_q4):
    port = free_port()
    started = qreg(
        qreg_exe, "serve", "--model", str(tiny_q4), "--port", str(port), "--ctx", "512",
        "--server-bin", str(llama_server_bin), "--detach", "--json",
    )
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    try:
        assert health(f"http://127.0.0.1:{port}") == 200

        listed = json.loads(qreg(qreg_exe, "ps", "--json").stdout)["servers"]
        assert [(s["pid"], s["port"]) for s in listed] == [(pid, port)]

        stopped = qreg(qreg_exe, "stop", str(port), "--json")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["stopped"][0]["pid"] == pid
        assert wait_gone(pid)
        assert json.loads(qreg(qreg_exe, "ps", "--json").stdout)["servers"] == []
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_ps_forgets_dead_server(qreg_exe, llama_server_bin, tiny_q4):
    started = qreg(
        qreg_exe, "serve", "--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512",
        "--server-bin", str(llama_server_bin), "--detach", "--json",
    )
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)

    assert json.loads(qreg(qreg_exe, "ps", "--json").stdout)["servers"] == []
    stopped = qreg(qreg_exe, "stop")
    assert stopped.returncode == NotFoundError.exit_code
    assert "no server started with 'qreg serve --detach' is running" in stopped.stderr


def test_stop_unknown_port(qreg_exe, llama_server_bin, tiny_q4):
    started = qreg(
        qreg_exe, "serve", "--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512",
        "--server-bin", str(llama_server_bin), "--detach", "--json",
    )
    pid = json.loads(started.stdout)["pid"]
    try:
        result = qreg(qreg_exe, "stop", "1")
        assert result.returncode == NotFoundError.exit_code
        assert "port or pid 1" in result.stderr
        assert not process_gone(pid)

        result = qreg(qreg_exe, "stop", "abc")
        assert result.returncode == 2
        assert "invalid server 'abc'" in result.stderr
    finally:
        qreg(qreg_exe, "stop", "--all")
        assert wait_gone(pid)


def test_dry_run_with_pull_downloads_nothing(serve, fixture_ggufs):
    run = serve("Q4_K_M", "--pull", "--dry-run", "--manifest", str(fixture_ggufs.manifest_path))
    assert run.finish() == NotFoundError.exit_code
    assert "--dry-run downloads nothing" in run.stderr
    from registry import store
    from registry.manifest import load_manifest

    assert store.list_pulled(load_manifest(fixture_ggufs.manifest_path)) == []


def test_ctrl_c_is_not_an_error(serve, tiny_q4):
    run = serve("--model", str(tiny_q4), "--port", str(free_port()), "--ctx", "512")
    assert run.wait_ready() is not None, run.stderr
    run.signal(signal.SIGINT)
    assert run.finish() == 130
    assert "qreg: error" not in run.stderr  # --json hides the "stopping" note, and no error is printed
