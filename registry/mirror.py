"""An HTTP server that speaks enough of the Hugging Face hub protocol to download from it.

The tests point HF_ENDPOINT at it on 127.0.0.1. Bound to another address, the same
server can serve a directory of repos, or a Hugging Face cache such as qreg's store, to
other machines (`python -m registry.mirror --host 0.0.0.0 --hf-cache DIR`). It follows what huggingface_hub 2.4.0 sends and expects (file_download.py:
`hf_hub_url`, `get_hf_file_metadata`, `http_get`; hf_api.py: `model_info`,
`get_paths_info`, `list_repo_tree`):

- `HEAD`/`GET /{repo}/resolve/{revision}/{path}`: an LFS file gets a 302. Its headers
  are `X-Repo-Commit`, `X-Linked-Etag` (the file's sha256, quoted), `X-Linked-Size`,
  `ETag` (the git blob id of the LFS pointer) and `Location`. The location is on a
  second port that stands for the hub's CDN. A different port is a different origin, so
  huggingface_hub reads the metadata from the 302 and drops the Authorization header
  when it follows the redirect, as it does with the real CDN. A small non-LFS file is
  served directly with its git blob id as `ETag`.
- The CDN port serves the bytes with `Range` support (206 with `Content-Range`, 416
  when unsatisfiable).
- `GET /api/models/{repo}[/revision/{revision}]` (model info; `?blobs=true` adds
  sizes and LFS digests to `siblings`), `POST /api/models/{repo}/paths-info/{revision}`
  and `GET /api/models/{repo}/tree/{revision}[/{path}]`, with `lfs.oid` = sha256.
- Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
  `GatedRepo`) so huggingface_hub raises its matching exception class. A gated repo
  answers 401 unless the request has `Authorization: Bearer <token>`.

Not served: Xet storage headers, datasets and spaces, uploads, pagination (every
listing fits one page).

Subclasses inject faults through `intercept`, `adjust_headers` and `send_file`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from registry.store import sha256_file

log = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class MirrorFile:
    """One file of a repo commit: where its bytes are and the digests the hub reports for it."""

    path: str
    source: Path
    size: int
    sha256: str
    lfs: bool
    git_oid: str
    pointer_size: int

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


@dataclass
class MirrorRepo:
    """A repo: its commits (commit id -> files by path) and branch names."""

    repo_id: str
    commits: dict[str, dict[str, MirrorFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def resolve(self, revision: str) -> str | None:
        """Return the commit id of a branch name or commit id, or None."""
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request the mirror received; the token itself is never recorded."""

    method: str
    server: str
    path: str
    range: str | None
    authorized: bool


def git_blob_id(content: bytes) -> str:
    """Return git's object id of a blob with this content (sha1 over a 'blob N\\0' header)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the text of the git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def describe_file(repo_path: str, source: Path, sha256: str | None = None) -> MirrorFile:
    """Build the hub's view of a file: LFS for model formats and files of 10 MiB or more."""
    size = source.stat().st_size
    digest = sha256 or sha256_file(source)
    lfs = repo_path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
    if lfs:
        pointer = lfs_pointer(digest, size)
        return MirrorFile(repo_path, source, size, digest, True, git_blob_id(pointer), len(pointer))
    return MirrorFile(repo_path, source, size, digest, False, git_blob_id(source.read_bytes()), 0)


def _snapshot_files(snapshot: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Return a cached snapshot's files (repo path -> blob) and the sha256 that blob names give."""
    files: dict[str, Path] = {}
    sha256s: dict[str, str] = {}
    for link in sorted(snapshot.rglob("*")):
        if not link.is_file():
            continue
        repo_path = link.relative_to(snapshot).as_posix()
        blob = Path(os.path.realpath(link))
        files[repo_path] = blob
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            sha256s[repo_path] = blob.name
    return files, sha256s


def commit_id_for(repo_id: str, files: Iterable[MirrorFile]) -> str:
    """Derive a stable 40-hex commit id from the repo name and its files' digests."""
    digest = hashlib.sha1(repo_id.encode())
    for item in sorted(files, key=lambda f: f.path):
        digest.update(f"\n{item.path} {item.sha256}".encode())
    return digest.hexdigest()


class HubMirror:
    """A hub API and resolve server plus a CDN server, both over the repos added to it."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0, token: str | None = None):
        self.host = host
        self.token = token
        self.repos: dict[str, MirrorRepo] = {}
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._blobs: dict[str, MirrorFile] = {}
        self._hub = _Server((host, port), _HubHandler, self, "hub")
        self._cdn = _Server((host, cdn_port), _CdnHandler, self, "cdn")
        self._threads: list[threading.Thread] = []

    # -- repos -------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, Path],
        *,
        revision: str | None = None,
        branch: str | None = DEFAULT_BRANCH,
        gated: bool = False,
        sha256s: dict[str, str] | None = None,
    ) -> str:
        """Add a commit with these files (repo path -> file on disk) and point `branch` (if any) at it.

        Returns the commit id: `revision` when given (40 hex), else one derived from
        the files. Pass `sha256s` to skip hashing files whose digests are known.
        """
        if revision is not None and not _COMMIT_RE.match(revision):
            raise ValueError(f"revision must be a 40-hex commit id, got {revision!r}")
        sha256s = sha256s or {}
        described = {path: describe_file(path, Path(source), sha256s.get(path)) for path, source in files.items()}
        commit = revision or commit_id_for(repo_id, described.values())

        with self._lock:
            repo = self.repos.setdefault(repo_id, MirrorRepo(repo_id))
            repo.commits[commit] = described
            if branch is not None:
                repo.refs[branch] = commit
            repo.gated = repo.gated or gated
            for item in described.values():
                if item.lfs:
                    self._blobs[item.sha256] = item
        return commit

    def add_directory(self, root: Path) -> list[str]:
        """Add every `root/owner/name/` folder as a repo whose files are the folder's files."""
        added = []
        for repo_dir in sorted(p for p in Path(root).glob("*/*") if p.is_dir()):
            files = {
                str(item.relative_to(repo_dir).as_posix()): item
                for item in sorted(repo_dir.rglob("*"))
                if item.is_file()
            }
            repo_id = f"{repo_dir.parent.name}/{repo_dir.name}"
            self.add_repo(repo_id, files)
            added.append(repo_id)
        return added

    def add_hf_cache(self, cache_dir: Path) -> list[str]:
        """Add the model repos of a Hugging Face cache (such as qreg's store) with their commits and branches.

        Blobs named by a sha256 are not hashed again, so serving a large store starts at once.
        """
        added = []
        for repo_dir in sorted(Path(cache_dir).glob("models--*--*")):
            repo_id = "/".join(repo_dir.name.split("--")[1:])
            commits = {}
            for snapshot in sorted(p for p in (repo_dir / "snapshots").glob("*") if _COMMIT_RE.match(p.name)):
                commits[snapshot.name] = _snapshot_files(snapshot)
            for commit, (files, sha256s) in commits.items():
                self.add_repo(repo_id, files, revision=commit, branch=None, sha256s=sha256s)
            for ref in sorted((repo_dir / "refs").rglob("*")) if (repo_dir / "refs").is_dir() else []:
                commit = ref.read_text().strip() if ref.is_file() else ""
                if commit in commits:
                    self.repos[repo_id].refs[str(ref.relative_to(repo_dir / "refs").as_posix())] = commit
            if commits:
                added.append(repo_id)
        return added

    def blob(self, sha256: str) -> MirrorFile | None:
        return self._blobs.get(sha256)

    # -- server lifecycle --------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL to put in HF_ENDPOINT."""
        return f"http://{self.url_host()}:{self._hub.server_address[1]}"

    @property
    def cdn_port(self) -> int:
        return self._cdn.server_address[1]

    def url_host(self) -> str:
        """Return the host name clients use in URLs: the listening address, or 127.0.0.1 for all addresses."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host

    def start(self) -> "HubMirror":
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, name=f"mirror-{server.kind}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("mirror listening on %s (cdn port %d)", self.endpoint, self.cdn_port)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("mirror on %s stopped", self.endpoint)

    def __enter__(self) -> "HubMirror":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- hooks for subclasses ----------------------------------------------

    def intercept(self, handler: "_Handler", kind: str, repo_id: str | None, path: str | None) -> bool:
        """Handle a request before the mirror does; return True when a response was sent.

        `kind` is "api", "resolve" or "cdn". The base mirror handles every request itself.
        """
        return False

    def adjust_headers(self, kind: str, item: MirrorFile, headers: dict[str, str]) -> None:
        """Change the headers of a resolve or CDN response before they are sent."""

    def send_file(self, handler: "_Handler", item: MirrorFile, start: int, end: int) -> None:
        """Send bytes start..end-1 of a file's body; the headers are already sent."""
        handler.wfile.flush()
        with open(item.source, "rb") as source:
            handler.connection.sendfile(source, offset=start, count=end - start)

    # -- request bookkeeping -----------------------------------------------

    def record(self, handler: "_Handler", server: str) -> None:
        entry = RequestRecord(
            method=handler.command,
            server=server,
            path=handler.path,
            range=handler.headers.get("Range"),
            authorized=self.is_authorized(handler),
        )
        with self._lock:
            self.requests.append(entry)

    def is_authorized(self, handler: "_Handler") -> bool:
        value = handler.headers.get("Authorization", "")
        return self.token is not None and value == f"Bearer {self.token}"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, mirror: HubMirror, kind: str):
        super().__init__(address, handler)
        self.mirror = mirror
        self.kind = kind


class _Handler(http.server.BaseHTTPRequestHandler):
    """Shared response helpers of the hub and CDN handlers."""

    protocol_version = "HTTP/1.1"
    server: _Server
    # A client that stops reading must not keep a handler thread forever.
    timeout = 60

    @property
    def mirror(self) -> HubMirror:
        return self.server.mirror

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.kind, format % args)

    def send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_hub_error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
        self.send_json({"error": message}, status=status, headers=extra)

    def send_file_range(self, item: MirrorFile, kind: str, headers: dict[str, str]) -> None:
        """Send the whole file (200), the requested Range (206), or 416 for an unsatisfiable Range."""
        requested = parse_range(self.headers.get("Range"), item.size)
        if requested is None:
            self.send_hub_error(416, "RangeNotSatisfiable", "requested range not satisfiable",
                                {"Content-Range": f"bytes */{item.size}"})
            return

        start, end = requested
        status = 200
        if self.headers.get("Range"):
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{item.size}"
        headers.setdefault("Accept-Ranges", "bytes")
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Content-Length"] = str(end - start)
        self.mirror.adjust_headers(kind, item, headers)

        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            # Without a length the body ends when the connection closes.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.mirror.send_file(self, item, start, end)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the [start, end) byte range that a Range header requests, or None when unsatisfiable."""
    if not header:
        return 0, size
    match = _RANGE_RE.match(header.strip())
    if match is None:
        return 0, size  # a malformed Range is ignored, as HTTP allows
    first, last = match.groups()
    if first == "" and last == "":
        return 0, size
    if first == "":
        length = min(int(last), size)
        return (size - length, size) if length > 0 else None
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        return None
    return start, end


class _HubHandler(_Handler):
    """The hub: model info, tree and paths-info APIs, and `/resolve/` with its redirect."""

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.mirror.record(self, "hub")
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            self._api(parts)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        else:
            self.send_hub_error(404, "NotFound", f"no route for {self.path}")

    def _repo_commit(self, repo_id: str, revision: str) -> tuple[MirrorRepo, str] | None:
        """Find the repo and commit, or send the hub's error and return None."""
        repo = self.mirror.repos.get(repo_id)
        if repo is None:
            self.send_hub_error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.gated and not self.mirror.is_authorized(self):
            message = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
            self.send_hub_error(401, "GatedRepo", message)
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self.send_hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        if self.mirror.intercept(self, "resolve", repo_id, path):
            return
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        item = repo.commits[commit].get(path)
        if item is None:
            self.send_hub_error(404, "EntryNotFound", f"{path} does not exist at {commit}",
                                {"X-Repo-Commit": commit})
            return

        headers = {"X-Repo-Commit": commit, "ETag": f'"{item.git_oid}"'}
        if not item.lfs:
            self.send_file_range(item, "resolve", headers)
            return
        self._redirect_to_cdn(item, headers)

    def _redirect_to_cdn(self, item: MirrorFile, headers: dict[str, str]) -> None:
        host = (self.headers.get("Host") or self.mirror.url_host()).rsplit(":", 1)[0]
        file_name = quote(item.path.rsplit("/", 1)[-1])
        headers.update(
            {
                "X-Linked-Etag": f'"{item.sha256}"',
                "X-Linked-Size": str(item.size),
                "Location": f"http://{host}:{self.mirror.cdn_port}/lfs/{item.sha256}?filename={file_name}",
                "Content-Length": "0",
            }
        )
        self.mirror.adjust_headers("resolve", item, headers)
        self.send_response(302)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _api(self, parts: list[str]) -> None:
        if len(parts) < 4:
            self.send_hub_error(404, "NotFound", f"no route for {self.path}")
            return
        repo_id = f"{parts[2]}/{parts[3]}"
        if self.mirror.intercept(self, "api", repo_id, None):
            return
        rest = parts[4:]
        if not rest:
            self._model_info(repo_id, DEFAULT_BRANCH)
        elif rest[0] == "revision" and len(rest) == 2:
            self._model_info(repo_id, rest[1])
        elif rest[0] == "paths-info" and len(rest) == 2 and self.command == "POST":
            self._paths_info(repo_id, rest[1])
        elif rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo_id, rest[1], "/".join(rest[2:]))
        else:
            self.send_hub_error(404, "NotFound", f"no route for {self.path}")

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        with_blobs = parse_qs(urlsplit(self.path).query).get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for item in repo.commits[commit].values():
            sibling: dict[str, Any] = {"rfilename": item.path}
            if with_blobs:
                sibling.update({"size": item.size, "blobId": item.git_oid})
                if item.lfs:
                    sibling["lfs"] = {"sha256": item.sha256, "size": item.size, "pointerSize": item.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": False,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
        }
        self.send_json(info)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or "{}").get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        entries = [files[p].tree_entry() for p in paths if p in files]
        self.send_json(entries)

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        self.send_json(tree_entries(repo.commits[commit], folder, recursive))


def tree_entries(files: dict[str, MirrorFile], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """List a folder of a commit as the tree API does: files, and folders unless recursive."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        entries.append(files[path].tree_entry())
    for name in sorted(folders):
        entries.append({"type": "directory", "oid": git_blob_id(name.encode()), "size": 0, "path": name})
    return entries


class _CdnHandler(_Handler):
    """The CDN: file bytes by sha256, with Range support."""

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.mirror.record(self, "cdn")
        parts = urlsplit(self.path).path.split("/")
        item = self.mirror.blob(parts[2]) if len(parts) == 3 and parts[1] == "lfs" else None
        if item is None:
            self.send_hub_error(404, "NotFound", f"no blob at {self.path}")
            return
        if self.mirror.intercept(self, "cdn", None, item.path):
            return
        name = item.path.rsplit("/", 1)[-1]
        headers = {
            "ETag": f'"{item.sha256}"',
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
        }
        self.send_file_range(item, "cdn", headers)


def main(argv: list[str] | None = None) -> None:
    """Serve a directory of repos (root/owner/name/...) or given files until interrupted.

    Prints the endpoint on the first line of stdout, for scripts to read.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m registry.mirror", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [default: 127.0.0.1]")
    parser.add_argument("--port", type=int, default=0, help="hub port [default: a free one]")
    parser.add_argument("--cdn-port", type=int, default=0, help="port of the file bytes [default: a free one]")
    parser.add_argument("--directory", type=Path, help="serve every root/owner/name/ folder as a repo")
    parser.add_argument("--hf-cache", type=Path, help="serve the model repos of a Hugging Face cache (HF_HUB_CACHE)")
    parser.add_argument("--repo", help="repo id (owner/name) for the FILE arguments")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="files to serve under --repo")
    args = parser.parse_args(argv)
    if args.files and not args.repo:
        parser.error("FILE arguments need --repo")
    if args.repo and args.repo.count("/") != 1:
        parser.error(f"--repo '{args.repo}' must be owner/name")
    if not (args.files or args.directory or args.hf_cache):
        parser.error("nothing to serve: give FILE arguments with --repo, --directory or --hf-cache")
    for folder in (args.directory, args.hf_cache):
        if folder is not None and not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    for path in args.files:
        if not path.is_file():
            parser.error(f"{path} is not a file")

    try:
        mirror = HubMirror(host=args.host, port=args.port, cdn_port=args.cdn_port)
    except OSError as error:
        parser.exit(1, f"python -m registry.mirror: error: cannot listen on {args.host} "
                       f"(port {args.port} or {args.cdn_port}): {error.strerror or error}\n")
    if args.directory:
        mirror.add_directory(args.directory)
    if args.hf_cache:
        mirror.add_hf_cache(args.hf_cache)
    if args.files:
        mirror.add_repo(args.repo, {path.name: path for path in args.files})
    mirror.start()
    try:
        print(mirror.endpoint, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        mirror.stop()


if __name__ == "__main__":
    main()
