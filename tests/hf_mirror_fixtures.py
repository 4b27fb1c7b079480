"""Pytest fixtures that run the loopback Hugging Face mirror, with faults the tests can inject.

`hf_mirror` starts a `FaultyMirror` (registry.mirror.HubMirror plus fault controls) on
127.0.0.1 and points HF_ENDPOINT at it. It serves nothing until a test adds a repo:

    hf_mirror.add_repo("owner/name", {"file.gguf": path})

`random_repo` and `unpinned_repo` add a repo of random-bytes "GGUF" files with a
manifest that pins their sha256, or does not; `gguf_mirror` serves the real fixture GGUFs (`fixture_ggufs`) under
their fixture manifest.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from registry.mirror import HubMirror, MirrorFile
from registry.store import sha256_file

__all__ = [
    "FaultyMirror",
    "RandomRepo",
    "MIRROR_TOKEN",
    "hf_mirror",
    "random_repo",
    "unpinned_repo",
    "gguf_mirror",
    "write_random_manifest",
]

# The token a gated repo on the mirror accepts; tests check it never reaches any output.
MIRROR_TOKEN = "hf_qregMirrorTestToken0123456789"
RANDOM_REPO = "qreg-test/Random-GGUF"
RANDOM_PREFIX = "Random-"
SEND_CHUNK = 64 * 1024


@dataclass
class Fault:
    """A fault on one file: what to do and how many more requests it applies to (None = all)."""

    kind: str
    times: int | None
    options: dict[str, Any] = field(default_factory=dict)


class FaultyMirror(HubMirror):
    """The loopback mirror plus faults keyed by file name (the last path component).

    Faults on the CDN: drop_after, corrupt, trickle, no_content_length, ignore_range,
    fail (an HTTP status). On `/resolve/`: not_found, override_headers. Per repo: gate.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.faults: dict[str, list[Fault]] = {}
        self._fault_lock = threading.Lock()

    # -- controls ------------------------------------------------------------

    def add_fault(self, file: str, kind: str, times: int | None = 1, **options: Any) -> None:
        with self._fault_lock:
            self.faults.setdefault(file, []).append(Fault(kind, times, options))

    def drop_after(self, file: str, nbytes: int, times: int | None = 1) -> None:
        """Close the connection after sending `nbytes` of the body."""
        self.add_fault(file, "drop_after", times, nbytes=nbytes)

    def corrupt(self, file: str, offset: int = 0, times: int | None = None) -> None:
        """Flip one byte at `offset` of the file, keeping every header right."""
        self.add_fault(file, "corrupt", times, offset=offset)

    def trickle(self, file: str, bytes_per_second: int, times: int | None = None) -> None:
        self.add_fault(file, "trickle", times, rate=bytes_per_second)

    def no_content_length(self, file: str, times: int | None = None) -> None:
        self.add_fault(file, "no_content_length", times)

    def ignore_range(self, file: str, times: int | None = None) -> None:
        """Answer a Range request with 200 and the whole file."""
        self.add_fault(file, "ignore_range", times)

    def fail(self, file: str, status: int, times: int | None = 1) -> None:
        """Answer the CDN request with this HTTP status."""
        self.add_fault(file, "fail", times, status=status)

    def not_found(self, file: str, times: int | None = None) -> None:
        """Answer `/resolve/` for the file with 404 EntryNotFound."""
        self.add_fault(file, "not_found", times)

    def override_headers(self, file: str, times: int | None = None, **headers: str) -> None:
        """Replace `/resolve/` response headers (use underscores for dashes: X_Repo_Commit=...)."""
        self.add_fault(file, "override_headers", times, headers={k.replace("_", "-"): v for k, v in headers.items()})

    def gate(self, repo_id: str) -> None:
        """Make a repo answer 401 unless the request carries MIRROR_TOKEN."""
        self.repos[repo_id].gated = True

    def cdn_gets(self, file: str) -> list:
        """The CDN GET requests for a file, in order."""
        return [r for r in self.requests if r.server == "cdn" and r.method == "GET" and f"filename={file}" in r.path]

    # -- fault lookup ----------------------------------------------------------

    def _take(self, file: str, kind: str) -> Fault | None:
        name = file.rsplit("/", 1)[-1]
        with self._fault_lock:
            for fault in self.faults.get(name, []):
                if fault.kind != kind or fault.times == 0:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # -- hooks -------------------------------------------------------------------

    def intercept(self, handler: Any, kind: str, repo_id: str | None, path: str | None) -> bool:
        if path is None:
            return False
        if kind == "resolve" and self._take(path, "not_found"):
            handler.send_hub_error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": "0" * 40})
            return True
        if kind == "cdn":
            failure = self._take(path, "fail")
            if failure is not None:
                handler.send_hub_error(failure.options["status"], "Injected", "injected failure")
                return True
            if handler.headers.get("Range") and self._take(path, "ignore_range"):
                del handler.headers["Range"]
        return False

    def adjust_headers(self, kind: str, item: MirrorFile, headers: dict[str, str]) -> None:
        if kind == "resolve":
            override = self._take(item.path, "override_headers")
            if override is not None:
                headers.update(override.options["headers"])
        if kind == "cdn" and self._take(item.path, "no_content_length"):
            headers.pop("Content-Length", None)

    def send_file(self, handler: Any, item: MirrorFile, start: int, end: int) -> None:
        drop = self._take(item.path, "drop_after")
        corrupt = self._take(item.path, "corrupt")
        trickle = self._take(item.path, "trickle")
        if not (drop or corrupt or trickle):
            super().send_file(handler, item, start, end)
            return
        limit = drop.options["nbytes"] if drop else None
        self._send_slowly(handler, item, start, end, limit, corrupt, trickle)

    def _send_slowly(self, handler: Any, item: MirrorFile, start: int, end: int,
                     limit: int | None, corrupt: Fault | None, trickle: Fault | None) -> None:
        chunk_size = SEND_CHUNK
        pause = 0.0
        if trickle is not None:
            rate = trickle.options["rate"]
            chunk_size = max(1, min(SEND_CHUNK, rate // 20))
            pause = chunk_size / rate
        sent = 0
        with open(item.source, "rb") as source:
            source.seek(start)
            position = start
            while position < end:
                chunk = bytearray(source.read(min(chunk_size, end - position)))
                if corrupt is not None and position <= corrupt.options["offset"] < position + len(chunk):
                    chunk[corrupt.options["offset"] - position] ^= 0xFF
                if limit is not None and sent + len(chunk) >= limit:
                    handler.wfile.write(chunk[: limit - sent])
                    handler.wfile.flush()
                    self._drop(handler)
                    return
                try:
                    handler.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                position += len(chunk)
                if pause:
                    time.sleep(pause)

    @staticmethod
    def _drop(handler: Any) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def hf_mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyMirror]:
    """Start an empty FaultyMirror on 127.0.0.1 (free ports) and set HF_ENDPOINT to it."""
    mirror = FaultyMirror(token=MIRROR_TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", mirror.endpoint)
    yield mirror
    mirror.stop()


# -- a repo of random bytes with its own manifest ------------------------------


@dataclass
class RandomRepo:
    """Random-bytes files served by the mirror, with a manifest pinning them (or not)."""

    repo: str
    files: dict[str, Path]  # variant -> file
    sha256: dict[str, str]  # variant -> sha256
    manifest_path: Path
    commit: str

    def file_name(self, variant: str) -> str:
        return self.files[variant].name


RANDOM_SIZES = {"Q8_0": 3 * 1024 * 1024 + 17, "Q4_K_M": 2 * 1024 * 1024 + 5, "Q2_K": 1024 * 1024 + 3}


def write_random_manifest(
    path: Path, repo: str, files: dict[str, Path], *, pin: bool, revision: str = "", parameters: int = 1_000_000
) -> Path:
    """Write a manifest in the shipped schema for these files, with sha256 pinned or left empty."""
    import tomli_w

    from registry.manifest import MIB, derive_status

    variants = []
    for name, file in files.items():
        size = file.stat().st_size
        size_mib = max(round(size / MIB, 2), 0.01)
        bits = round(size_mib * MIB * 8 / parameters, 2)
        variants.append({
            "name": name,
            "file": file.name,
            "size_mib": size_mib,
            "bits_per_weight": bits,
            "imatrix": False,
            "strategy": "standard",
            "status": derive_status(name=name, bits=bits, diverges=False, card_role=""),
            "backends": ["cpu"],
            "sha256": sha256_file(file) if pin else "",
            "size_bytes": size if pin else 0,
        })
    model = {
        "name": "Random", "repo": repo, "revision": revision, "file_prefix": RANDOM_PREFIX,
        "architecture": "qwen3", "parameters": parameters, "context_length": 512, "embedding_length": 64,
        "block_count": 2, "head_count": 2, "head_count_kv": 1, "key_length": 32, "value_length": 32,
        "feed_forward_length": 128, "vocab_size": 1000, "pooling": "last", "eos_token_id": 0,
    }
    path.write_text(tomli_w.dumps({"schema_version": 1, "model": model, "variants": variants}), encoding="utf-8")
    return path


def _random_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, size in RANDOM_SIZES.items():
        file = folder / f"{RANDOM_PREFIX}{name}.gguf"
        file.write_bytes(os.urandom(size))
        files[name] = file
    return files


def _serve_random_repo(mirror: FaultyMirror, folder: Path, *, pin: bool) -> RandomRepo:
    files = _random_files(folder / "upstream")
    sha256s = {name: sha256_file(path) for name, path in files.items()}
    commit = mirror.add_repo(RANDOM_REPO, {p.name: p for p in files.values()},
                             sha256s={files[n].name: s for n, s in sha256s.items()})
    manifest = write_random_manifest(folder / "random-manifest.toml", RANDOM_REPO, files, pin=pin)
    return RandomRepo(RANDOM_REPO, files, sha256s, manifest, commit)


@pytest.fixture
def random_repo(hf_mirror: FaultyMirror, tmp_path: Path) -> RandomRepo:
    """Serve three random-bytes files under a manifest that pins their sha256 and size."""
    return _serve_random_repo(hf_mirror, tmp_path, pin=True)


@pytest.fixture
def unpinned_repo(hf_mirror: FaultyMirror, tmp_path: Path) -> RandomRepo:
    """Serve three random-bytes files under a manifest that pins no sha256 (digest from the hub)."""
    return _serve_random_repo(hf_mirror, tmp_path, pin=False)


@pytest.fixture
def gguf_mirror(hf_mirror: FaultyMirror, fixture_ggufs: Any) -> FaultyMirror:
    """The mirror serving the real fixture GGUFs under `fixture_ggufs.repo` (manifest: `fixture_ggufs.manifest_path`)."""
    hf_mirror.add_repo(
        fixture_ggufs.repo,
        {path.name: path for path in fixture_ggufs.files.values()},
        sha256s={Path(e["path"]).name: e["sha256"] for e in fixture_ggufs.index.values()},
    )
    return hf_mirror
