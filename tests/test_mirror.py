"""Tests of registry.mirror with the real huggingface_hub client (2.4.0) and plain HTTP."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from registry.mirror import HubMirror, git_blob_id, lfs_pointer, parse_range


@pytest.fixture
def upstream(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "upstream"
    folder.mkdir()
    model = folder / "model.gguf"
    model.write_bytes(os.urandom(300_000))
    readme = folder / "README.md"
    readme.write_text("# a model card\n")
    return {"model.gguf": model, "README.md": readme}


@pytest.fixture
def mirror(upstream):
    with HubMirror(token="hf_mirrorTest") as running:
        running.add_repo("owner/repo", upstream)
        yield running


def test_hf_hub_download_lfs_and_plain(mirror, upstream, tmp_path):
    from huggingface_hub import hf_hub_download

    for name, source in upstream.items():
        path = hf_hub_download("owner/repo", name, cache_dir=tmp_path / "cache", endpoint=mirror.endpoint)
        assert Path(path).read_bytes() == source.read_bytes()
    blobs = sorted(p.name for p in (tmp_path / "cache" / "models--owner--repo" / "blobs").iterdir())
    sha256 = hashlib.sha256(upstream["model.gguf"].read_bytes()).hexdigest()
    assert sha256 in blobs
    assert git_blob_id(upstream["README.md"].read_bytes()) in blobs


def test_metadata_headers(mirror, upstream):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    metadata = get_hf_file_metadata(hf_hub_url("owner/repo", "model.gguf", endpoint=mirror.endpoint))
    sha256 = hashlib.sha256(upstream["model.gguf"].read_bytes()).hexdigest()
    assert metadata.etag == sha256
    assert metadata.size == 300_000
    assert metadata.commit_hash == mirror.repos["owner/repo"].refs["main"]
    assert f":{mirror.cdn_port}/" in metadata.location


def test_resolve_redirect_raw(mirror):
    response = httpx.head(f"{mirror.endpoint}/owner/repo/resolve/main/model.gguf")
    assert response.status_code == 302
    pointer = lfs_pointer(response.headers["X-Linked-Etag"].strip('"'), 300_000)
    assert response.headers["ETag"].strip('"') == git_blob_id(pointer)
    assert response.headers["X-Linked-Size"] == "300000"
    assert len(response.headers["X-Repo-Commit"]) == 40


def test_cdn_range_requests(mirror, upstream):
    location = httpx.head(f"{mirror.endpoint}/owner/repo/resolve/main/model.gguf").headers["Location"]
    data = upstream["model.gguf"].read_bytes()
    partial = httpx.get(location, headers={"Range": "bytes=1000-"})
    assert partial.status_code == 206
    assert partial.content == data[1000:]
    assert partial.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    bad = httpx.get(location, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416


def test_api_model_info_paths_info_tree(mirror, upstream):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=mirror.endpoint)
    info = api.model_info("owner/repo", files_metadata=True)
    assert info.sha == mirror.repos["owner/repo"].refs["main"]
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["README.md"] is None
    assert lfs["model.gguf"].sha256 == hashlib.sha256(upstream["model.gguf"].read_bytes()).hexdigest()

    entries = api.get_paths_info("owner/repo", ["model.gguf", "missing.gguf"], revision=info.sha)
    assert [e.path for e in entries] == ["model.gguf"]
    assert entries[0].lfs.size == 300_000
    assert sorted(e.path for e in api.list_repo_tree("owner/repo")) == ["README.md", "model.gguf"]


def test_errors_map_to_hf_exceptions(mirror):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("owner/repo", "missing.gguf", endpoint=mirror.endpoint)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("owner/none", "model.gguf", endpoint=mirror.endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("owner/repo", "model.gguf", revision="nope", endpoint=mirror.endpoint)
    mirror.repos["owner/repo"].gated = True
    with pytest.raises(GatedRepoError):
        hf_hub_download("owner/repo", "model.gguf", endpoint=mirror.endpoint, token=False)


def test_gated_repo_with_token(mirror, upstream, tmp_path):
    from huggingface_hub import hf_hub_download

    mirror.repos["owner/repo"].gated = True
    path = hf_hub_download("owner/repo", "model.gguf", cache_dir=tmp_path / "c", endpoint=mirror.endpoint,
                           token="hf_mirrorTest")
    assert Path(path).read_bytes() == upstream["model.gguf"].read_bytes()
    cdn = [r for r in mirror.requests if r.server == "cdn"]
    assert cdn and not any(r.authorized for r in cdn)


def test_commit_pinned_download(mirror, upstream, tmp_path):
    from huggingface_hub import hf_hub_download

    first = mirror.repos["owner/repo"].refs["main"]
    changed = tmp_path / "model.gguf"
    changed.write_bytes(os.urandom(1000))
    second = mirror.add_repo("owner/repo", {"model.gguf": changed})
    old = hf_hub_download("owner/repo", "model.gguf", revision=first, cache_dir=tmp_path / "c", endpoint=mirror.endpoint)
    new = hf_hub_download("owner/repo", "model.gguf", cache_dir=tmp_path / "c", endpoint=mirror.endpoint)
    assert Path(old).read_bytes() == upstream["model.gguf"].read_bytes()
    assert Path(new).read_bytes() == changed.read_bytes()
    assert second in new


def test_add_directory(tmp_path):
    repo_dir = tmp_path / "root" / "org" / "name"
    (repo_dir / "sub").mkdir(parents=True)
    (repo_dir / "a.gguf").write_bytes(b"x" * 10)
    (repo_dir / "sub" / "b.txt").write_text("b")
    with HubMirror() as mirror:
        assert mirror.add_directory(tmp_path / "root") == ["org/name"]
        files = mirror.repos["org/name"].commits[mirror.repos["org/name"].refs["main"]]
        assert sorted(files) == ["a.gguf", "sub/b.txt"]
        tree = httpx.get(f"{mirror.endpoint}/api/models/org/name/tree/main").json()
        assert sorted((e["type"], e["path"]) for e in tree) == [("directory", "sub"), ("file", "a.gguf")]


@pytest.mark.parametrize(
    "header,expected",
    [(None, (0, 100)), ("bytes=10-", (10, 100)), ("bytes=10-19", (10, 20)), ("bytes=-5", (95, 100)),
     ("bytes=100-", None), ("bytes=5-2", None), ("items=1-2", (0, 100))],
)
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


def test_serve_pulled_store(random_repo, hf_mirror, tmp_path, monkeypatch):
    from registry import hub, store
    from registry.manifest import load_manifest

    manifest = load_manifest(random_repo.manifest_path)
    hub.pull(manifest, "Q4_K_M")
    first_cache = store.hub_cache_dir()

    with HubMirror() as second:
        assert second.add_hf_cache(first_cache) == [random_repo.repo]
        assert second.repos[random_repo.repo].refs["main"] == random_repo.commit
        monkeypatch.setenv("HF_ENDPOINT", second.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "second-cache"))
        result = hub.pull(manifest, "Q4_K_M")
    assert result.path.is_relative_to(tmp_path / "second-cache")
    assert store.sha256_file(result.path) == random_repo.sha256["Q4_K_M"]
    assert result.commit == random_repo.commit


def test_mirror_cli_nothing_to_serve():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "registry.mirror"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "nothing to serve" in result.stderr


def test_mirror_cli_port_in_use(tmp_path):
    import socket
    import subprocess
    import sys

    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "registry.mirror", "--port", str(port), "--repo", "owner/repo", str(file)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr
