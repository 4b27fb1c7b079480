"""Tests of `registry.hub.pull` and `qreg pull` against the loopback mirror: the happy paths,
digest sources, revisions, offline mode, idempotence and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from registry import hub, store
from registry.cli.main import cli
from registry.errors import (
    AuthError,
    HubError,
    ManifestError,
    NotFoundError,
    OfflineError,
    UsageError,
)
from registry.manifest import load_manifest
from hf_mirror_fixtures import MIRROR_TOKEN, RANDOM_REPO, write_random_manifest


def run_qreg(*args: str):
    return CliRunner().invoke(cli, list(args))


def tree_files(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_pull_pinned_downloads_verified(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    result = hub.pull(manifest, "Q4_K_M")
    assert result.digest_source == "manifest"
    assert result.already_present is False
    assert result.sha256 == random_repo.sha256["Q4_K_M"]
    assert result.path.read_bytes() == random_repo.files["Q4_K_M"].read_bytes()
    assert store.pulled_path(manifest, "Q4_K_M") == result.path


def test_pull_hf_cache_layout(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    result = hub.pull(manifest, "Q2_K")
    repo_dir = store.hub_cache_dir() / "models--qreg-test--Random-GGUF"
    sha256 = random_repo.sha256["Q2_K"]
    assert result.path == repo_dir / "snapshots" / random_repo.commit / random_repo.file_name("Q2_K")
    assert result.path.is_symlink()
    assert os.readlink(result.path) == f"../../blobs/{sha256}"
    assert (repo_dir / "refs" / "main").read_text() == random_repo.commit


def test_pull_visible_to_huggingface_hub(random_repo, hf_mirror):
    from huggingface_hub import try_to_load_from_cache

    manifest = load_manifest(random_repo.manifest_path)
    result = hub.pull(manifest, "Q2_K")
    found = try_to_load_from_cache(RANDOM_REPO, random_repo.file_name("Q2_K"), cache_dir=store.hub_cache_dir())
    assert found == str(result.path)


def test_pull_unpinned_uses_hub_digest(unpinned_repo, hf_mirror):
    result = run_qreg("pull", "Q4_K_M", "--manifest", str(unpinned_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["digest_source"] == "hub"
    assert data["sha256"] == unpinned_repo.sha256["Q4_K_M"]
    assert "sha256 is taken from the hub" in data["note"]


def test_pull_unpinned_note_in_human_output(unpinned_repo, hf_mirror):
    result = run_qreg("pull", "Q2_K", "--manifest", str(unpinned_repo.manifest_path))
    assert result.exit_code == 0, result.output
    assert "taken from the hub, not pinned" in result.stdout
    assert "qreg manifest refresh" in result.stderr


def test_pull_again_returns_at_once(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    first = hub.pull(manifest, "Q2_K")
    requests_before = len(hf_mirror.requests)
    second = hub.pull(manifest, "Q2_K")
    assert second.already_present is True
    assert second.path == first.path
    assert len(hf_mirror.requests) == requests_before


def test_pull_cli_json_fields(random_repo, hf_mirror):
    result = run_qreg("pull", "q4km", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("path", "sha256", "digest_source", "size", "already_present", "commit", "revision"):
        assert key in data
    assert data["size"] == random_repo.files["Q4_K_M"].stat().st_size
    assert data["commit"] == random_repo.commit


def test_pull_leaves_no_partial(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    hub.pull(manifest, "Q2_K")
    paths = store.paths_for(manifest, manifest.resolve("Q2_K"))
    assert not paths.partial.exists()
    assert not paths.partial_meta.exists()


def test_pull_revision_other_commit_uses_hub_digest(random_repo, hf_mirror, tmp_path):
    first_commit = random_repo.commit
    changed = tmp_path / "changed" / random_repo.file_name("Q2_K")
    changed.parent.mkdir()
    changed.write_bytes(os.urandom(4096))
    files = {p.name: p for p in random_repo.files.values()}
    files[changed.name] = changed
    second_commit = hf_mirror.add_repo(RANDOM_REPO, files)
    assert second_commit != first_commit

    pinned = write_random_manifest(tmp_path / "pinned.toml", RANDOM_REPO, random_repo.files, pin=True,
                                   revision=first_commit)
    manifest = load_manifest(pinned)
    at_pin = hub.pull(manifest, "Q2_K")
    assert at_pin.digest_source == "manifest"
    assert at_pin.commit == first_commit

    at_main = hub.pull(manifest, "Q2_K", revision="main")
    assert at_main.digest_source == "hub"
    assert at_main.commit == second_commit
    assert at_main.path.read_bytes() == changed.read_bytes()
    assert "not the manifest's revision" in at_main.note


def test_pull_revision_same_as_pin_uses_manifest(random_repo, hf_mirror, tmp_path):
    pinned = write_random_manifest(tmp_path / "pinned.toml", RANDOM_REPO, random_repo.files, pin=True,
                                   revision=random_repo.commit)
    result = hub.pull(load_manifest(pinned), "Q2_K", revision="main")
    assert result.digest_source == "manifest"


def test_pull_stale_pin_fails_before_download(random_repo, hf_mirror, tmp_path):
    manifest = load_manifest(random_repo.manifest_path)
    variant = manifest.resolve("Q2_K")
    stale = dataclasses.replace(variant, sha256="ab" * 32)
    with pytest.raises(Exception) as caught:
        hub.pull(manifest, stale)
    assert caught.value.exit_code == 9
    assert "ab" * 32 in caught.value.one_line()
    assert random_repo.sha256["Q2_K"] in caught.value.one_line()
    assert hf_mirror.cdn_gets(variant.file) == []


def test_pull_unknown_variant_exit_code(random_repo, hf_mirror):
    result = run_qreg("pull", "Q9_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert "unknown variant" in result.stderr


def test_pull_404_names_repo_and_file(random_repo, hf_mirror):
    file = random_repo.file_name("Q2_K")
    hf_mirror.not_found(file)
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert file in result.stderr
    assert RANDOM_REPO in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert tree_files(store.hub_cache_dir()) == set()


def test_pull_unknown_repo_exit_code(random_repo, hf_mirror, tmp_path):
    other = write_random_manifest(tmp_path / "other.toml", "qreg-test/Missing", random_repo.files, pin=True)
    result = run_qreg("pull", "Q2_K", "--manifest", str(other))
    assert result.exit_code == NotFoundError.exit_code
    assert "qreg-test/Missing" in result.stderr


def test_pull_gated_401_says_hf_token(random_repo, hf_mirror):
    hf_mirror.gate(RANDOM_REPO)
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == AuthError.exit_code
    assert "HF_TOKEN" in result.stderr
    assert RANDOM_REPO in result.stderr
    assert random_repo.file_name("Q2_K") in result.stderr
    assert tree_files(store.hub_cache_dir()) == set()


def test_pull_gated_with_token(random_repo, hf_mirror, monkeypatch):
    hf_mirror.gate(RANDOM_REPO)
    monkeypatch.setenv("HF_TOKEN", MIRROR_TOKEN)
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K")
    assert result.sha256 == random_repo.sha256["Q2_K"]
    resolve = [r for r in hf_mirror.requests if "/resolve/" in r.path]
    assert all(r.authorized for r in resolve)
    assert not any(r.authorized for r in hf_mirror.requests if r.server == "cdn")


@pytest.mark.parametrize("token", [MIRROR_TOKEN, "hf_wrongTokenThatMustNotLeak42"])
def test_token_never_in_output_or_logs(random_repo, hf_mirror, monkeypatch, caplog, token):
    hf_mirror.gate(RANDOM_REPO)
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level("DEBUG")
    result = run_qreg("-vv", "pull", "Q2_K", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code in (0, AuthError.exit_code)
    assert token not in result.stdout
    assert token not in result.stderr
    assert token not in caplog.text


def test_pull_commit_header_hostile(random_repo, hf_mirror):
    file = random_repo.file_name("Q2_K")
    hf_mirror.override_headers(file, X_Repo_Commit="../../../outside")
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == HubError.exit_code
    assert "invalid commit id" in result.stderr
    assert tree_files(store.hub_cache_dir()) == set()


def test_pull_linked_etag_not_sha256(unpinned_repo, hf_mirror):
    file = unpinned_repo.file_name("Q2_K")
    hf_mirror.override_headers(file, X_Linked_Etag='"0123456789abcdef0123456789abcdef01234567"')
    result = hub.pull(load_manifest(unpinned_repo.manifest_path), "Q2_K")
    assert result.sha256 == unpinned_repo.sha256["Q2_K"]
    assert any("/paths-info/" in r.path for r in hf_mirror.requests)


def test_pull_hostile_file_name_in_manifest(random_repo, hf_mirror, tmp_path):
    text = random_repo.manifest_path.read_text()
    hostile = tmp_path / "hostile.toml"
    hostile.write_text(text.replace(f'"{random_repo.file_name("Q2_K")}"', '"../../Random-Q2_K.gguf"'))
    result = run_qreg("pull", "Q2_K", "--manifest", str(hostile))
    assert result.exit_code == ManifestError.exit_code
    assert "plain .gguf file name" in result.stderr
    assert hf_mirror.requests == []


@pytest.mark.parametrize("name", ["../escape.gguf", "/etc/passwd.gguf", "a/b.gguf", "..", "a\\b.gguf"])
def test_pull_hostile_file_name_via_api(random_repo, hf_mirror, name):
    manifest = load_manifest(random_repo.manifest_path)
    hostile = dataclasses.replace(manifest.resolve("Q2_K"), file=name)
    data_root = Path(os.environ["XDG_DATA_HOME"])
    with pytest.raises(UsageError) as caught:
        hub.pull(manifest, hostile)
    assert "unsafe file name" in caught.value.one_line()
    assert tree_files(data_root) == set()
    assert tree_files(store.hub_cache_dir()) == set()
    assert hf_mirror.requests == []


@pytest.mark.parametrize("revision", ["../x", "a/../b", "/abs", ""])
def test_pull_hostile_revision(random_repo, hf_mirror, revision):
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path), "--revision", revision)
    if revision == "":
        assert result.exit_code == 0  # an empty --revision means "not given"
        return
    assert result.exit_code == UsageError.exit_code
    assert "invalid revision" in result.stderr
    assert hf_mirror.requests == []


def test_pull_unknown_revision(random_repo, hf_mirror):
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path), "--revision", "nope")
    assert result.exit_code == NotFoundError.exit_code
    assert "revision nope not found" in result.stderr


def test_offline_present_file_used(random_repo, hf_mirror, monkeypatch):
    manifest = load_manifest(random_repo.manifest_path)
    pulled = hub.pull(manifest, "Q2_K")
    count = len(hf_mirror.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(pulled.path)
    assert len(hf_mirror.requests) == count


def test_offline_missing_file_names_cache(random_repo, hf_mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == OfflineError.exit_code
    assert "offline mode" in result.stderr
    assert str(store.hub_cache_dir()) in result.stderr
    assert hf_mirror.requests == []


def test_offline_adopts_hf_download(random_repo, hf_mirror, monkeypatch):
    from huggingface_hub import hf_hub_download

    file = random_repo.file_name("Q2_K")
    hf_hub_download(RANDOM_REPO, file, cache_dir=store.hub_cache_dir(), endpoint=hf_mirror.endpoint)
    count = len(hf_mirror.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K")
    assert result.sha256 == random_repo.sha256["Q2_K"]
    assert result.digest_source == "manifest"
    assert len(hf_mirror.requests) == count


def test_pull_adopts_cached_blob(random_repo, hf_mirror):
    from huggingface_hub import hf_hub_download

    file = random_repo.file_name("Q4_K_M")
    hf_hub_download(RANDOM_REPO, file, cache_dir=store.hub_cache_dir(), endpoint=hf_mirror.endpoint)
    gets = len(hf_mirror.cdn_gets(file))
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q4_K_M")
    assert result.already_present is True
    assert len(hf_mirror.cdn_gets(file)) == gets


def test_pulled_path_none_when_not_pulled(random_repo):
    manifest = load_manifest(random_repo.manifest_path)
    assert store.pulled_path(manifest, "Q8_0") is None


def test_pulled_path_none_after_change(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    result = hub.pull(manifest, "Q2_K")
    blob = Path(os.path.realpath(result.path))
    with open(blob, "r+b") as handle:
        handle.write(b"X")
    os.utime(blob, ns=(1, 1))
    assert store.pulled_path(manifest, "Q2_K") is None


def test_pull_fixture_gguf(gguf_mirror, fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path)
    result = run_qreg("pull", "Q4_K_M", "--manifest", str(fixture_ggufs.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["digest_source"] == "manifest"
    assert data["sha256"] == fixture_ggufs.index["Q4_K_M"]["sha256"]
    assert store.pulled_path(manifest, "Q4_K_M") == Path(data["path"])


def test_empty_revision_keeps_pin(random_repo, hf_mirror):
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K", revision="")
    assert result.digest_source == "manifest"
    assert result.revision == "main"


def test_token_from_hf_home_file(random_repo, hf_mirror, monkeypatch, tmp_path):
    hf_mirror.gate(RANDOM_REPO)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    token_file = Path(os.environ["HF_HOME"]) / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(MIRROR_TOKEN + "\n")
    assert hub.hub_token() == MIRROR_TOKEN
    result = hub.pull(load_manifest(random_repo.manifest_path), "Q2_K")
    assert result.path.is_relative_to(tmp_path / "elsewhere")


def test_pull_endpoint_not_a_url(random_repo, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "notaurl")
    manifest = load_manifest(random_repo.manifest_path)

    with pytest.raises(UsageError, match="invalid HF_ENDPOINT 'notaurl'"):
        hub.pull(manifest, "Q2_K", retries=5, backoff=10)


def test_pull_endpoint_plain_web_server(random_repo, monkeypatch, tmp_path):
    # A web server that is not a hub returns 404 without the hub's error headers.
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    manifest = load_manifest(random_repo.manifest_path)
    try:
        with pytest.raises(NotFoundError) as raised:
            hub.pull(manifest, "Q2_K", retries=5, backoff=10)
    finally:
        server.shutdown()
        server.server_close()

    assert "HF_ENDPOINT" in raised.value.hint


def test_offline_other_revision_not_used(random_repo, hf_mirror, monkeypatch):
    manifest = load_manifest(random_repo.manifest_path)
    hub.pull(manifest, "Q2_K")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = run_qreg("pull", "Q2_K", "--manifest", str(random_repo.manifest_path), "--revision", "nosuch")

    assert result.exit_code == OfflineError.exit_code
    assert "at revision nosuch is not in the cache" in result.stderr
