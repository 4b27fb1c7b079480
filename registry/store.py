"""Where pulled files live, qreg's records of them, partial downloads, locks and quarantine.

Pulled files go into the Hugging Face cache layout, so `hf cache` and every tool that
reads that cache find them:

    <HF_HUB_CACHE>/models--<owner>--<name>/blobs/<sha256>
    <HF_HUB_CACHE>/models--<owner>--<name>/snapshots/<commit>/<file> -> ../../blobs/<sha256>
    <HF_HUB_CACHE>/models--<owner>--<name>/refs/<revision>            (contains the commit)

qreg's own state lives under `registry.config.data_dir()`, in one folder per repo:

    records/<repo folder>/<file>.json       sha256, where it came from, size and mtime when verified
    partials/<repo folder>/<file>.part      the bytes received so far, resumed by the next pull
    partials/<repo folder>/<file>.part.json the sha256, size and commit those bytes belong to
    locks/<repo folder>/<file>.lock         held (flock) by the process that pulls, verifies or removes
    quarantine/<repo folder>/<file>.<sha256 prefix>  the last copy that failed verification

A pulled variant counts as verified while its blob keeps the size and modification time
recorded when its sha256 was last checked. `verify_variant` hashes it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl  # NOTE: POSIX only, so the store's locks do not work on Windows.
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from registry.errors import DiskSpaceError, LockedError, NotFoundError, UsageError
from registry.manifest import Manifest, Variant

log = logging.getLogger(__name__)

HASH_CHUNK = 4 * 1024 * 1024
LOCK_POLL_SECONDS = 0.1
DEFAULT_LOCK_TIMEOUT = 120.0

DIGEST_SOURCES = ("manifest", "hub")
STATES = ("verified", "modified", "missing", "partial")


# -- locations ---------------------------------------------------------------


def hf_home() -> Path:
    """Return HF_HOME, else XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (read now, not at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home)))


def hub_cache_dir() -> Path:
    """Return the Hugging Face hub cache, read from the environment now (not at import).

    Order as in huggingface_hub 2.4.0 constants.py: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    then HF_HOME/hub.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    return hf_home() / "hub"


def repo_folder_name(repo_id: str) -> str:
    """Return the cache folder name of a model repo: models--owner--name."""
    return "--".join(["models", *repo_id.split("/")])


def check_file_name(name: str, origin: str) -> str:
    """Reject a file name that could leave its folder (/, \\, .., absolute) before any disk access."""
    unsafe = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    )
    if unsafe:
        raise UsageError(
            f"unsafe file name {name!r} from {origin}: a file name must not contain '/', '\\' or be '..'",
            hint="fix the manifest's 'file' field",
        )
    return name


def check_revision(revision: str) -> str:
    """Reject a revision that would escape refs/ or snapshots/ when used as a path."""
    parts = revision.split("/")
    if not revision or revision.startswith("/") or "\\" in revision or "\0" in revision or ".." in parts or "" in parts:
        raise UsageError(f"invalid revision {revision!r}", hint="pass a branch, tag or 40-hex commit id")
    return revision


@dataclass(frozen=True)
class VariantPaths:
    """Every path qreg uses for one file of one repo."""

    repo: str
    file: str

    @property
    def repo_dir(self) -> Path:
        return hub_cache_dir() / repo_folder_name(self.repo)

    def blob(self, sha256: str) -> Path:
        return self.repo_dir / "blobs" / sha256

    def snapshot(self, commit: str) -> Path:
        return self.repo_dir / "snapshots" / commit / self.file

    def ref(self, revision: str) -> Path:
        return self.repo_dir / "refs" / revision

    def _state(self, kind: str, suffix: str) -> Path:
        from registry.config import data_dir

        return data_dir() / kind / repo_folder_name(self.repo) / f"{self.file}{suffix}"

    @property
    def record(self) -> Path:
        return self._state("records", ".json")

    @property
    def partial(self) -> Path:
        return self._state("partials", ".part")

    @property
    def partial_meta(self) -> Path:
        return self._state("partials", ".part.json")

    @property
    def lock(self) -> Path:
        return self._state("locks", ".lock")

    @property
    def quarantine_dir(self) -> Path:
        return self._state("quarantine", "").parent


def paths_for(manifest: Manifest, variant: Variant) -> VariantPaths:
    check_file_name(variant.file, f"manifest {manifest.path.name}")
    return VariantPaths(manifest.model.repo, variant.file)


def as_variant(manifest: Manifest, variant: Variant | str) -> Variant:
    return manifest.resolve(variant) if isinstance(variant, str) else variant


# -- records -----------------------------------------------------------------


@dataclass
class PullRecord:
    """qreg's record of a pulled file: its digest, the digest's source, and its stat when verified."""

    repo: str
    variant: str
    file: str
    sha256: str
    digest_source: str
    size: int
    mtime_ns: int
    commit: str
    revision: str
    verified_at: float


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: Path) -> dict | None:
    """Read a JSON state file; a missing or unreadable one counts as absent."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable state file %s: %s", path, error)
        return None
    return data if isinstance(data, dict) else None


def load_record(paths: VariantPaths) -> PullRecord | None:
    data = read_json(paths.record)
    if data is None:
        return None
    try:
        return PullRecord(**data)
    except TypeError as error:
        log.warning("ignoring malformed record %s: %s", paths.record, error)
        return None


def record_matches_file(record: PullRecord, paths: VariantPaths) -> bool:
    """Check, without hashing, that the blob still has the size and mtime it had when verified."""
    try:
        stat = paths.snapshot(record.commit).stat()
    except OSError:
        return False
    return stat.st_size == record.size and stat.st_mtime_ns == record.mtime_ns


# -- hashing -----------------------------------------------------------------


def hash_file(path: Path, *, limit: int | None = None, progress: Callable[[int], None] | None = None):
    """Return a sha256 object fed with a file (or its first `limit` bytes), read in 4 MiB chunks."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            size = HASH_CHUNK if remaining is None else min(HASH_CHUNK, remaining)
            chunk = handle.read(size)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Return the sha256 hex digest of a file."""
    return hash_file(path, progress=progress).hexdigest()


# -- locks -------------------------------------------------------------------


@contextlib.contextmanager
def variant_lock(
    paths: VariantPaths,
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the variant's lock, waiting while the holder makes progress on the partial download.

    Raises LockedError when the holder's partial has not grown for `timeout` seconds.
    The kernel drops an flock when its process dies, so a killed pull never leaves a stale lock.
    """
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(paths.lock, "a+")
    try:
        _acquire(handle, paths, timeout, on_wait)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _acquire(handle, paths: VariantPaths, timeout: float, on_wait: Callable[[str], None] | None) -> None:
    last_size = -1
    last_change = time.monotonic()
    announced = False
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass

        holder = _lock_holder(paths)
        if not announced and on_wait is not None:
            on_wait(f"waiting for another qreg process (pid {holder}) that is working on {paths.file}")
            announced = True

        size = paths.partial.stat().st_size if paths.partial.exists() else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change > timeout:
            raise LockedError(
                f"{paths.file} is locked by qreg process {holder} ({paths.lock}), "
                f"which made no progress for {timeout:.0f} s",
                hint="wait for that process to finish, or stop it and run the command again",
            )
        time.sleep(LOCK_POLL_SECONDS)


def _lock_holder(paths: VariantPaths) -> str:
    try:
        return paths.lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


# -- partial downloads -------------------------------------------------------


def resume_offset(paths: VariantPaths, *, sha256: str, size: int, commit: str) -> int:
    """Return how many bytes of this exact file are already in the partial; start a new one otherwise."""
    meta = read_json(paths.partial_meta)
    current = paths.partial.stat().st_size if paths.partial.exists() else 0
    same_file = meta is not None and meta.get("sha256") == sha256 and meta.get("size") == size
    if same_file and current <= size:
        return current

    if current:
        log.info("discarding partial %s (%d bytes): it belongs to another version of the file", paths.partial, current)
    discard_partial(paths)
    write_json_atomic(paths.partial_meta, {"sha256": sha256, "size": size, "commit": commit, "started": time.time()})
    return 0


def discard_partial(paths: VariantPaths) -> None:
    for path in (paths.partial, paths.partial_meta):
        path.unlink(missing_ok=True)


def partial_info(paths: VariantPaths) -> tuple[int, int] | None:
    """Return (bytes received, expected size) of the variant's partial download, or None."""
    if not paths.partial.exists():
        return None
    meta = read_json(paths.partial_meta) or {}
    return paths.partial.stat().st_size, int(meta.get("size") or 0)


def check_free_space(paths: VariantPaths, needed: int, total_size: int) -> None:
    """Raise DiskSpaceError when the partial's file system cannot take the remaining bytes.

    When the hub cache is on another file system, the finished file is copied there, so
    that one must fit the whole file as well.
    """
    partial_dir = paths.partial.parent
    partial_dir.mkdir(parents=True, exist_ok=True)
    _require_space(partial_dir, needed, paths.file)

    cache_dir = paths.repo_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    if os.stat(cache_dir).st_dev != os.stat(partial_dir).st_dev:
        _require_space(cache_dir, total_size, paths.file)


def _require_space(directory: Path, needed: int, file_name: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough free space for {file_name}: it needs {needed} bytes, {directory} has {free} bytes free",
            hint="free some space, or point HF_HUB_CACHE and XDG_DATA_HOME at a larger disk",
        )


def disk_full_error(paths: VariantPaths, error: OSError) -> DiskSpaceError | None:
    """Turn ENOSPC/EDQUOT while writing a partial into DiskSpaceError; None for other errors."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    kept = paths.partial.stat().st_size if paths.partial.exists() else 0
    return DiskSpaceError(
        f"disk full while writing {paths.partial} ({kept} bytes kept): {os.strerror(error.errno)}",
        hint="free some space and run the same command again to resume, or 'qreg rm' the variant",
    )


# -- installing and removing -------------------------------------------------


def install(
    paths: VariantPaths,
    source: Path | None,
    *,
    variant: Variant,
    sha256: str,
    digest_source: str,
    commit: str,
    revision: str,
) -> PullRecord:
    """Move a verified file into the cache as blob + snapshot link + ref, and record it.

    With `source` None the blob is already in place (adopted from the cache).
    """
    blob = paths.blob(sha256)
    blob.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        _move(source, blob)

    link = paths.snapshot(commit)
    link.parent.mkdir(parents=True, exist_ok=True)
    _link(blob, link)
    if revision != commit:
        write_text_atomic(paths.ref(revision), commit)

    stat = blob.stat()
    record = PullRecord(
        repo=paths.repo,
        variant=variant.name,
        file=paths.file,
        sha256=sha256,
        digest_source=digest_source,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        commit=commit,
        revision=revision,
        verified_at=time.time(),
    )
    write_json_atomic(paths.record, asdict(record))
    paths.partial_meta.unlink(missing_ok=True)
    return record


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        # The data dir and the hub cache are on different file systems: copy, then rename.
        temporary = target.with_name(f"{target.name}.{os.getpid()}.incomplete")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        source.unlink()


def _link(blob: Path, link: Path) -> None:
    """Point a snapshot entry at its blob with a relative symlink, as huggingface_hub does."""
    relative = os.path.relpath(blob, link.parent)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(relative, temporary)
    except OSError:
        # NOTE: without symlink support (some Windows setups) the blob is copied, as huggingface_hub does.
        shutil.copyfile(blob, temporary)
    os.replace(temporary, link)


def quarantine(paths: VariantPaths, file_path: Path, actual_sha256: str) -> Path:
    """Move a file that failed verification out of the way, keeping only the latest one per file."""
    folder = paths.quarantine_dir
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{paths.file}.*"):
        old.unlink(missing_ok=True)
    target = folder / f"{paths.file}.{actual_sha256[:12]}"
    _move(file_path, target)
    return target


def purge_blob(paths: VariantPaths, sha256: str) -> list[Path]:
    """Remove a blob and every snapshot link of this file that points to it."""
    removed = []
    blob = paths.blob(sha256)
    for link in _snapshot_links(paths):
        if _points_to(link, blob):
            link.unlink()
            removed.append(link)
            _remove_empty_dir(link.parent)
    if not _blob_still_linked(paths, blob) and blob.exists():
        blob.unlink()
        removed.append(blob)
    return removed


def _snapshot_links(paths: VariantPaths) -> list[Path]:
    snapshots = paths.repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    return [entry / paths.file for entry in snapshots.iterdir() if (entry / paths.file).is_symlink()]


def _points_to(link: Path, blob: Path) -> bool:
    return os.path.realpath(link) == os.path.realpath(blob)


def _blob_still_linked(paths: VariantPaths, blob: Path) -> bool:
    snapshots = paths.repo_dir / "snapshots"
    if not snapshots.is_dir():
        return False
    return any(p.is_symlink() and _points_to(p, blob) for p in snapshots.rglob("*"))


def _remove_empty_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# -- queries used by other commands ------------------------------------------


def pulled_path(manifest: Manifest, variant: Variant | str) -> Path | None:
    """Return the verified file of a variant, or None when it is not pulled or changed since.

    The check is cheap (a stat against the record); a manifest that pins another sha256
    than the recorded one means the file is not the one the manifest wants.
    """
    variant = as_variant(manifest, variant)
    paths = paths_for(manifest, variant)
    record = load_record(paths)
    if record is None or not record_matches_file(record, paths):
        return None
    if variant.sha256 and variant.sha256 != record.sha256:
        return None
    return paths.snapshot(record.commit)


def not_pulled_error(manifest: Manifest, variant: Variant | str) -> NotFoundError:
    """Build the error for a variant that `pulled_path` did not return, saying why and what to run."""
    variant = as_variant(manifest, variant)
    paths = paths_for(manifest, variant)
    record = load_record(paths)
    name = variant.name
    if record is None:
        return NotFoundError(f"variant {name} is not pulled", hint=f"run 'qreg pull {name}'")
    if not paths.snapshot(record.commit).exists():
        return NotFoundError(f"the pulled file of {name} is missing from the cache", hint=f"run 'qreg pull {name}'")
    if not record_matches_file(record, paths):
        return NotFoundError(
            f"the pulled file of {name} changed since it was verified (size or modification time differ)",
            hint=f"run 'qreg verify {name}' to check it, or 'qreg pull {name}' to replace it",
        )
    return NotFoundError(
        f"the pulled file of {name} has sha256 {record.sha256}, but the manifest pins {variant.sha256}",
        hint=f"run 'qreg pull {name}' to fetch the pinned file",
    )


@dataclass(frozen=True)
class StoredVariant:
    """A variant as the store has it: pulled, changed, missing, or partly downloaded."""

    variant: str
    file: str
    state: str
    path: Path | None
    size: int
    sha256: str
    digest_source: str
    commit: str
    revision: str
    partial_bytes: int
    partial_size: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path) if self.path else None
        return data


def list_pulled(manifest: Manifest) -> list[StoredVariant]:
    """List the manifest's variants that are pulled or partly downloaded, in manifest order."""
    items = []
    for variant in manifest.variants:
        item = stored_variant(manifest, variant)
        if item is not None:
            items.append(item)
    return items


def stored_variant(manifest: Manifest, variant: Variant) -> StoredVariant | None:
    paths = paths_for(manifest, variant)
    record = load_record(paths)
    partial = partial_info(paths) or (0, 0)
    if record is None:
        if not partial[0] and not paths.partial.exists():
            return None
        return StoredVariant(variant.name, variant.file, "partial", None, 0, "", "", "", "", *partial)

    link = paths.snapshot(record.commit)
    if record_matches_file(record, paths):
        state = "verified"
    elif link.exists():
        state = "modified"
    else:
        state = "missing"
    return StoredVariant(
        variant.name, variant.file, state, link, record.size, record.sha256, record.digest_source,
        record.commit, record.revision, *partial,
    )


# -- verify and remove -------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one pulled variant."""

    variant: str
    path: Path
    expected: str
    actual: str
    quarantined: Path | None

    @property
    def ok(self) -> bool:
        return self.expected == self.actual

    def to_dict(self) -> dict:
        return {
            "variant": self.variant,
            "path": str(self.path),
            "ok": self.ok,
            "expected_sha256": self.expected,
            "actual_sha256": self.actual,
            "quarantined": str(self.quarantined) if self.quarantined else None,
        }


def verify_variant(
    manifest: Manifest,
    variant: Variant | str,
    *,
    progress: Callable[[int], None] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> VerifyResult:
    """Hash a pulled variant again; on a mismatch quarantine the blob and forget the record.

    Raises NotFoundError when the variant is not pulled or its file is gone.
    """
    variant = as_variant(manifest, variant)
    paths = paths_for(manifest, variant)
    with variant_lock(paths, timeout=lock_timeout):
        record = load_record(paths)
        if record is None:
            raise NotFoundError(f"{variant.name} is not pulled", hint=f"run 'qreg pull {variant.name}'")
        link = paths.snapshot(record.commit)
        if not link.exists():
            raise NotFoundError(
                f"{variant.name} was pulled, but {link} is gone",
                hint=f"run 'qreg pull {variant.name}' again",
            )

        actual = sha256_file(link, progress)
        if actual == record.sha256:
            stat = link.stat()
            record.size, record.mtime_ns, record.verified_at = stat.st_size, stat.st_mtime_ns, time.time()
            write_json_atomic(paths.record, asdict(record))
            return VerifyResult(variant.name, link, record.sha256, actual, None)

        moved = quarantine(paths, paths.blob(record.sha256), actual)
        purge_blob(paths, record.sha256)
        paths.record.unlink(missing_ok=True)
        log.warning("%s: sha256 %s != recorded %s; moved to %s", variant.name, actual, record.sha256, moved)
        return VerifyResult(variant.name, link, record.sha256, actual, moved)


def remove_variant(manifest: Manifest, variant: Variant | str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[Path]:
    """Remove a variant's blob, its snapshot links, its record and its partial download.

    Other variants, refs and quarantined copies stay. Raises NotFoundError when there is
    nothing to remove.
    """
    variant = as_variant(manifest, variant)
    paths = paths_for(manifest, variant)
    with variant_lock(paths, timeout=lock_timeout):
        removed: list[Path] = []
        record = load_record(paths)
        if record is not None:
            removed += purge_blob(paths, record.sha256)
            paths.record.unlink(missing_ok=True)
            removed.append(paths.record)
        for path in (paths.partial, paths.partial_meta):
            if path.exists():
                path.unlink()
                removed.append(path)

    if not removed:
        raise NotFoundError(f"{variant.name} is not pulled", hint="run 'qreg ls' to see the pulled variants")
    return removed
