"""Tests of the fixture builder: the tiny model's files and manifest, the cache, the twin's sizes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from gguf_fixtures import load_make_fixtures
from registry.manifest import MIB, load_manifest, shipped_manifest_path

make_fixtures = load_make_fixtures()
SCRIPT = Path(make_fixtures.__file__)

TWIN_CHECKED_TYPES = ("Q8_0", "Q4_K_M", "Q2_K")
SIZE_TOLERANCE_MIB = 0.02


def expected_file_type(variant: str) -> int:
    return gguf.LlamaFileType["MOSTLY_" + variant].value


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )


# --- shapes, no build -------------------------------------------------------


def test_twin_parameter_count():
    assert make_fixtures.TWIN.parameter_count() == 595_776_512


def test_twin_shape_matches_manifest():
    model = load_manifest(shipped_manifest_path(), apply_overlay=False).model
    twin = make_fixtures.TWIN
    assert twin.embedding_length == model.embedding_length
    assert twin.block_count == model.block_count
    assert twin.head_count == model.head_count
    assert twin.head_count_kv == model.head_count_kv
    assert twin.head_length == model.key_length == model.value_length
    assert twin.feed_forward_length == model.feed_forward_length
    assert twin.vocab_size == model.vocab_size
    assert twin.context_length == model.context_length


def test_tiny_rows_fit_k_quant_blocks():
    # Every 2-D tensor's row length must be a multiple of 256, or llama-quantize
    # picks fallback types and the file no longer has its variant's mix.
    for name, dims in make_fixtures.TINY.tensors():
        if len(dims) == 2:
            assert dims[1] % 256 == 0, name


def test_no_output_tensor():
    names = [name for name, _ in make_fixtures.TINY.tensors()]
    assert "output.weight" not in names
    assert "token_embd.weight" in names


def test_parse_types_rejects_unknown():
    with pytest.raises(make_fixtures.FixtureBuildError, match="unknown variant.*Q9_9"):
        make_fixtures.parse_types("Q8_0,Q9_9", make_fixtures.TINY_TYPES)


def test_parse_types_normalizes():
    assert make_fixtures.parse_types(" q8_0, Q4_K_M ,q8_0", ()) == ("Q8_0", "Q4_K_M")


def test_header_reader_rejects_non_gguf(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(make_fixtures.FixtureBuildError, match="not a GGUF file"):
        make_fixtures.read_gguf_header(path)


def test_header_reader_rejects_truncated(fixture_ggufs, tmp_path):
    source = fixture_ggufs.files["Q8_0"]
    path = tmp_path / "truncated.gguf"
    path.write_bytes(source.read_bytes()[:4096])
    with pytest.raises(make_fixtures.FixtureBuildError, match="runs past the end|truncated"):
        make_fixtures.read_gguf_header(path)


# --- the tiny fixture set ---------------------------------------------------


def test_tiny_has_all_variants(fixture_ggufs):
    assert tuple(fixture_ggufs.files) == make_fixtures.TINY_TYPES
    for path in fixture_ggufs.files.values():
        assert path.is_file()
        assert path.parent == fixture_ggufs.dir


@pytest.mark.parametrize("variant", make_fixtures.TINY_TYPES)
def test_tiny_file_type(fixture_ggufs, variant):
    header = make_fixtures.read_gguf_header(fixture_ggufs.files[variant])
    assert header.metadata["general.file_type"] == expected_file_type(variant)


def test_tiny_file_names_follow_card(fixture_ggufs):
    names = {variant: path.name for variant, path in fixture_ggufs.files.items()}
    assert names["Q8_0"] == "Tiny-Qwen3-Embedding-Q8_0.gguf"
    assert names["BF16"] == "Tiny-Qwen3-Embedding-BF16.gguf"
    assert names["Q4_K_M"] == "Tiny-Qwen3-Embedding-Q4_K_M-imat.gguf"
    assert names["IQ2_XXS"] == "Tiny-Qwen3-Embedding-IQ2_XXS-imat.gguf"
    assert names["TQ1_0"] == "Tiny-Qwen3-Embedding-TQ1_0-imat.gguf"


def test_tiny_metadata(fixture_ggufs):
    metadata = make_fixtures.read_gguf_header(fixture_ggufs.files["Q4_K_M"]).metadata
    assert metadata["general.architecture"] == "qwen3"
    assert metadata["qwen3.pooling_type"] == gguf.PoolingType.LAST
    assert metadata["qwen3.embedding_length"] == 256
    assert metadata["qwen3.context_length"] == 32_768
    assert metadata["tokenizer.ggml.tokens"] == 151_669
    assert metadata["tokenizer.ggml.eos_token_id"] == 151_643
    assert metadata["tokenizer.ggml.add_eos_token"] is False
    assert metadata["quantize.imatrix.file"] == "imatrix.gguf"


def test_tiny_tensors(fixture_ggufs):
    header = make_fixtures.read_gguf_header(fixture_ggufs.files["BF16"])
    shapes = {name: dims for name, dims, _ in header.tensors}
    assert "output.weight" not in shapes
    assert shapes["token_embd.weight"] == (256, 151_669)
    assert shapes["blk.1.attn_k.weight"] == (256, 128)
    parameters = 0
    for dims in shapes.values():
        count = 1
        for dim in dims:
            count *= dim
        parameters += count
    assert parameters == make_fixtures.TINY.parameter_count()


def test_tiny_imatrix_only_for_imat_files(fixture_ggufs):
    for variant, path in fixture_ggufs.files.items():
        metadata = make_fixtures.read_gguf_header(path).metadata
        assert ("quantize.imatrix.file" in metadata) == path.stem.endswith("-imat"), variant


def test_fixture_manifest_loads(fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path, apply_overlay=False)
    assert manifest.model.repo == fixture_ggufs.repo == "qreg-test/Tiny-Qwen3-Embedding-GGUF"
    assert manifest.model.parameters == make_fixtures.TINY.parameter_count()
    assert manifest.model.revision == ""
    assert [variant.name for variant in manifest.variants] == list(fixture_ggufs.files)


def test_fixture_manifest_pins_files(fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path, apply_overlay=False)
    for variant in manifest.variants:
        path = fixture_ggufs.dir / variant.file
        assert path == fixture_ggufs.files[variant.name]
        assert variant.size_bytes == path.stat().st_size, variant.name
        assert variant.sha256 == sha256_of(path), variant.name
        assert variant.size_mib == round(path.stat().st_size / MIB, 2), variant.name


def test_fixture_manifest_statuses(fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path, apply_overlay=False)
    statuses = {variant.name: variant.status for variant in manifest.variants}
    assert statuses["BF16"] == "reference"
    assert statuses["Q8_0"] == "recommended"
    assert statuses["Q4_K_M"] == "recommended"
    assert statuses["TQ1_0"] == "unusable"
    assert "metal" not in manifest.resolve("TQ1_0").backends
    assert manifest.resolve("Q4_K_M").imatrix is True
    assert manifest.resolve("Q6_K").imatrix is False


def test_index_matches_files(fixture_ggufs):
    for variant, entry in fixture_ggufs.index.items():
        path = Path(entry["path"])
        assert path == fixture_ggufs.files[variant]
        assert entry["size_bytes"] == path.stat().st_size


def test_cached_build_is_fast(fixture_ggufs, llama_bin_dir):
    started = time.monotonic()
    again = make_fixtures.build_tiny(llama_bin_dir)
    assert time.monotonic() - started < 1.0
    assert again.dir == fixture_ggufs.dir
    assert again.index == fixture_ggufs.index


def test_cache_key_changes_with_types(llama_bin_dir):
    default = make_fixtures.cache_key(llama_bin_dir, "tiny", *make_fixtures.TINY_TYPES)
    assert make_fixtures.cache_key(llama_bin_dir, "tiny", "Q8_0") != default
    assert make_fixtures.cache_key(llama_bin_dir, "tiny", *make_fixtures.TINY_TYPES) == default


# --- the command line -------------------------------------------------------


def test_cli_prints_dir_and_index(fixture_ggufs, llama_bin_dir):
    result = run_script("--llama-bin", str(llama_bin_dir), QREG_FIXTURE_CACHE=str(fixture_ggufs.dir.parent))
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    assert Path(first) == fixture_ggufs.dir
    assert json.loads(rest) == fixture_ggufs.index


def test_cli_unknown_type(fixture_ggufs, llama_bin_dir, tmp_path):
    before = {path: path.stat().st_mtime_ns for path in fixture_ggufs.dir.iterdir()}
    result = run_script("--llama-bin", str(llama_bin_dir), "--types", "Q8_0,Q9_9", "--out", str(tmp_path / "cache"))
    assert result.returncode == 1
    assert "unknown variant(s) Q9_9" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "cache").exists()
    assert {path: path.stat().st_mtime_ns for path in fixture_ggufs.dir.iterdir()} == before


def test_cli_missing_llama_bin(tmp_path):
    result = run_script("--llama-bin", str(tmp_path / "no-such-bin"), "--out", str(tmp_path / "cache"))
    assert result.returncode == 1
    assert "not found" in result.stderr
    assert "run scripts/build-llama-cpp" in result.stderr
    assert not list((tmp_path / "cache").glob("*/index.json"))


@pytest.mark.slow
def test_concurrent_builds_share_one(llama_bin_dir, tmp_path):
    # Two processes ask for the same uncached set at once: the lock makes the
    # second wait and reuse the first one's build, and no partial directory stays.
    args = [sys.executable, str(SCRIPT), "--llama-bin", str(llama_bin_dir), "--types", "Q8_0", "--out", str(tmp_path)]
    processes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    built = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert len(built) == 1
    assert sorted(path.name for path in built[0].iterdir()) == [
        "Tiny-Qwen3-Embedding-Q8_0.gguf",
        "fixture-manifest.toml",
        "index.json",
    ]


# --- the shape-faithful twin ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", TWIN_CHECKED_TYPES)
def test_twin_size_matches_card(twin_gguf_factory, variant):
    card = load_manifest(shipped_manifest_path(), apply_overlay=False).resolve(variant)
    path = twin_gguf_factory(variant)
    header = make_fixtures.read_gguf_header(path)
    assert header.metadata["general.file_type"] == expected_file_type(variant)

    size_mib = path.stat().st_size / MIB
    assert abs(size_mib - card.size_mib) <= SIZE_TOLERANCE_MIB, f"{variant}: {size_mib:.2f} MiB, card {card.size_mib}"


def run_check_sizes(*args: str) -> subprocess.CompletedProcess:
    script = SCRIPT.with_name("check-sizes")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=1800)


def test_check_sizes_unknown_type(llama_bin_dir):
    result = run_check_sizes("--llama-bin", str(llama_bin_dir), "--types", "Q9_9")
    assert result.returncode == 2
    assert "unknown variant(s) Q9_9" in result.stderr


@pytest.mark.slow
def test_check_sizes_reports_match(twin_gguf_factory, llama_bin_dir):
    twin_gguf_factory("Q8_0")
    result = run_check_sizes("--llama-bin", str(llama_bin_dir), "--types", "Q8_0,BF16", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in json.loads(result.stdout)}
    assert rows["Q8_0"]["bytes"] == twin_gguf_factory("Q8_0").stat().st_size
    assert rows["Q8_0"]["match"] is True
    # The card lists BF16 as "1.12 GB", so it matches at that precision only.
    assert rows["BF16"]["match"] is True
    assert rows["BF16"]["difference_mib"] < -1
