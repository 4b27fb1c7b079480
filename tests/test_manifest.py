"""Tests of the shipped manifest, the status rule and variant name resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from registry.cli.main import cli
from registry.errors import ManifestError, NotFoundError
from registry.manifest import derive_status, load_manifest, shipped_manifest_path

CARD_BPW = {"Q3_K_M": 4.66, "Q4_K_M": 5.32, "Q2_K": 3.97, "IQ1_S": 2.79}


def test_shipped_manifest_has_30_variants():
    manifest = load_manifest()
    assert len(manifest.variants) == 30
    assert manifest.model.parameters == 595_776_512
    assert manifest.model.vocab_size == 151_669


@pytest.mark.parametrize("name,bpw", sorted(CARD_BPW.items()))
def test_bpw_matches_card(name, bpw):
    variant = load_manifest().resolve(name)
    assert abs(variant.bits_per_weight - bpw) <= 0.01


@pytest.mark.parametrize(
    "name,status",
    [
        ("TQ1_0", "unusable"),
        ("TQ2_0", "unusable"),
        ("BF16", "reference"),
        ("Q8_0", "recommended"),
        ("Q3_K_M", "recommended"),
        ("Q4_K_M", "recommended"),
        ("Q4_0", "recommended"),
        ("IQ1_S", "not-for-production"),
        ("Q2_K", "degraded"),
        ("Q6_K", "ok"),
    ],
)
def test_status_rule(name, status):
    assert load_manifest().resolve(name).status == status


def test_tq_types_not_on_metal():
    manifest = load_manifest()
    for variant in manifest.variants:
        if variant.name.startswith("TQ"):
            assert "metal" not in variant.backends
        else:
            assert "metal" in variant.backends


@pytest.mark.parametrize(
    "spelling",
    ["Q3_K_M", "q3_k_m", "Q3KM", "q3km-imat", "Q3KM-imat", "Qwen3-Embedding-0.6B-Q3_K_M-imat.gguf"],
)
def test_resolve_spellings(spelling):
    assert load_manifest().resolve(spelling).name == "Q3_K_M"


def test_resolve_squashed_q80():
    assert load_manifest().resolve("Q80").name == "Q8_0"


def test_resolve_unknown_suggests():
    with pytest.raises(NotFoundError) as caught:
        load_manifest().resolve("Q9_K")
    assert "did you mean" in caught.value.one_line()


def test_derive_status_first_match_wins():
    assert derive_status(name="TQ1_0", bits=3.04, diverges=True, card_role="x") == "unusable"
    assert derive_status(name="X", bits=2.5, diverges=False, card_role="best") == "recommended"
    assert derive_status(name="X", bits=2.99, diverges=False, card_role="") == "not-for-production"
    assert derive_status(name="X", bits=3.0, diverges=False, card_role="") == "degraded"
    assert derive_status(name="X", bits=4.0, diverges=False, card_role="") == "ok"


def _broken_copy(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    text = shipped_manifest_path().read_text()
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, count))
    return path


def test_broken_manifest_missing_field(tmp_path):
    path = _broken_copy(tmp_path, 'strategy = "k-quant"\n', "")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = caught.value.one_line()
    assert str(path) in message
    assert "variant Q2_K_S" in message
    assert "'strategy' is missing" in message


def test_broken_manifest_wrong_type(tmp_path):
    path = _broken_copy(tmp_path, "size_mib = 330.83", 'size_mib = "330.83"')
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "variant Q3_K_M: field 'size_mib' must be" in caught.value.one_line()


def test_broken_manifest_duplicate_variant(tmp_path):
    path = _broken_copy(tmp_path, 'name = "Q4_K_S"', 'name = "Q4_K_M"')
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "duplicate" in caught.value.one_line()


def test_broken_manifest_wrong_status(tmp_path):
    path = _broken_copy(tmp_path, 'status = "ok"', 'status = "recommended"')
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "status rule gives 'ok'" in caught.value.one_line()


def test_broken_manifest_not_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("schema_version = = 1\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "not valid TOML" in caught.value.one_line()


def test_cli_list_json_has_30_variants():
    result = CliRunner().invoke(cli, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["variants"]) == 30
    sizes = [v["size_mib"] for v in data["variants"]]
    assert sizes == sorted(sizes)


def test_cli_info_name_and_file_agree():
    runner = CliRunner()
    by_name = json.loads(runner.invoke(cli, ["info", "q3km-imat", "--json"]).output)
    by_file = json.loads(runner.invoke(cli, ["info", "Qwen3-Embedding-0.6B-Q3_K_M-imat.gguf", "--json"]).output)
    assert by_name["variant"]["name"] == "Q3_K_M"
    assert by_file["variant"] == by_name["variant"]


def test_cli_info_unknown_variant_exit_code():
    result = CliRunner().invoke(cli, ["info", "Q9_K"])
    assert result.exit_code == NotFoundError.exit_code
    assert "did you mean" in result.output
    assert "Traceback" not in result.output


def test_cli_info_unknown_variant_json_error():
    result = CliRunner().invoke(cli, ["info", "Q9_K", "--json"])
    assert result.exit_code == NotFoundError.exit_code
    error_line = [line for line in result.output.splitlines() if line.startswith("{")][-1]
    assert json.loads(error_line)["error"]["type"] == "not_found"


def test_cli_broken_manifest_one_line(tmp_path):
    path = _broken_copy(tmp_path, 'name = "Q4_K_S"', 'name = "Q4_K_M"')
    result = CliRunner().invoke(cli, ["list", "--manifest", str(path)])
    assert result.exit_code == ManifestError.exit_code
    assert len(result.output.strip().splitlines()) == 1


def test_qreg_help_imports_no_heavy_library(qreg_exe):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from registry.cli.main import cli\n"
        "try:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('huggingface_hub', 'gguf', 'numpy', 'httpx') if m in sys.modules]\n"
        "print('heavy=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "heavy="
