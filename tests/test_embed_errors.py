"""Bad input to `qreg embed`: each ends in one line and its exit code, never a traceback."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading

import pytest

from registry.errors import EmbedError, NotFoundError, UsageError


def run(qreg_exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([qreg_exe, "embed", *args], capture_output=True, text=True, timeout=60)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


class _NotLlamaServer(http.server.BaseHTTPRequestHandler):
    """A handler that replies to every request like a JSON API that is not llama-server: 404 with a string error."""

    def do_POST(self):  # noqa: N802 - the http.server handler name
        body = json.dumps({"error": f"no route for {self.path}"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotLlamaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_missing_file(qreg_exe, tmp_path):
    result = run(qreg_exe, "--url", "http://127.0.0.1:9", "--file", str(tmp_path / "missing.txt"))
    assert_one_line(result, NotFoundError.exit_code, "missing.txt: no such file")


def test_port_not_a_number(qreg_exe):
    result = run(qreg_exe, "--url", "http://127.0.0.1:abc", "hi")
    assert_one_line(result, UsageError.exit_code, "invalid --url", "http://127.0.0.1:8080")


def test_url_without_scheme_json(qreg_exe):
    result = run(qreg_exe, "--url", "notaurl", "--json", "hi")
    assert_one_line(result, UsageError.exit_code, "invalid --url 'notaurl'")
    assert json.loads(result.stdout)["error"]["type"] == "usage"


def test_server_that_is_not_llama(qreg_exe, other_server):
    result = run(qreg_exe, "--url", other_server, "hi")
    assert_one_line(result, EmbedError.exit_code, "returned 404: no route for /tokenize", "llama-server")
