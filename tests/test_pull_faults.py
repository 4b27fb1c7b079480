"""Faults during `qreg pull`: dropped connections, corrupt bytes, servers that ignore Range,
kill -9, Ctrl-C, concurrent pulls, full disks. Each ends in a verified file or a one-line
error, never in a corrupt installed file."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from registry import hub, store
from registry.errors import DigestMismatchError, DiskSpaceError, HubError, LockedError
from registry.manifest import load_manifest

FAST = {"backoff": 0.05}


def paths_of(repo, variant: str) -> store.VariantPaths:
    manifest = load_manifest(repo.manifest_path)
    return store.paths_for(manifest, manifest.resolve(variant))


def wait_for_partial(paths: store.VariantPaths, at_least: int, process: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = paths.partial.stat().st_size if paths.partial.exists() else 0
        if size >= at_least:
            return size
        if process.poll() is not None:
            raise AssertionError(f"qreg exited early: {process.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"partial never reached {at_least} bytes")


def assert_nothing_installed(paths: store.VariantPaths) -> None:
    assert not paths.record.exists()
    assert not paths.partial.exists()
    assert not (paths.repo_dir / "blobs").exists() or not any((paths.repo_dir / "blobs").iterdir())


def test_dropped_connection_resumes(random_repo, hf_mirror):
    file = random_repo.file_name("Q8_0")
    hf_mirror.drop_after(file, 1024 * 1024)
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q8_0", **FAST)
    assert result.sha256 == random_repo.sha256["Q8_0"]
    assert result.retries == 1
    gets = hf_mirror.cdn_gets(file)
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range is not None
    assert int(gets[1].range.split("=")[1].rstrip("-")) > 0


def test_dropped_connection_retry_is_reported(random_repo, hf_mirror, capsys):
    from registry.cli.output import Output

    hf_mirror.drop_after(random_repo.file_name("Q2_K"), 300_000)
    hub.pull(load_manifest(random_repo.manifest_path), "Q2_K", output=Output(), **FAST)
    err = capsys.readouterr().err
    assert "retry 1 of 5" in err
    assert "interrupted at byte" in err


def test_drop_without_content_length(random_repo, hf_mirror):
    file = random_repo.file_name("Q8_0")
    hf_mirror.no_content_length(file)
    hf_mirror.drop_after(file, 700_000)
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q8_0", **FAST)
    assert result.sha256 == random_repo.sha256["Q8_0"]
    assert result.retries == 1


def test_no_content_length_completes(random_repo, hf_mirror):
    hf_mirror.no_content_length(random_repo.file_name("Q4_K_M"))
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q4_K_M", **FAST)
    assert result.sha256 == random_repo.sha256["Q4_K_M"]
    assert result.retries == 0


def test_range_ignored_not_appended(random_repo, hf_mirror):
    file = random_repo.file_name("Q8_0")
    hf_mirror.drop_after(file, 1024 * 1024)
    hf_mirror.ignore_range(file)
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q8_0", **FAST)
    assert result.sha256 == random_repo.sha256["Q8_0"]
    assert result.path.stat().st_size == random_repo.files["Q8_0"].stat().st_size


def test_transient_503_retried(random_repo, hf_mirror):
    file = random_repo.file_name("Q2_K")
    hf_mirror.fail(file, 503, times=2)
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K", **FAST)
    assert result.retries == 2
    assert result.sha256 == random_repo.sha256["Q2_K"]


def test_retries_bounded(random_repo, hf_mirror):
    file = random_repo.file_name("Q2_K")
    hf_mirror.fail(file, 503, times=None)
    with pytest.raises(HubError) as caught:
        hub.pull(load_manifest(random_repo.manifest_path), "Q2_K", retries=2, **FAST)
    assert "failed 3 times in a row" in caught.value.one_line()
    assert len(hf_mirror.cdn_gets(file)) == 3
    assert_nothing_installed(paths_of(random_repo, "Q2_K"))


@pytest.mark.parametrize("repo_fixture", ["random_repo", "unpinned_repo"])
def test_corrupt_bytes_rejected(hf_mirror, request, repo_fixture):
    repo = request.getfixturevalue(repo_fixture)
    file = repo.file_name("Q4_K_M")
    hf_mirror.corrupt(file, offset=123_457)
    with pytest.raises(DigestMismatchError) as caught:
        hub.pull(load_manifest(repo.manifest_path), "Q4_K_M", **FAST)
    message = caught.value.one_line()
    assert repo.sha256["Q4_K_M"] in message
    assert "got " in message
    paths = paths_of(repo, "Q4_K_M")
    assert_nothing_installed(paths)
    quarantined = list(paths.quarantine_dir.glob(f"{file}.*"))
    assert len(quarantined) == 1
    assert str(quarantined[0]) in message
    assert store.pulled_path(load_manifest(repo.manifest_path), "Q4_K_M") is None


def test_corrupt_bytes_cli_exit_code(random_repo, hf_mirror, qreg_exe):
    hf_mirror.corrupt(random_repo.file_name("Q2_K"), offset=10)
    result = subprocess.run([qreg_exe, "pull", "Q2_K", "--manifest", str(random_repo.manifest_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == DigestMismatchError.exit_code
    assert random_repo.sha256["Q2_K"] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_hf_corrupt_blob_purged(random_repo, hf_mirror):
    from huggingface_hub import hf_hub_download

    file = random_repo.file_name("Q2_K")
    hf_mirror.corrupt(file, offset=5, times=1)
    corrupt = hf_hub_download(random_repo.repo, file, cache_dir=store.hub_cache_dir(), endpoint=hf_mirror.endpoint)
    assert store.sha256_file(Path(corrupt)) != random_repo.sha256["Q2_K"]  # huggingface_hub accepted it

    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K", **FAST)
    assert result.already_present is False
    assert store.sha256_file(result.path) == random_repo.sha256["Q2_K"]
    assert store.sha256_file(Path(corrupt)) == random_repo.sha256["Q2_K"]


def test_kill_9_then_resume(random_repo, hf_mirror, qreg_exe):
    file = random_repo.file_name("Q8_0")
    size = random_repo.files["Q8_0"].stat().st_size
    hf_mirror.trickle(file, bytes_per_second=1024 * 1024)
    paths = paths_of(random_repo, "Q8_0")
    command = [qreg_exe, "pull", "Q8_0", "--manifest", str(random_repo.manifest_path)]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_partial(paths, int(size * 0.4), process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    kept = paths.partial.stat().st_size
    assert 0 < kept < size

    hf_mirror.faults.clear()
    result = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    last = hf_mirror.cdn_gets(file)[-1]
    resumed_at = int(last.range.split("=")[1].rstrip("-"))
    assert resumed_at >= kept * 0.5
    assert resumed_at > 0
    manifest = load_manifest(random_repo.manifest_path)
    assert store.sha256_file(store.pulled_path(manifest, "Q8_0")) == random_repo.sha256["Q8_0"]
    assert not paths.partial.exists()


@pytest.mark.parametrize(
    ("signum", "exit_code", "said"),
    [(signal.SIGINT, 130, "interrupted while pulling Q8_0"), (signal.SIGTERM, 143, "stopped by a signal while pulling Q8_0")],
)
def test_signal_says_resume(random_repo, hf_mirror, qreg_exe, signum, exit_code, said):
    file = random_repo.file_name("Q8_0")
    hf_mirror.trickle(file, bytes_per_second=1024 * 1024)
    paths = paths_of(random_repo, "Q8_0")
    command = [qreg_exe, "pull", "Q8_0", "--manifest", str(random_repo.manifest_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_partial(paths, 256 * 1024, process)
        process.send_signal(signum)
        _out, err = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode == exit_code
    assert said in err
    assert "run 'qreg pull Q8_0' again to resume" in err
    assert paths.partial.stat().st_size > 0

    hf_mirror.faults.clear()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert hf_mirror.cdn_gets(file)[-1].range is not None


def test_two_concurrent_pulls(random_repo, hf_mirror, qreg_exe):
    file = random_repo.file_name("Q4_K_M")
    hf_mirror.trickle(file, bytes_per_second=2 * 1024 * 1024)
    command = [qreg_exe, "pull", "Q4_K_M", "--manifest", str(random_repo.manifest_path), "--json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=120) for p in (first, second)]
    assert first.returncode == 0, results[0][1]
    assert second.returncode == 0, results[1][1]
    assert len(hf_mirror.cdn_gets(file)) == 1
    blobs = list((paths_of(random_repo, "Q4_K_M").repo_dir / "blobs").iterdir())
    assert [b.name for b in blobs] == [random_repo.sha256["Q4_K_M"]]


def test_lock_held_without_progress(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    paths = paths_of(random_repo, "Q2_K")
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.variant_lock(paths):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    try:
        with pytest.raises(LockedError) as caught:
            hub.pull(manifest, "Q2_K", lock_timeout=0.3)
    finally:
        release.set()
        holder.join()
    assert str(paths.lock) in caught.value.one_line()
    assert hf_mirror.requests == []


@contextlib.contextmanager
def tmpfs(folder: Path, size: int):
    """Mount a tmpfs of `size` bytes, or yield None when this sandbox does not allow mounting."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_too_small_checked_first(random_repo, hf_mirror, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "small", 1024 * 1024) as small:
        if small is None:
            pytest.skip("mount -t tmpfs is not permitted here; the ENOSPC test below injects the error")
        monkeypatch.setenv("XDG_DATA_HOME", str(small / "data"))
        monkeypatch.setenv("HF_HUB_CACHE", str(small / "hub"))
        with pytest.raises(DiskSpaceError) as caught:
            hub.pull(load_manifest(random_repo.manifest_path), "Q8_0", **FAST)
        message = caught.value.one_line()
        assert str(random_repo.files["Q8_0"].stat().st_size) in message
        assert "bytes free" in message
        assert hf_mirror.cdn_gets(random_repo.file_name("Q8_0")) == []
        assert not paths_of(random_repo, "Q8_0").partial_meta.exists()


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    return filler


def test_disk_full_while_writing(random_repo, hf_mirror, tmp_path, monkeypatch):
    file = random_repo.file_name("Q8_0")
    size = random_repo.files["Q8_0"].stat().st_size
    hf_mirror.trickle(file, bytes_per_second=2 * 1024 * 1024, times=1)
    manifest = load_manifest(random_repo.manifest_path)
    with tmpfs(tmp_path / "small", 6 * 1024 * 1024) as small:
        if small is not None:
            monkeypatch.setenv("XDG_DATA_HOME", str(small / "data"))
            monkeypatch.setenv("HF_HUB_CACHE", str(small / "hub"))
        paths = paths_of(random_repo, "Q8_0")
        errors: list[BaseException] = []

        def run() -> None:
            try:
                hub.pull(manifest, "Q8_0", **FAST)
            except BaseException as error:
                errors.append(error)

        if small is None:
            # NOTE: injected ENOSPC, because this sandbox does not allow mounting a small tmpfs.
            real_writev = os.writev

            def full_writev(fd, buffers):
                if os.fstat(fd).st_size > 512 * 1024:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_writev(fd, buffers)

            monkeypatch.setattr(os, "writev", full_writev)
        puller = threading.Thread(target=run)
        puller.start()
        deadline = time.monotonic() + 30
        while not (paths.partial.exists() and paths.partial.stat().st_size > 256 * 1024):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        filler = _fill(small / "data") if small is not None else None
        puller.join(60)

        assert len(errors) == 1
        assert isinstance(errors[0], DiskSpaceError)
        assert "disk full" in errors[0].one_line()
        assert "resume" in errors[0].one_line()
        kept = paths.partial.stat().st_size
        assert 0 < kept < size
        assert not paths.record.exists()

        if filler is not None:
            filler.unlink()
        else:
            monkeypatch.undo()
            monkeypatch.setenv("HF_ENDPOINT", hf_mirror.endpoint)
        result = hub.pull(manifest, "Q8_0", **FAST)
        assert result.resumed_from > 0
        assert store.sha256_file(result.path) == random_repo.sha256["Q8_0"]


def run_on_terminal(command: list[str]) -> tuple[int, str]:
    """Run a command with stderr on a pseudo-terminal; return its exit code and what it wrote there."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, terminal_fd = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal_fd)
    os.close(terminal_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.communicate(timeout=120)
    os.close(main_fd)
    return process.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("flag", [None, "--quiet", "--json"])
def test_progress_bar_only_on_terminal(random_repo, hf_mirror, qreg_exe, flag):
    hf_mirror.trickle(random_repo.file_name("Q4_K_M"), bytes_per_second=4 * 1024 * 1024)
    command = [qreg_exe, "pull", "Q4_K_M", "--manifest", str(random_repo.manifest_path)]
    code, terminal = run_on_terminal(command + ([flag] if flag else []))
    assert code == 0, terminal
    if flag is None:
        assert "B/s" in terminal
        assert random_repo.file_name("Q4_K_M") in terminal
    else:
        assert "B/s" not in terminal


def test_no_progress_bar_when_piped(random_repo, hf_mirror, qreg_exe):
    result = subprocess.run([qreg_exe, "pull", "Q2_K", "--manifest", str(random_repo.manifest_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "B/s" not in result.stderr


def test_retry_warning_printed_once(random_repo, hf_mirror, qreg_exe):
    hf_mirror.fail(random_repo.file_name("Q2_K"), 503, times=1)
    result = subprocess.run([qreg_exe, "pull", "Q2_K", "--manifest", str(random_repo.manifest_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retry 1 of") == 1


def test_unresolvable_host_not_retried():
    # Built by hand: resolving a host name would send a DNS query off this machine.
    import socket

    import httpx

    error = httpx.ConnectError("[Errno -2] Name or service not known")
    error.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert not hub._is_transient(error)
    assert hub._is_transient(httpx.ConnectError("[Errno 111] Connection refused"))
