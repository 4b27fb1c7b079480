"""Tests of registry.transfer beyond the fault tests: proxies, buffers that fill slowly,
how connection failures are classified, and that huggingface_hub stays on loopback."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from registry import hub, store, transfer
from registry.errors import HubError
from registry.manifest import load_manifest


class _ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain-HTTP forward proxy on 127.0.0.1 that only forwards to 127.0.0.1 and logs each request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self._forward()

    def _forward(self) -> None:
        target = urlsplit(self.path)  # a proxy receives the absolute URL
        self.server.seen.append((self.command, self.path))
        if target.hostname != "127.0.0.1":
            self.send_error(403, "this test proxy forwards to 127.0.0.1 only")
            return
        upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
        path = target.path + (f"?{target.query}" if target.query else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        upstream.request(self.command, path, headers=headers)
        response = upstream.getresponse()
        body = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if self.command == "GET" else response.getheader("Content-Length", "0")))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
        upstream.close()


@pytest.fixture
def forward_proxy() -> Iterator[_ForwardProxy]:
    from huggingface_hub import close_session

    # huggingface_hub keeps one HTTP client and reads the proxy variables when it makes
    # it, so each side of a proxy test starts a new one.
    close_session()
    proxy = _ForwardProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    close_session()


def test_pull_through_http_proxy(random_repo, hf_mirror, forward_proxy, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, forward_proxy.url)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    manifest = load_manifest(random_repo.manifest_path)

    result = hub.pull(manifest, "Q2_K")

    assert result.path.read_bytes() == random_repo.files["Q2_K"].read_bytes()
    file = random_repo.file_name("Q2_K")
    assert any(method == "GET" and file in url for method, url in forward_proxy.seen)
    assert len(hf_mirror.cdn_gets(file)) == 1


def test_no_proxy_bypasses_proxy(random_repo, hf_mirror, forward_proxy, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, forward_proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    manifest = load_manifest(random_repo.manifest_path)

    hub.pull(manifest, "Q2_K")

    assert not any(method == "GET" for method, _ in forward_proxy.seen)


def test_slow_download_flushes_partial(random_repo, hf_mirror, monkeypatch):
    # A trickle fills no 1 MiB buffer, so the partial only grows because buffers are handed
    # over every FLUSH_SECONDS; stop the transfer after a few and look at the partial.
    monkeypatch.setattr(transfer, "FLUSH_SECONDS", 0.05)
    file = random_repo.file_name("Q2_K")
    hf_mirror.trickle(file, bytes_per_second=200_000)
    manifest = load_manifest(random_repo.manifest_path)
    paths = store.paths_for(manifest, manifest.resolve("Q2_K"))
    sizes: list[int] = []

    def stop_after_three(self, response, writer):
        grew = original(self, response, writer)
        sizes.append(self.offset)
        if len(sizes) == 3:
            raise KeyboardInterrupt
        return grew

    original = transfer.Download._fill_one
    monkeypatch.setattr(transfer.Download, "_fill_one", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(manifest, "Q2_K")

    assert 0 < sizes[0] < sizes[2] < 1024 * 1024
    assert paths.partial.stat().st_size == sizes[2]
    assert paths.partial.read_bytes() == random_repo.files["Q2_K"].read_bytes()[: sizes[2]]


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError("timed out"), True),
        (http.client.IncompleteRead(b"", 10), True),
        (socket.gaierror(-2, "Name or service not known"), False),
    ],
)
def test_network_error_classes(error, transient):
    classified = transfer._network_error(error, "download of x.gguf")
    assert isinstance(classified, transfer.TransientError if transient else HubError)


def test_refused_download_retries_then_fails(random_repo, hf_mirror, monkeypatch):
    # The CDN origin goes away after the metadata request: every GET is refused.
    manifest = load_manifest(random_repo.manifest_path)
    remote = hub.fetch_file_metadata(random_repo.repo, random_repo.file_name("Q2_K"), "main")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    location = remote.location.replace(f":{urlsplit(remote.location).port}/", f":{closed_port}/")
    monkeypatch.setattr(hub, "fetch_file_metadata",
                        lambda *args, **kwargs: hub.RemoteFile(**{**remote.__dict__, "location": location}))

    with pytest.raises(HubError, match=r"failed 3 times in a row \(ConnectionRefusedError") as raised:
        hub.pull(manifest, "Q2_K", retries=2, backoff=0.01)

    assert "run the same command again" in raised.value.hint
    assert store.partial_info(store.paths_for(manifest, manifest.resolve("Q2_K"))) is None


def test_hf_import_time_settings_stay_local():
    # A request huggingface_hub makes on its own (telemetry, the agent registry) uses
    # the endpoint it read at import, which the test session keeps on loopback.
    from huggingface_hub import constants

    assert constants.HF_HUB_DISABLE_TELEMETRY is True
    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
