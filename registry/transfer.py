"""The byte transfer of `qreg pull`: one file from its download URL into a partial file.

The body is read with the standard library (urllib.request, whose responses are
http.client's) straight into a few reusable 1 MiB buffers with `readinto`. The reading
thread hashes each filled buffer and a second thread appends it to the partial, so the
sha256 costs no extra pass over the file and runs beside the writes.

httpx was used here first. It hands a body over as 64 KiB bytes objects parsed by h11.
Reading a 609.5 MiB file from the loopback mirror took 0.55 s of CPU that way and
0.08 s with `readinto`, and on a two-core machine that CPU is taken from the hashing
(docs/benchmarks.md). urllib.request keeps what a download needs from an HTTP
client: HTTP(S)_PROXY and NO_PROXY, redirects, timeouts and TLS.

The partial only ever grows by whole, in-order buffers, so its size is the offset a
later run resumes from with a Range request.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from registry import store
from registry.errors import AuthError, HubError, NotFoundError

log = logging.getLogger(__name__)

BUFFER_BYTES = 1 << 20
MIN_READ_BYTES = 64 << 10
# Buffers in flight between the reading thread and the writer: enough to keep both
# busy, few enough that a stalled disk stops the socket reads within 8 MiB.
BUFFERS = 8
# A buffer that is still filling is handed over after this long, so a slow download
# keeps its partial file current for a resume.
FLUSH_SECONDS = 0.5
MAX_BACKOFF = 16.0
MAX_REDIRECTS = 5


class TransientError(Exception):
    """A failure worth retrying: a dropped connection, a timeout, HTTP 429 or 5xx."""


class Notes(Protocol):
    """The destination of the transfer's resume and retry notes (registry.hub's _Notes)."""

    progress_enabled: bool

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


def short_error(error: BaseException) -> str:
    """Return an exception as `Type: first line`, for one-line messages."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def origin(url: str) -> tuple[str, str, int | None]:
    """Return a URL's (scheme, host, port), with the scheme's default port filled in."""
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


# -- opening the response ------------------------------------------------------


class _TokenSafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but drop the Authorization header when one leaves the origin."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _ssl_context() -> ssl.SSLContext:
    # SSL_CERT_FILE or SSL_CERT_DIR choose the CA store, as for httpx; else certifi's
    # bundle, which is there on every system (httpx depends on it).
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _opener(url: str) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [_TokenSafeRedirects()]
    if urlsplit(url).scheme == "https":
        handlers.append(urllib.request.HTTPSHandler(context=_ssl_context()))
    # build_opener adds the proxy handler, which reads HTTP(S)_PROXY and NO_PROXY.
    return urllib.request.build_opener(*handlers)


def _network_error(error: BaseException, action: str) -> Exception:
    """Classify a failure of the connection: TransientError to retry, else HubError."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, ssl.SSLCertVerificationError):
        return HubError(f"{action}: TLS certificate check failed ({reason.verify_message})",
                        hint="set SSL_CERT_FILE to your CA bundle if a proxy re-signs TLS")
    if caused_by_name_resolution(reason):
        return HubError(f"{action}: the host name does not resolve ({short_error(reason)})",
                        hint="check the network and HF_ENDPOINT, then run the same command again")
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return TransientError(short_error(reason))
    return HubError(f"{action}: {short_error(error)}", hint="run the same command again")


def caused_by_name_resolution(error: BaseException) -> bool:
    """Return whether a failed name lookup is the error or any exception in its cause chain."""
    import socket

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror) or "Name or service not known" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


# -- writing and hashing ---------------------------------------------------------


class _Writer:
    """A thread that appends filled buffers to the partial file, in order.

    os.write releases the GIL, so writing runs beside the socket reads and the hashing
    in the reading thread. Buffers come from a fixed pool and go back to it once
    written. `take` blocks while all of them are in flight, so the reads slow down to
    the disk's pace.
    """

    def __init__(self, path: os.PathLike):
        self.error: BaseException | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._free: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(BUFFER_BYTES))
        self._filled: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qreg-write", daemon=True)
        self._thread.start()

    def take(self) -> bytearray:
        """Return an empty buffer, waiting for one when every buffer is in flight."""
        self.raise_error()
        return self._free.get()

    def submit(self, buffer: bytearray, length: int) -> None:
        """Hand the first `length` bytes of a buffer from `take` over to be written."""
        self._filled.put((buffer, length))

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer from `take` unused."""
        self._free.put(buffer)

    def close(self) -> None:
        """Wait until every submitted byte is written (to the page cache)."""
        self._filled.put(None)
        self._thread.join()
        os.close(self._fd)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self._filled.get()) is not None:
            buffer, length = item
            if self.error is None:  # after a failure, only return buffers so `take` never hangs
                try:
                    _write_all(self._fd, memoryview(buffer)[:length])
                except BaseException as error:  # raised in the reading thread by take/close
                    self.error = error
            self._free.put(buffer)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


# -- the download ----------------------------------------------------------------


class _RestartFromZero(Exception):
    """The server cannot continue the partial (416 for a shorter file); start over."""


@dataclass
class Download:
    """One file's transfer into its partial: received bytes, the running sha256, retries."""

    url: str
    paths: store.VariantPaths
    size: int
    headers: dict[str, str]
    notes: Notes
    retries: int
    backoff: float
    timeout: float
    offset: int = 0
    retried: int = 0
    digest: Any = None
    bar: Any = None

    def run(self, offset: int) -> str:
        """Fetch the bytes after `offset`, retrying transient failures; return the sha256 hex."""
        self._start(offset)
        try:
            self._loop()
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.digest.hexdigest()

    def _start(self, offset: int) -> None:
        # A sha256 state cannot be saved, so the prefix already on disk is hashed again.
        self.digest = store.hash_file(self.paths.partial, limit=offset) if offset else hashlib.sha256()
        if offset:
            self.notes.info(f"resuming {self.paths.file} at byte {offset} of {self.size}")
        self.offset = offset
        if self.notes.progress_enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.paths.file, dynamic_ncols=True, leave=False)

    def _loop(self) -> None:
        failures = 0
        while self.offset < self.size:
            before = self.offset
            try:
                self._attempt()
            except _RestartFromZero:
                self._truncate()
                continue
            except TransientError as error:
                failures = 0 if self.offset > before else failures
                failures += 1
                if failures > self.retries:
                    raise HubError(
                        f"download of {self.paths.file} failed {failures} times in a row "
                        f"({error}); {self.offset} of {self.size} bytes are kept",
                        hint="run the same command again to resume",
                    ) from None
                self._wait(error, failures)

    def _wait(self, error: TransientError, failures: int) -> None:
        self.retried += 1
        wait = min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF)
        self.notes.warn(
            f"download of {self.paths.file} interrupted at byte {self.offset} of {self.size} "
            f"({error}); resuming in {wait:.1f} s (retry {failures} of {self.retries})"
        )
        time.sleep(wait)

    def _truncate(self) -> None:
        os.truncate(self.paths.partial, 0)
        self.offset = 0
        self.digest = hashlib.sha256()
        if self.bar is not None:
            self.bar.reset(total=self.size)

    def _attempt(self) -> None:
        response = self._open()
        with response:
            self._check_response(response.status, response.headers)
            self._receive(response)

        if self.offset < self.size:
            # The server closed the connection before the last byte.
            raise TransientError(f"connection closed after byte {self.offset} of {self.size}")

    def _open(self) -> Any:
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            return _opener(self.url).open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            with error:
                self._check_response(error.code, error.headers)
            raise HubError(f"download of {self.paths.file} failed with HTTP {error.code}", hint="try again later")
        except (OSError, http.client.HTTPException) as error:
            raise _network_error(error, f"download of {self.paths.file}") from None

    def _check_response(self, status: int, headers: Any) -> None:
        if status == 416:
            log.info("server rejected Range bytes=%d- for %s; starting over", self.offset, self.paths.file)
            raise _RestartFromZero()
        if status == 429 or status >= 500:
            raise TransientError(f"HTTP {status} from {urlsplit(self.url).netloc}")
        if status in (401, 403):
            raise AuthError(f"download of {self.paths.file} was rejected as unauthorized (HTTP {status})",
                            hint=f"set HF_TOKEN to a token that can read {self.paths.repo}")
        if status == 404:
            raise NotFoundError(f"{self.paths.file} not found at its download location (HTTP 404)",
                                hint="run the same command again; the hub may have moved the file")
        if status not in (200, 206):
            raise HubError(f"download of {self.paths.file} failed with HTTP {status}", hint="try again later")

        if status == 200 and self.offset:
            # The server ignored Range and sends the whole file: never append it to the partial.
            self.notes.info(f"the server does not resume downloads; fetching {self.paths.file} from the start")
            self._truncate()
        elif status == 206:
            self._check_content_range(headers.get("Content-Range", ""))

    def _check_content_range(self, header: str) -> None:
        match = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", header.strip())
        if match is None or int(match.group(1)) != self.offset:
            raise HubError(f"download of {self.paths.file}: Content-Range {header!r} does not start at byte {self.offset}",
                           hint="run the same command again")

    def _receive(self, response: Any) -> None:
        writer = _Writer(self.paths.partial)
        try:
            while self._fill_one(response, writer):
                pass
        finally:
            # Bytes that arrived before a dropped connection or Ctrl-C are kept for the resume.
            self._close_writer(writer)

    def _fill_one(self, response: Any, writer: _Writer) -> bool:
        """Read into one buffer until it is full, FLUSH_SECONDS pass or the body ends; return False at the end.

        http.client's readinto waits until the whole slice it is given is filled. So the
        slices start small and double while they fill fast. A slow link still hands a
        buffer over every FLUSH_SECONDS, and a fast one reads a whole buffer in a few calls.
        """
        buffer = writer.take()
        view = memoryview(buffer)
        length = 0
        slice_bytes = MIN_READ_BYTES
        flush_at = time.monotonic() + FLUSH_SECONDS
        ended = False
        try:
            while length < BUFFER_BYTES and time.monotonic() < flush_at:
                started = time.monotonic()
                received = self._read(response, view[length:length + slice_bytes])
                if received == 0:
                    ended = True
                    break
                length += received
                fast = time.monotonic() - started < FLUSH_SECONDS / 8
                slice_bytes = min(slice_bytes * 2, BUFFER_BYTES) if fast else MIN_READ_BYTES
        finally:
            self._hand_over(writer, buffer, length)
        return not ended

    def _read(self, response: Any, view: memoryview) -> int:
        try:
            return response.readinto(view)
        except (OSError, http.client.HTTPException) as error:
            raise _network_error(error, f"download of {self.paths.file}") from None

    def _hand_over(self, writer: _Writer, buffer: bytearray, length: int) -> None:
        if length == 0:
            writer.give_back(buffer)
            return
        if self.offset + length > self.size:
            writer.give_back(buffer)
            raise HubError(f"the server sent more than the {self.size} bytes of {self.paths.file}",
                           hint="run 'qreg rm' on the variant and pull it again")
        # Hashed here, while the bytes are still in this core's cache; the write runs beside.
        self.digest.update(memoryview(buffer)[:length])
        writer.submit(buffer, length)
        self.offset += length
        if self.bar is not None:
            self.bar.update(length)

    def _close_writer(self, writer: _Writer) -> None:
        try:
            writer.close()
        except OSError as error:
            full = store.disk_full_error(self.paths, error)
            raise (full or error) from None
