"""Everything that talks to the Hugging Face hub: settings, metadata, the byte transfer, `pull`.

huggingface_hub builds the URLs, sends the metadata requests (HEAD on `/resolve/`,
model info, paths-info) and raises its typed errors, which are turned into qreg's.
The bytes go through registry.transfer instead of `hf_hub_download` (huggingface_hub
2.4.0), which writes to a partial file named uniquely per run and deletes it on
failure, so a pull could not resume across runs, and does not check the sha256 of
what it wrote. The transfer appends to a stable partial file under qreg's data dir,
resumes with a Range request, and hashes every byte as it arrives. docs/pull.md
describes the whole design.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN once, at import. qreg
reads them on every call instead and passes them explicitly.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from registry import store
from registry.errors import (
    AuthError,
    DigestMismatchError,
    HubError,
    NotFoundError,
    OfflineError,
    QregError,
    UsageError,
)
from registry.manifest import Manifest, Variant
from registry.transfer import MAX_BACKOFF, Download, TransientError, caused_by_name_resolution, origin, short_error

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

T = TypeVar("T")


# -- settings, read at call time ---------------------------------------------


def hub_endpoint() -> str:
    """Return HF_ENDPOINT without a trailing slash, or the public hub; UsageError if it is no http(s) URL."""
    from urllib.parse import urlsplit

    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"invalid HF_ENDPOINT '{endpoint}': it must be an http:// or https:// URL",
                         hint=f"set it to the hub's address, e.g. {DEFAULT_ENDPOINT}, or unset it")
    return endpoint


def is_offline() -> bool:
    """Return whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE_VALUES


def hub_token() -> str | None:
    """Return HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the token file under HF_HOME, else None."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token and token.strip():
        return token.strip()
    token_path = os.environ.get("HF_TOKEN_PATH") or os.path.join(store.hf_home(), "token")
    try:
        token = Path(os.path.expanduser(token_path)).read_text().strip()
    except OSError:
        return None
    return token or None


def _timeout(variable: str) -> float:
    try:
        return float(os.environ.get(variable) or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT


def file_url(repo: str, file: str, revision: str) -> str:
    """Return the hub's `/resolve/` URL of a file at a revision (huggingface_hub's hf_hub_url)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, file, revision=revision, endpoint=hub_endpoint())


# -- errors ------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Return the transport error classes of httpx and of httpx2 (huggingface_hub 2.x's client)."""
    import httpx

    classes: list[type[BaseException]] = [TransientError, httpx.TransportError]
    try:
        import httpx2
    except ImportError:  # huggingface_hub 1.x uses httpx itself
        pass
    else:
        classes.append(httpx2.TransportError)
    return tuple(classes)


def _is_transient(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, _transport_errors()):
        # A host name that does not resolve stays unresolved for the seconds the
        # retries would wait, so fail at once (no network, or a mistyped HF_ENDPOINT).
        return not caused_by_name_resolution(error)
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code == 429 or error.response.status_code >= 500
    return False


def _hub_error(error: Exception, *, repo: str, file: str | None, revision: str) -> QregError:
    """Turn a huggingface_hub or transport error into qreg's error with the repo and file named."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hub_endpoint()
    what = f"{file} in {repo}" if file else repo
    status = getattr(getattr(error, "response", None), "status_code", None)
    token_hint = f"set HF_TOKEN to a token that can read {repo} (e.g. export HF_TOKEN=hf_...)"

    if isinstance(error, OfflineModeIsEnabled):
        return OfflineError(f"offline mode is on, so {what} cannot be fetched", hint="unset HF_HUB_OFFLINE")
    if isinstance(error, GatedRepoError) or status in (401, 403):
        return AuthError(f"{endpoint} rejected the request for {what} as unauthorized (HTTP {status})", hint=token_hint)
    if isinstance(error, RepositoryNotFoundError):
        return NotFoundError(f"repo {repo} not found on {endpoint} (HTTP {status})",
                             hint=f"check the manifest's repo; if {repo} is private, {token_hint}")
    if isinstance(error, RevisionNotFoundError):
        return NotFoundError(f"revision {revision} not found in {repo} on {endpoint}",
                             hint="pass an existing branch, tag or commit with --revision")
    if isinstance(error, RemoteEntryNotFoundError):
        return NotFoundError(f"{file} not found in {repo} at revision {revision} on {endpoint}",
                             hint="run 'qreg manifest refresh' to check the manifest against the hub")
    if isinstance(error, HfHubHTTPError) and status == 404:
        return NotFoundError(f"{endpoint} returned HTTP 404 for {what}",
                             hint="check that HF_ENDPOINT points at the Hugging Face hub or a mirror of it")
    if isinstance(error, HfHubHTTPError):
        return HubError(f"{endpoint} returned HTTP {status} for {what}", hint="try again later")
    return HubError(f"request to {endpoint} for {what} failed: {type(error).__name__}: {error}",
                    hint="check the network and HF_ENDPOINT, then run the same command again")


class _Notes:
    """The destination of pull's and refresh's notes: the command's Output, else only the log."""

    def __init__(self, output: Any | None):
        self.output = output

    # With an Output the user already sees the note on stderr, so the log keeps it at
    # debug level instead of printing it a second time.
    def info(self, message: str) -> None:
        if self.output is None:
            log.info("%s", message)
        else:
            log.debug("%s", message)
            self.output.info(message)

    def warn(self, message: str) -> None:
        if self.output is None:
            log.warning("%s", message)
        else:
            log.debug("%s", message)
            self.output.warn(message)

    @property
    def progress_enabled(self) -> bool:
        return self.output is not None and self.output.progress_enabled


def with_retries(call: Callable[[], T], *, what: str, notes: _Notes, retries: int, backoff: float) -> T:
    """Run a hub request again after a transient failure, up to `retries` times with growing waits."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if not _is_transient(error) or attempt == retries:
                raise
            wait = min(backoff * 2**attempt, MAX_BACKOFF)
            notes.warn(f"{what} failed ({short_error(error)}); retrying in {wait:.1f} s (retry {attempt + 1} of {retries})")
            time.sleep(wait)
    raise AssertionError("unreachable")


# -- metadata ----------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """A file's metadata from the hub's `/resolve/` HEAD (and paths-info when that lacks a sha256)."""

    repo: str
    file: str
    revision: str
    commit: str
    sha256: str | None
    size: int | None
    location: str


def fetch_file_metadata(
    repo: str, file: str, revision: str, *, notes: _Notes | None = None,
    retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
) -> RemoteFile:
    """HEAD the file's `/resolve/` URL: commit, LFS sha256 (X-Linked-Etag), size, download location.

    A 40-hex ETag is a git blob id, not a sha256, so then the sha256 comes from paths-info.
    """
    from huggingface_hub import get_hf_file_metadata

    notes = notes or _Notes(None)
    url = file_url(repo, file, revision)
    token = hub_token()

    def head() -> Any:
        return get_hf_file_metadata(url, token=token or False, timeout=_timeout("HF_HUB_ETAG_TIMEOUT"),
                                    endpoint=hub_endpoint())

    try:
        metadata = with_retries(head, what=f"HEAD {url}", notes=notes, retries=retries, backoff=backoff)
    except Exception as error:
        raise _hub_error(error, repo=repo, file=file, revision=revision) from None

    commit = _checked_commit(metadata.commit_hash, url)
    sha256 = metadata.etag if metadata.etag and _SHA256_RE.match(metadata.etag) else None
    size = metadata.size
    if sha256 is None or size is None:
        listed = fetch_paths_info(repo, [file], commit, notes=notes, retries=retries, backoff=backoff)
        listed_size, listed_sha256 = listed.get(file, (None, None))
        sha256 = sha256 or listed_sha256
        size = size if size is not None else listed_size
    return RemoteFile(repo, file, revision, commit, sha256, size, metadata.location)


def _checked_commit(commit: str | None, source: str) -> str:
    # The commit becomes a folder name under snapshots/, so only a plain commit id is accepted.
    if not commit or not _COMMIT_RE.match(commit):
        raise HubError(
            f"{source} returned an invalid commit id {commit!r} (X-Repo-Commit)",
            hint="check that HF_ENDPOINT points to a Hugging Face hub or mirror",
        )
    return commit


def fetch_paths_info(
    repo: str, files: list[str], revision: str, *, notes: _Notes | None = None,
    retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
) -> dict[str, tuple[int, str | None]]:
    """Ask the paths-info API for files' sizes and LFS sha256 (None for a file not in LFS).

    Entries for paths that were not requested are ignored, so a name made up by the
    server never reaches the disk.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=hub_endpoint(), token=hub_token() or False)
    try:
        entries = with_retries(lambda: api.get_paths_info(repo, files, revision=revision),
                               what=f"paths-info for {repo}", notes=notes or _Notes(None),
                               retries=retries, backoff=backoff)
    except Exception as error:
        raise _hub_error(error, repo=repo, file=None, revision=revision) from None

    wanted = set(files)
    found: dict[str, tuple[int, str | None]] = {}
    for entry in entries:
        if not isinstance(entry, RepoFile) or entry.path not in wanted:
            log.warning("ignoring paths-info entry %r that was not requested", getattr(entry, "path", entry))
            continue
        sha256 = entry.lfs.sha256 if entry.lfs is not None else None
        found[entry.path] = (int(entry.size), sha256 if sha256 and _SHA256_RE.match(sha256) else None)
    return found


@dataclass(frozen=True)
class RepoPins:
    """The exact state of a repo at one commit: each requested file's size and sha256."""

    repo: str
    revision: str
    commit: str
    files: dict[str, tuple[int, str | None]]


def fetch_repo_pins(
    repo: str, files: list[str], revision: str = DEFAULT_REVISION, *, output: Any | None = None,
    retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
) -> RepoPins:
    """Resolve a revision to its commit (model info) and fetch the files' sizes and sha256 there."""
    from huggingface_hub import HfApi

    if is_offline():
        raise OfflineError(f"offline mode is on (HF_HUB_OFFLINE), so {repo} cannot be asked for digests",
                           hint="unset HF_HUB_OFFLINE to refresh the manifest")
    notes = _Notes(output)
    api = HfApi(endpoint=hub_endpoint(), token=hub_token() or False)
    try:
        info = with_retries(lambda: api.model_info(repo, revision=revision, timeout=_timeout("HF_HUB_ETAG_TIMEOUT")),
                            what=f"model info for {repo}", notes=notes, retries=retries, backoff=backoff)
    except Exception as error:
        raise _hub_error(error, repo=repo, file=None, revision=revision) from None

    commit = _checked_commit(info.sha, f"{hub_endpoint()}/api/models/{repo}")
    found = fetch_paths_info(repo, files, commit, notes=notes, retries=retries, backoff=backoff)
    return RepoPins(repo=repo, revision=revision, commit=commit, files=found)


# -- pull --------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    """The outcome of `pull`: the verified file and where its expected digest came from."""

    variant: str
    file: str
    path: Path
    sha256: str
    digest_source: str
    size: int
    already_present: bool
    commit: str
    revision: str
    resumed_from: int = 0
    retries: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class Expected:
    """The sha256 and size a download must have, and which source they came from."""

    sha256: str
    size: int
    source: str
    note: str = ""


def pull(
    manifest: Manifest,
    variant: Variant | str,
    *,
    revision: str | None = None,
    output: Any | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    lock_timeout: float = store.DEFAULT_LOCK_TIMEOUT,
) -> PullResult:
    """Download a variant's file into the hub cache, verified against its sha256.

    `revision` overrides the manifest's pinned revision. `output` (a registry.cli.output
    Output) receives notes, retry warnings and the progress bar; without it pull is
    silent. Returns at once when the variant is already pulled and unchanged.

    Raises HubError, AuthError, NotFoundError, OfflineError, DigestMismatchError,
    DiskSpaceError or LockedError. A KeyboardInterrupt leaves the partial download in
    place for the next pull to resume.
    """
    variant = store.as_variant(manifest, variant)
    paths = store.paths_for(manifest, variant)
    revision = revision or None  # an empty --revision means none was given
    requested = store.check_revision(revision or manifest.model.revision or DEFAULT_REVISION)
    notes = _Notes(output)

    with store.variant_lock(paths, timeout=lock_timeout, on_wait=notes.info):
        present = _present(manifest, variant, paths, requested, revision)
        if present is not None:
            return present
        if is_offline():
            return _pull_offline(manifest, variant, paths, requested)

        remote = fetch_file_metadata(manifest.model.repo, variant.file, requested,
                                     notes=notes, retries=retries, backoff=backoff)
        expected = choose_digest(manifest, variant, revision, remote)
        if expected.note:
            notes.info(expected.note)

        adopted = _adopt_cached_blob(variant, paths, expected, remote, notes)
        if adopted is not None:
            return adopted
        return _download(variant, paths, expected, remote, notes, retries, backoff)


def _pin_applies(manifest: Manifest, variant: Variant, revision_option: str | None, commit: str | None) -> bool:
    """Return whether the manifest's sha256 applies: no --revision, or one that is the manifest's revision."""
    if not variant.sha256:
        return False
    if revision_option is None:
        return True
    pinned = manifest.model.revision
    return bool(pinned) and (revision_option == pinned or commit == pinned)


def _present(
    manifest: Manifest, variant: Variant, paths: store.VariantPaths, requested: str, revision_option: str | None
) -> PullResult | None:
    """Return the recorded file when it is unchanged and matches the revision and pin asked for."""
    record = store.load_record(paths)
    if record is None or not store.record_matches_file(record, paths):
        return None
    if requested not in (record.revision, record.commit):
        return None
    if _pin_applies(manifest, variant, revision_option, record.commit) and variant.sha256 != record.sha256:
        return None
    return _result(variant, paths, record, already_present=True)


def _result(variant: Variant, paths: store.VariantPaths, record: store.PullRecord, *,
            already_present: bool, resumed_from: int = 0, retries: int = 0, note: str = "") -> PullResult:
    return PullResult(
        variant=variant.name, file=variant.file, path=paths.snapshot(record.commit), sha256=record.sha256,
        digest_source=record.digest_source, size=record.size, already_present=already_present,
        commit=record.commit, revision=record.revision, resumed_from=resumed_from, retries=retries, note=note,
    )


def choose_digest(manifest: Manifest, variant: Variant, revision_option: str | None, remote: RemoteFile) -> Expected:
    """Pick the expected sha256 and size: the manifest's pin when it applies, else the hub's LFS digest."""
    if _pin_applies(manifest, variant, revision_option, remote.commit):
        if remote.sha256 and remote.sha256 != variant.sha256:
            raise DigestMismatchError(
                f"the hub reports sha256 {remote.sha256} for {variant.file} at commit {remote.commit}, "
                f"but the manifest pins {variant.sha256}",
                hint="the manifest is out of date for this revision: run 'qreg manifest refresh'",
            )
        size = variant.size_bytes or remote.size
        if variant.size_bytes and remote.size is not None and remote.size != variant.size_bytes:
            raise DigestMismatchError(
                f"the hub reports {remote.size} bytes for {variant.file}, but the manifest pins {variant.size_bytes}",
                hint="run 'qreg manifest refresh'",
            )
        if size is None:
            raise HubError(f"{hub_endpoint()} reports no size for {variant.file}", hint="pin size_bytes in the manifest")
        return Expected(variant.sha256, size, "manifest")

    if remote.sha256 is None or remote.size is None:
        raise HubError(
            f"cannot verify {variant.file}: the manifest pins no sha256 and {hub_endpoint()} "
            f"reports no LFS sha256 or size for it at commit {remote.commit}",
            hint="pin the file's sha256 and size_bytes in the manifest",
        )
    if variant.sha256:
        note = (f"--revision {revision_option} is not the manifest's revision "
                f"{manifest.model.revision or '(none)'}, so the sha256 is taken from the hub, not the manifest")
    else:
        note = (f"the manifest pins no sha256 for {variant.name}, so the sha256 is taken from the hub; "
                "run 'qreg manifest refresh' to pin it")
    return Expected(remote.sha256, remote.size, "hub", note)


def _adopt_cached_blob(variant: Variant, paths: store.VariantPaths, expected: Expected,
                       remote: RemoteFile, notes: _Notes) -> PullResult | None:
    """Use a blob already in the hub cache (from hf or an earlier pull) after hashing it."""
    blob = paths.blob(expected.sha256)
    if not blob.is_file():
        return None
    actual = store.sha256_file(blob)
    if actual != expected.sha256:
        moved = store.quarantine(paths, blob, actual)
        store.purge_blob(paths, expected.sha256)
        notes.warn(f"the cached blob of {variant.file} has sha256 {actual}, not {expected.sha256}; "
                   f"moved it to {moved} and downloading again")
        return None
    record = store.install(paths, None, variant=variant, sha256=expected.sha256, digest_source=expected.source,
                           commit=remote.commit, revision=remote.revision)
    notes.info(f"{variant.file} was already in the hub cache; verified its sha256")
    return _result(variant, paths, record, already_present=True, note=expected.note)


def _download(variant: Variant, paths: store.VariantPaths, expected: Expected, remote: RemoteFile,
              notes: _Notes, retries: int, backoff: float) -> PullResult:
    offset = store.resume_offset(paths, sha256=expected.sha256, size=expected.size, commit=remote.commit)
    transfer = Download(url=remote.location, paths=paths, size=expected.size,
                        headers=_download_headers(remote.location), notes=notes, retries=retries,
                        backoff=backoff, timeout=_timeout("HF_HUB_DOWNLOAD_TIMEOUT"))
    try:
        store.check_free_space(paths, expected.size - offset, expected.size)
        paths.partial.touch()
        actual = transfer.run(offset)
    except BaseException:
        # Keep received bytes for the next run to resume; an empty partial is of no use.
        if not paths.partial.exists() or paths.partial.stat().st_size == 0:
            store.discard_partial(paths)
        raise

    if actual != expected.sha256:
        moved = store.quarantine(paths, paths.partial, actual)
        store.discard_partial(paths)
        raise DigestMismatchError(
            f"sha256 mismatch for {variant.file}: expected {expected.sha256} (from the {expected.source}), "
            f"got {actual}; the file was moved to {moved} and not installed",
            hint=f"run 'qreg pull {variant.name}' again; if it fails the same way, the hub's file differs",
        )

    record = store.install(paths, paths.partial, variant=variant, sha256=actual, digest_source=expected.source,
                           commit=remote.commit, revision=remote.revision)
    return _result(variant, paths, record, already_present=False, resumed_from=offset,
                   retries=transfer.retried, note=expected.note)


def _download_headers(location: str) -> dict[str, str]:
    """Send the token only to the hub's own origin, never to a CDN it redirects to."""
    from registry import __version__

    headers = {"User-Agent": f"qreg/{__version__}"}
    token = hub_token()
    if token and origin(location) == origin(hub_endpoint()):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _pull_offline(manifest: Manifest, variant: Variant, paths: store.VariantPaths, requested: str) -> PullResult:
    """Use what the cache has without any network call, or raise OfflineError."""
    record = store.load_record(paths)
    if record is not None and store.record_matches_file(record, paths) and (
        not variant.sha256 or variant.sha256 == record.sha256
    ) and requested in (record.revision, record.commit):
        return _result(variant, paths, record, already_present=True)

    commit = requested if _COMMIT_RE.match(requested) else _read_ref(paths, requested)
    cached = paths.snapshot(commit) if commit else None
    if cached is not None and cached.is_file():
        blob_name = Path(os.path.realpath(cached)).name
        expected = variant.sha256 or (blob_name if _SHA256_RE.match(blob_name) else "")
        if expected and store.sha256_file(cached) == expected:
            source = "manifest" if variant.sha256 else "hub"
            record = store.install(paths, None, variant=variant, sha256=expected, digest_source=source,
                                   commit=commit, revision=requested)
            return _result(variant, paths, record, already_present=True)

    raise OfflineError(
        f"offline mode is on (HF_HUB_OFFLINE) and {variant.file} at revision {requested} "
        f"is not in the cache {store.hub_cache_dir()}",
        hint=f"unset HF_HUB_OFFLINE and run 'qreg pull {variant.name}'",
    )


def _read_ref(paths: store.VariantPaths, revision: str) -> str | None:
    try:
        commit = paths.ref(revision).read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT_RE.match(commit) else None
