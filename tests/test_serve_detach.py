"""Tests of `qreg serve --detach` failures, damaged server records, and `qreg rm` of a served variant.

The end-to-end tests run the installed `qreg` with the real llama-server on a free
loopback port and check that no llama-server is left running afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from registry.errors import DiskSpaceError, NotFoundError, ServerError
from registry.server import DetachedServer, StopSignal, parse_record, record_detached, servers_dir, stop_signals_raise
from server_helpers import QregServe, children_of, free_port, health, process_gone, wait_gone


def qreg(qreg_exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([qreg_exe, *args], capture_output=True, text=True, timeout=120)


def servers_on_port(port: int) -> list[int]:
    """Return the pids of llama-server processes whose command line has --port PORT, whatever their parent."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--embedding" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            if not process_gone(int(entry.name)):
                found.append(int(entry.name))
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def record_of(**changes) -> dict:
    data = DetachedServer(
        pid=4242, port=18080, host="127.0.0.1", url="http://127.0.0.1:18080", model="/models/m.gguf",
        variant=None, log="/tmp/llama-server-18080.log", started=1.0, binary="/usr/bin/llama-server",
    ).to_dict()
    data.update(changes)
    return data


# --- the record cannot be written -------------------------------------------------------


def test_detach_record_blocked_stops_server(qreg_exe, llama_server_bin, fixture_ggufs):
    # Tests run as root, which ignores permissions, so a regular file where the servers
    # directory should be makes the record path unwritable instead.
    blocker = servers_dir()
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory\n")
    port = free_port()

    result = qreg(
        qreg_exe, "serve", "--model", str(fixture_ggufs.files["Q4_K_M"]), "--port", str(port), "--ctx", "512",
        "--server-bin", str(llama_server_bin), "--detach", "--json",
    )
    left = servers_on_port(port)
    kill_all(left)

    assert result.returncode == ServerError.exit_code, result.stderr
    assert "cannot write the record of detached llama-server pid" in result.stderr
    assert f"{blocker} is not a directory" in result.stderr
    assert result.stderr.count("qreg: error:") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["error"]["type"] == "server"
    assert left == [], "llama-server kept running after its record failed"
    assert health(f"http://127.0.0.1:{port}") is None
    assert blocker.read_text() == "not a directory\n"


def test_record_disk_full(tmp_path):
    # /dev/full fails every write with ENOSPC, a real full disk without a full disk.
    directory = servers_dir()
    directory.mkdir(parents=True)
    (directory / "4242.tmp").symlink_to("/dev/full")

    with pytest.raises(DiskSpaceError) as caught:
        record_detached(DetachedServer(**record_of()))

    line = caught.value.one_line()
    assert caught.value.exit_code == 10
    assert f"{directory / '4242.json'}" in line
    assert "No space left on device" in line
    assert "free some space" in line
    assert not (directory / "4242.json").exists()
    assert not (directory / "4242.tmp").is_symlink()


# --- signals while the detached server loads ------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_detach_signal_while_loading(qreg_exe, llama_server_bin, fixture_ggufs, signum):
    # BF16 is the largest fixture file, so its load leaves the widest window before /health is 200.
    port = free_port()
    run = QregServe(
        qreg_exe,
        ["--model", str(fixture_ggufs.files["BF16"]), "--port", str(port), "--ctx", "512",
         "--server-bin", str(llama_server_bin), "--detach", "--json"],
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 30
        while not list(servers_dir().glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.002)
        server_pids = children_of(run.process.pid)
        records = [path.name for path in servers_dir().glob("*.json")]
        assert server_pids, "qreg never started llama-server"
        assert health(f"http://127.0.0.1:{port}") != 200, "the model loaded before the signal; the window is too short"

        run.signal(signum)
        code = run.finish()
    finally:
        run.cleanup()
    left = servers_on_port(port)
    kill_all(left)

    assert code == 128 + signum
    assert f"{signum.name} arrived before llama-server on port {port} was healthy" in run.stderr
    assert json.loads(run.stdout)["error"]["exit_code"] == 128 + signum
    assert records == [f"{server_pids[0]}.json"], "the record was not written before the wait for /health"
    assert left == []
    assert list(servers_dir().glob("*.json")) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_deferred_holds_stop_signal(signum):
    finished = False
    with stop_signals_raise() as signals:
        with pytest.raises(StopSignal) as caught:
            with signals.deferred():
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
                finished = True
    assert finished
    assert caught.value.signum == signum


def test_deferred_holds_sigint():
    finished = False
    with stop_signals_raise() as signals:
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                finished = True
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_without_signal_raises_nothing():
    with stop_signals_raise() as signals:
        with signals.deferred():
            pass
        assert signals.pending is None


# --- damaged records ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,text",
    [
        ({"pid": "notint"}, "field 'pid' is missing or invalid: 'notint'"),
        ({"pid": True}, "field 'pid' is missing or invalid: True"),
        ({"pid": 0}, "field 'pid' is not a process id: 0"),
        ({"pid": -1}, "field 'pid' is not a process id: -1"),
        ({"pid": 2**40}, "is not a process id"),
        ({"port": None}, "field 'port' is missing or invalid: None"),
        ({"binary": 5}, "field 'binary' is missing or invalid: 5"),
    ],
)
def test_parse_record_rejects(changes, text):
    with pytest.raises(ValueError) as caught:
        parse_record(json.dumps(record_of(**changes)))
    assert text in str(caught.value)


def test_parse_record_rejects_non_object():
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        parse_record("[1, 2]")


def test_parse_record_ignores_extra_fields():
    data = record_of(future_field="x")
    assert parse_record(json.dumps(data)) == DetachedServer(**record_of())


@pytest.mark.parametrize("text", ['{"pid": "notint"}', json.dumps(record_of(pid="notint")), "{not json", "\udcff"])
def test_ps_and_stop_drop_bad_record(qreg_exe, text):
    directory = servers_dir()
    directory.mkdir(parents=True)
    path = directory / "4242.json"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))

    listed = qreg(qreg_exe, "ps", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"servers": []}
    assert f"removing invalid server record {path}" in listed.stderr
    assert len(listed.stderr.strip().splitlines()) == 1
    assert not path.exists()

    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    stopped = qreg(qreg_exe, "stop")
    assert stopped.returncode == NotFoundError.exit_code
    assert "Traceback" not in stopped.stderr
    assert "no server started with 'qreg serve --detach' is running" in stopped.stderr
    assert not path.exists()


# --- qreg rm of a served variant -----------------------------------------------------------


def test_rm_warns_about_serving_server(qreg_exe, llama_server_bin, gguf_mirror, fixture_ggufs):
    manifest_path = str(fixture_ggufs.manifest_path)
    port = free_port()
    started = qreg(
        qreg_exe, "serve", "Q4_K_M", "--pull", "--manifest", manifest_path, "--port", str(port), "--ctx", "512",
        "--server-bin", str(llama_server_bin), "--detach", "--json",
    )
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    try:
        other = qreg(qreg_exe, "rm", "Q8_0", "--manifest", manifest_path)
        assert other.returncode == NotFoundError.exit_code
        assert "warning" not in other.stderr

        removed = qreg(qreg_exe, "rm", "Q4_K_M", "--manifest", manifest_path, "--json")
        assert removed.returncode == 0, removed.stderr
        assert f"llama-server pid {pid} on port {port} serves Q4_K_M" in removed.stderr
        assert f"'qreg stop {port}'" in removed.stderr
        assert json.loads(removed.stdout)["variant"] == "Q4_K_M"
        assert health(f"http://127.0.0.1:{port}") == 200
    finally:
        qreg(qreg_exe, "stop", "--all")
        if not wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
