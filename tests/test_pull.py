"""Tests of `registry.hub.pull` and `qreg pull` against the loopback mirror."""

from __future__ import annotations

from registry import hub, store
from registry.manifest import load_manifest


def test_pull_pinned_downloads_verified(random_repo, hf_mirror):
    manifest = load_manifest(random_repo.manifest_path)
    result = hub.pull(manifest, "Q4_K_M")
    assert result.digest_source == "manifest"
    assert result.already_present is False
    assert result.sha256 == random_repo.sha256["Q4_K_M"]
    assert result.path.read_bytes() == random_repo.files["Q4_K_M"].read_bytes()
    assert store.pulled_path(manifest, "Q4_K_M") == result.path
