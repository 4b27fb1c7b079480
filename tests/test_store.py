"""Tests of the local store commands: `qreg ls` / `qreg list --local`, `qreg verify`, `qreg rm`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from registry import hub, store
from registry.cli.main import cli
from registry.errors import DigestMismatchError, NotFoundError
from registry.manifest import load_manifest

FAST = {"backoff": 0.05}


def run_qreg(*args: str):
    return CliRunner().invoke(cli, list(args))


def pull_all(repo, *names: str):
    manifest = load_manifest(repo.manifest_path)
    return {name: hub.pull(manifest, name, **FAST) for name in names}


def damage(path: Path) -> None:
    blob = Path(os.path.realpath(path))
    with open(blob, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_ls_empty(random_repo):
    result = run_qreg("ls", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == 0, result.output
    assert "no pulled variants" in result.stdout


def test_ls_shows_pulled(random_repo, hf_mirror):
    pulled = pull_all(random_repo, "Q2_K")
    result = run_qreg("ls", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)["variants"]
    assert [i["variant"] for i in items] == ["Q2_K"]
    assert items[0]["state"] == "verified"
    assert items[0]["path"] == str(pulled["Q2_K"].path)
    assert items[0]["digest_source"] == "manifest"
    assert items[0]["size"] == random_repo.files["Q2_K"].stat().st_size


def test_list_local_same_as_ls(random_repo, hf_mirror):
    pull_all(random_repo, "Q2_K")
    ls = run_qreg("ls", "--manifest", str(random_repo.manifest_path), "--json")
    local = run_qreg("list", "--local", "--manifest", str(random_repo.manifest_path), "--json")
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout) == json.loads(ls.stdout)


def test_ls_human_table(random_repo, hf_mirror):
    pull_all(random_repo, "Q2_K")
    result = run_qreg("ls", "--manifest", str(random_repo.manifest_path))
    assert "VARIANT" in result.stdout
    assert "verified" in result.stdout


def test_ls_shows_partial(random_repo, hf_mirror):
    file = random_repo.file_name("Q8_0")
    hf_mirror.drop_after(file, 1024 * 1024, times=None)
    manifest = load_manifest(random_repo.manifest_path)
    try:
        hub.pull(manifest, "Q8_0", retries=0, **FAST)
    except Exception as error:
        assert error.exit_code == 6
    result = run_qreg("ls", "--manifest", str(random_repo.manifest_path), "--json")
    items = json.loads(result.stdout)["variants"]
    assert items[0]["state"] == "partial"
    assert items[0]["partial_bytes"] > 0
    assert items[0]["partial_size"] == random_repo.files["Q8_0"].stat().st_size
    assert "partial" in run_qreg("ls", "--manifest", str(random_repo.manifest_path)).stdout


def test_ls_modified_after_change(random_repo, hf_mirror):
    pulled = pull_all(random_repo, "Q2_K")
    damage(pulled["Q2_K"].path)
    os.utime(pulled["Q2_K"].path, ns=(1, 1))
    items = json.loads(run_qreg("ls", "--manifest", str(random_repo.manifest_path), "--json").stdout)["variants"]
    assert items[0]["state"] == "modified"


def test_verify_ok(random_repo, hf_mirror):
    pull_all(random_repo, "Q2_K", "Q4_K_M")
    result = run_qreg("verify", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)["results"]
    assert sorted(r["variant"] for r in results) == ["Q2_K", "Q4_K_M"]
    assert all(r["ok"] for r in results)


def test_verify_mismatch_quarantines(random_repo, hf_mirror):
    pulled = pull_all(random_repo, "Q2_K", "Q4_K_M")
    damage(pulled["Q2_K"].path)
    result = run_qreg("verify", "Q2_K", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == DigestMismatchError.exit_code
    assert random_repo.sha256["Q2_K"] in result.stdout
    assert "sha256 mismatch for Q2_K" in result.stderr

    manifest = load_manifest(random_repo.manifest_path)
    paths = store.paths_for(manifest, manifest.resolve("Q2_K"))
    assert not pulled["Q2_K"].path.exists()
    assert not paths.blob(random_repo.sha256["Q2_K"]).exists()
    assert len(list(paths.quarantine_dir.glob(f"{paths.file}.*"))) == 1
    assert store.pulled_path(manifest, "Q4_K_M") == pulled["Q4_K_M"].path

    again = hub.pull(manifest, "Q2_K", **FAST)
    assert again.already_present is False
    assert store.sha256_file(again.path) == random_repo.sha256["Q2_K"]


def test_verify_not_pulled(random_repo):
    result = run_qreg("verify", "Q8_0", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert "Q8_0 is not pulled" in result.stderr


def test_verify_nothing_pulled(random_repo):
    result = run_qreg("verify", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == 0
    assert "no pulled variants" in result.stdout


def test_rm_removes_only_that_variant(random_repo, hf_mirror):
    pulled = pull_all(random_repo, "Q2_K", "Q4_K_M")
    result = run_qreg("rm", "Q2_K", "--manifest", str(random_repo.manifest_path), "--json")
    assert result.exit_code == 0, result.output
    removed = json.loads(result.stdout)["removed"]
    assert str(pulled["Q2_K"].path) in removed

    manifest = load_manifest(random_repo.manifest_path)
    assert store.pulled_path(manifest, "Q2_K") is None
    assert not store.paths_for(manifest, manifest.resolve("Q2_K")).blob(random_repo.sha256["Q2_K"]).exists()
    assert store.pulled_path(manifest, "Q4_K_M") == pulled["Q4_K_M"].path
    assert store.sha256_file(pulled["Q4_K_M"].path) == random_repo.sha256["Q4_K_M"]
    assert (store.hub_cache_dir() / "models--qreg-test--Random-GGUF" / "refs" / "main").exists()


def test_rm_deletes_partial(random_repo, hf_mirror):
    hf_mirror.drop_after(random_repo.file_name("Q8_0"), 1024 * 1024, times=None)
    manifest = load_manifest(random_repo.manifest_path)
    try:
        hub.pull(manifest, "Q8_0", retries=0, **FAST)
    except Exception:
        pass
    paths = store.paths_for(manifest, manifest.resolve("Q8_0"))
    assert paths.partial.exists()
    result = run_qreg("rm", "Q8_0", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == 0, result.output
    assert not paths.partial.exists()
    assert not paths.partial_meta.exists()


def test_rm_not_pulled(random_repo):
    result = run_qreg("rm", "Q8_0", "--manifest", str(random_repo.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert "Q8_0 is not pulled" in result.stderr


def test_rm_keeps_other_tools_files(random_repo, hf_mirror):
    from huggingface_hub import hf_hub_download

    other = hf_hub_download(random_repo.repo, random_repo.file_name("Q8_0"), cache_dir=store.hub_cache_dir(),
                            endpoint=hf_mirror.endpoint)
    pull_all(random_repo, "Q2_K")
    assert run_qreg("rm", "Q2_K", "--manifest", str(random_repo.manifest_path)).exit_code == 0
    assert store.sha256_file(Path(other)) == random_repo.sha256["Q8_0"]


def test_list_pulled_api(random_repo, hf_mirror):
    pull_all(random_repo, "Q4_K_M")
    items = store.list_pulled(load_manifest(random_repo.manifest_path))
    assert [(i.variant, i.state) for i in items] == [("Q4_K_M", "verified")]
