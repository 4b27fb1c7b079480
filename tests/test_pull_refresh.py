"""Tests of `qreg manifest refresh`: pins written to the overlay or a new manifest, then used by pull."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from registry import hub
from registry.cli.main import cli
from registry.errors import OfflineError, UsageError
from registry.manifest import load_manifest, overlay_path_for, shipped_manifest_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def run_qreg(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_refresh_writes_overlay(unpinned_repo, hf_mirror):
    before = unpinned_repo.manifest_path.read_bytes()
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["commit"] == unpinned_repo.commit
    assert sorted(data["pinned"]) == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert unpinned_repo.manifest_path.read_bytes() == before

    overlay = overlay_path_for(unpinned_repo.manifest_path)
    assert data["written"] == str(overlay)
    manifest = load_manifest(unpinned_repo.manifest_path)
    assert manifest.model.revision == unpinned_repo.commit
    for name, sha256 in unpinned_repo.sha256.items():
        assert manifest.resolve(name).sha256 == sha256
        assert manifest.resolve(name).size_bytes == unpinned_repo.files[name].stat().st_size


def test_refresh_then_pull_is_pinned(unpinned_repo, hf_mirror):
    assert run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path)).exit_code == 0
    result = hub.pull(load_manifest(unpinned_repo.manifest_path), "Q4_K_M")
    assert result.digest_source == "manifest"
    assert result.commit == unpinned_repo.commit


def test_refresh_list_shows_pinned(unpinned_repo, hf_mirror):
    before = json.loads(run_qreg("list", "--manifest", str(unpinned_repo.manifest_path), "--json").stdout)
    assert all(v["sha256"] is None for v in before["variants"])
    run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path))
    after = run_qreg("list", "--manifest", str(unpinned_repo.manifest_path))
    assert after.stdout.count("pinned") == 3


def test_refresh_output_complete_manifest(unpinned_repo, hf_mirror, tmp_path):
    target = tmp_path / "pinned.toml"
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path), "--output", str(target))
    assert result.exit_code == 0, result.output
    assert not overlay_path_for(unpinned_repo.manifest_path).exists()
    manifest = load_manifest(target)
    assert manifest.model.revision == unpinned_repo.commit
    assert manifest.resolve("Q8_0").sha256 == unpinned_repo.sha256["Q8_0"]
    pulled = hub.pull(manifest, "Q8_0")
    assert pulled.digest_source == "manifest"


def test_refresh_rejects_shipped_manifest(unpinned_repo, hf_mirror):
    shipped = shipped_manifest_path()
    before = shipped.read_bytes()
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path), "--output", str(shipped))
    assert result.exit_code == UsageError.exit_code
    assert "shipped with qreg" in result.stderr
    assert shipped.read_bytes() == before


def test_refresh_missing_file_left_unpinned(unpinned_repo, hf_mirror, tmp_path):
    files = {p.name: p for name, p in unpinned_repo.files.items() if name != "Q2_K"}
    hf_mirror.add_repo(unpinned_repo.repo, files)
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["missing"] == ["Q2_K"]
    with open(overlay_path_for(unpinned_repo.manifest_path), "rb") as handle:
        overlay = tomllib.load(handle)
    assert "Q2_K" not in [v["name"] for v in overlay["variants"]]
    assert load_manifest(unpinned_repo.manifest_path).resolve("Q2_K").sha256 == ""


def test_refresh_offline(unpinned_repo, hf_mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path))
    assert result.exit_code == OfflineError.exit_code
    assert "offline mode" in result.stderr
    assert hf_mirror.requests == []
    assert not overlay_path_for(unpinned_repo.manifest_path).exists()


def test_refresh_unknown_repo(unpinned_repo, hf_mirror, tmp_path):
    text = unpinned_repo.manifest_path.read_text().replace(unpinned_repo.repo, "qreg-test/Nowhere")
    other = tmp_path / "nowhere.toml"
    other.write_text(text)
    result = run_qreg("manifest", "refresh", "--manifest", str(other))
    assert result.exit_code == 3
    assert "qreg-test/Nowhere" in result.stderr
    assert not overlay_path_for(other).exists()


def test_refresh_output_folder_missing(unpinned_repo, hf_mirror, tmp_path):
    target = tmp_path / "no-such-folder" / "pinned.toml"
    result = run_qreg("manifest", "refresh", "--manifest", str(unpinned_repo.manifest_path), "--output", str(target))
    assert result.exit_code == UsageError.exit_code
    assert "does not exist" in result.stderr
    assert not target.parent.exists()
    assert hf_mirror.requests == []  # rejected before the hub was asked
