"""Tests of the inspect report: facts, tensor types, variant match, serving warnings, the CLI.

Matching and warnings are tested on GGUFHeader values built in the test against
the shipped manifest (a header is plain data), and end to end on files written
with GGUFWriter and on the fixture GGUFs quantized by llama-quantize.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import tomli_w

from registry import hub
from registry.gguf_header import ArrayValue, GGUFHeader, TensorInfo, read_header
from registry.inspect import build_report, inspect_file, match_variant, tensor_type_histogram
from registry.manifest import MIB, bits_per_weight, derive_status, load_manifest
from server_helpers import child_options
from test_gguf_header import assert_one_line_error, run_qreg, write_gguf

PARAMETERS = 595_776_512
QT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

GOOD_METADATA = {
    "general.architecture": "qwen3",
    "qwen3.pooling_type": 3,
    "tokenizer.ggml.eos_token_id": 151_643,
    "tokenizer.ggml.add_eos_token": True,
}


def make_header(
    *,
    file_type: int | None = FT.MOSTLY_Q4_K_M,
    size: int | None = None,
    parameters: int = PARAMETERS,
    metadata: dict | None = None,
    tensor_type: int = QT.Q4_K,
) -> GGUFHeader:
    """Build a header as read_header would return it for a file of the given facts."""
    meta = dict(GOOD_METADATA if metadata is None else metadata)
    if file_type is not None:
        meta["general.file_type"] = int(file_type)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT(tensor_type)]
    tensor = TensorInfo("weights", (parameters,), int(tensor_type), 0, parameters, parameters // block_size * type_size)
    return GGUFHeader(
        path=Path("model.gguf"),
        file_size=size if size is not None else int(378.11 * MIB),
        version=3,
        alignment=32,
        data_offset=4096,
        metadata=meta,
        tensors=(tensor,),
        token_texts={151_643: "<|endoftext|>", 151_645: "<|im_end|>"},
    )


def codes(report) -> list[str]:
    return [warning.code for warning in report.warnings]


def write_manifest(path: Path, *, parameters: int, variants: dict[str, tuple[int, str]]) -> Path:
    """Write a valid manifest for a model of `parameters`; variants maps name -> (size_bytes, sha256)."""
    entries = []
    for name, (size_bytes, sha256) in variants.items():
        size_mib = max(round(size_bytes / MIB, 2), 0.01)
        bits = round(bits_per_weight(size_mib * MIB, parameters), 2)
        entries.append(
            {
                "name": name,
                "file": f"Test-{name}.gguf",
                "size_mib": size_mib,
                "bits_per_weight": bits,
                "imatrix": False,
                "strategy": "standard",
                "status": derive_status(name=name, bits=bits, diverges=False, card_role=""),
                "backends": ["cpu"],
                "sha256": sha256,
                "size_bytes": size_bytes,
            }
        )
    model = {
        "name": "Test-Embedding",
        "repo": "qreg-test/Test-Embedding-GGUF",
        "architecture": "qwen3",
        "parameters": parameters,
        "context_length": 512,
        "embedding_length": 32,
        "block_count": 1,
        "head_count": 1,
        "head_count_kv": 1,
        "key_length": 32,
        "value_length": 32,
        "feed_forward_length": 64,
        "vocab_size": 40,
        "pooling": "last",
        "eos_token_id": 151_643,
        "file_prefix": "Test-",
    }
    path.write_text(tomli_w.dumps({"schema_version": 1, "model": model, "variants": entries}))
    return path


def q8_file(tmp_path: Path, name: str = "q8.gguf", metadata: dict | None = None) -> Path:
    """A small Q8_0 file: one 32x64 Q8_0 tensor and one F32 norm."""
    meta = {
        "general.file_type": int(FT.MOSTLY_Q8_0),
        "qwen3.pooling_type": 3,
        "tokenizer.ggml.eos_token_id": 151_643,
        "tokenizer.ggml.add_eos_token": False,
        **(metadata or {}),
    }
    return write_gguf(
        tmp_path / name,
        metadata=meta,
        tensors={"output_norm.weight": np.ones(32, dtype=np.float32)},
        quantized={"token_embd.weight": (QT.Q8_0, np.zeros((64, 34), dtype=np.uint8))},
    )


Q8_FILE_PARAMETERS = 32 * 64 + 32


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- facts and histogram ---------------------------------------------------------


def test_report_facts(tmp_path):
    path = q8_file(tmp_path)
    manifest = load_manifest()
    report = inspect_file(path, manifest)
    assert report.gguf_version == 3
    assert report.architecture == "qwen3"
    assert report.file_type == "MOSTLY_Q8_0"
    assert report.file_type_id == 7
    assert report.parameters == Q8_FILE_PARAMETERS
    assert report.pooling == "last"
    assert report.add_eos is False
    assert report.file_size == path.stat().st_size


def test_report_bits_per_weight(tmp_path):
    report = inspect_file(q8_file(tmp_path), load_manifest())
    assert report.bits_per_weight == pytest.approx(report.file_size * 8 / Q8_FILE_PARAMETERS)
    assert report.tensor_bits_per_weight == pytest.approx((64 * 34 + 128) * 8 / Q8_FILE_PARAMETERS)


def test_histogram_rows(tmp_path):
    header = read_header(q8_file(tmp_path))
    rows = {row.type: row for row in tensor_type_histogram(header.tensors)}
    assert set(rows) == {"Q8_0", "F32"}
    assert (rows["Q8_0"].tensors, rows["Q8_0"].parameters, rows["Q8_0"].bytes) == (1, 2048, 64 * 34)
    assert (rows["F32"].tensors, rows["F32"].parameters, rows["F32"].bytes) == (1, 32, 128)


def test_histogram_sorted_by_bytes():
    tensors = [
        TensorInfo("a", (32,), int(QT.F32), 0, 32, 128),
        TensorInfo("b", (256,), int(QT.Q4_K), 128, 256, 144),
        TensorInfo("c", (256,), int(QT.Q4_K), 288, 256, 144),
    ]
    assert [row.type for row in tensor_type_histogram(tensors)] == ["Q4_K", "F32"]


def test_json_keys_serializable(tmp_path):
    report = inspect_file(q8_file(tmp_path), load_manifest())
    data = report.to_dict(tensors=True)
    text = json.dumps(data)
    assert json.loads(text)["tensors"][0]["name"] == "output_norm.weight"
    assert data["vocab_size"] is None
    assert data["variant_match"]["confidence"] == "none"


# --- variant match against the shipped manifest -----------------------------------


def test_match_by_file_type_and_size():
    match = match_variant(make_header(), load_manifest())
    assert match.variant == "Q4_K_M"
    assert match.confidence == "high"
    assert match.method == "file type and size"


def test_match_size_tolerance():
    manifest = load_manifest()
    inside = match_variant(make_header(size=int(378.11 * MIB) + int(0.019 * MIB)), manifest)
    outside = match_variant(make_header(size=int(378.11 * MIB) + int(0.03 * MIB)), manifest)
    assert inside.confidence == "high"
    assert outside.variant == "Q4_K_M"
    assert outside.confidence == "medium"
    assert "+0.03 MiB" in outside.reason


def test_match_bf16_listed_in_gb():
    # The card lists BF16 as "1.12 GB", so a file 4.74 MiB under 1.12 GiB still matches.
    manifest = load_manifest()
    near = match_variant(make_header(file_type=FT.MOSTLY_BF16, size=1_197_624_832, tensor_type=QT.BF16), manifest)
    far = match_variant(make_header(file_type=FT.MOSTLY_BF16, size=int(1140 * MIB), tensor_type=QT.BF16), manifest)
    assert near.confidence == "high"
    assert far.confidence == "medium"


def test_match_shared_size_by_file_type():
    # Q3_K_S and IQ3_S are both listed at 307.89 MiB.
    manifest = load_manifest()
    size = int(307.89 * MIB)
    assert match_variant(make_header(file_type=FT.MOSTLY_IQ3_S, size=size), manifest).variant == "IQ3_S"
    assert match_variant(make_header(file_type=FT.MOSTLY_Q3_K_S, size=size), manifest).variant == "Q3_K_S"


def test_match_shared_size_without_file_type():
    match = match_variant(make_header(file_type=None, size=int(307.89 * MIB)), load_manifest())
    assert match.variant is None
    assert match.confidence == "none"
    assert set(match.candidates) == {"Q3_K_S", "IQ3_S"}
    assert "general.file_type is missing" in match.reason


def test_match_size_alone():
    match = match_variant(make_header(file_type=None), load_manifest())
    assert match.variant == "Q4_K_M"
    assert match.confidence == "medium"
    assert match.method == "size"


def test_match_other_parameter_count():
    match = match_variant(make_header(parameters=PARAMETERS + 256), load_manifest())
    assert match.variant is None
    assert match.other_model
    assert "595,776,768 parameters" in match.reason


def test_match_other_architecture():
    header = make_header(metadata={**GOOD_METADATA, "general.architecture": "llama"})
    match = match_variant(header, load_manifest())
    assert match.other_model
    assert "another model: llama" in match.reason


def test_match_sha256_exact(tmp_path):
    path = q8_file(tmp_path)
    manifest_path = write_manifest(
        tmp_path / "m.toml",
        parameters=PARAMETERS,
        variants={"Q8_0": (path.stat().st_size, sha256_of(path))},
    )
    # The digest matches even though the parameter count is not the manifest model's.
    report = inspect_file(path, load_manifest(manifest_path), verify=True)
    assert report.variant_match.variant == "Q8_0"
    assert report.variant_match.confidence == "exact"
    assert report.sha256 == sha256_of(path)


def test_match_sha256_differs(tmp_path):
    path = q8_file(tmp_path)
    manifest_path = write_manifest(
        tmp_path / "m.toml",
        parameters=Q8_FILE_PARAMETERS,
        variants={"Q8_0": (path.stat().st_size, "0" * 64)},
    )
    report = inspect_file(path, load_manifest(manifest_path), verify=True)
    assert report.variant_match.variant == "Q8_0"
    assert report.variant_match.confidence == "low"
    assert "sha256 differs" in report.variant_match.reason


def test_match_pinned_size_exact(tmp_path):
    path = q8_file(tmp_path)
    size = path.stat().st_size
    manifest_path = write_manifest(tmp_path / "m.toml", parameters=Q8_FILE_PARAMETERS, variants={"Q8_0": (size + 1, "")})
    report = inspect_file(path, load_manifest(manifest_path))
    assert report.variant_match.confidence == "medium"


# --- serving warnings ----------------------------------------------------------------


def test_no_warnings_when_ready():
    report = build_report(make_header(), load_manifest())
    assert report.warnings == ()


def test_warn_pooling_missing():
    metadata = {key: value for key, value in GOOD_METADATA.items() if key != "qwen3.pooling_type"}
    report = build_report(make_header(metadata=metadata), load_manifest())
    assert codes(report) == ["pooling-missing"]
    assert report.pooling is None
    assert "--pooling last" in report.warnings[0].fix


def test_warn_pooling_mean():
    report = build_report(make_header(metadata={**GOOD_METADATA, "qwen3.pooling_type": 1}), load_manifest())
    assert codes(report) == ["pooling-not-last"]
    assert "is mean" in report.warnings[0].message


@pytest.mark.parametrize("value", [False, None])
def test_warn_add_eos_off(value):
    metadata = {**GOOD_METADATA, "tokenizer.ggml.add_eos_token": value}
    if value is None:
        del metadata["tokenizer.ggml.add_eos_token"]
    report = build_report(make_header(metadata=metadata), load_manifest())
    assert codes(report) == ["add-eos-off"]
    assert report.add_eos is value
    warning = report.warnings[0]
    assert "<|endoftext|> (id 151643)" in warning.message
    assert "--override-kv tokenizer.ggml.add_eos_token=bool:true" in warning.fix
    assert "[14990, 1879, 151643]" in warning.fix


def test_warn_eos_im_end():
    report = build_report(make_header(metadata={**GOOD_METADATA, "tokenizer.ggml.eos_token_id": 151_645}), load_manifest())
    assert codes(report) == ["eos-id"]
    assert report.eos_token == "<|im_end|>"
    assert "is 151645 (<|im_end|>)" in report.warnings[0].message
    assert "eos_token_id=int:151643" in report.warnings[0].fix


def test_warn_ternary_type():
    header = make_header(file_type=FT.MOSTLY_TQ1_0, size=int(216.01 * MIB), tensor_type=QT.TQ1_0)
    report = build_report(header, load_manifest())
    assert "ternary-type" in codes(report)
    assert report.variant_match.variant == "TQ1_0"


def test_warn_low_bpw():
    report = build_report(make_header(file_type=FT.MOSTLY_IQ1_S, size=int(198.19 * MIB), tensor_type=QT.IQ1_S), load_manifest())
    assert codes(report) == ["low-bpw"]
    assert "2.79 bits per weight" in report.warnings[0].message


def test_other_model_skips_checks():
    metadata = {"general.architecture": "bert", "bert.pooling_type": 2}
    report = build_report(make_header(metadata=metadata), load_manifest())
    assert codes(report) == ["other-model"]


# --- the command ------------------------------------------------------------------------


def test_cli_human_output(tmp_path, qreg_exe):
    path = q8_file(tmp_path)
    result = run_qreg(qreg_exe, "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "MOSTLY_Q8_0 (7)" in result.stdout
    assert "tensor types" in result.stdout
    assert "variant: none" in result.stdout
    assert "warning [other-model]" in result.stdout


def test_cli_json_object(tmp_path, qreg_exe):
    path = q8_file(tmp_path)
    manifest_path = write_manifest(
        tmp_path / "m.toml",
        parameters=Q8_FILE_PARAMETERS,
        variants={"Q8_0": (path.stat().st_size, "")},
    )
    result = run_qreg(qreg_exe, "inspect", "--json", "--manifest", str(manifest_path), str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["variant_match"]["variant"] == "Q8_0"
    assert data["variant_match"]["confidence"] == "high"
    assert data["parameters"] == Q8_FILE_PARAMETERS
    assert [warning["code"] for warning in data["warnings"]] == ["add-eos-off"]
    assert "tensors" not in data


def test_cli_tensors_listed(tmp_path, qreg_exe):
    result = run_qreg(qreg_exe, "inspect", "--tensors", str(q8_file(tmp_path)))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("token_embd.weight")]
    assert rows == [["token_embd.weight", "32x64", "Q8_0", "2,176"]]


def test_cli_verify_digest(tmp_path, qreg_exe):
    path = q8_file(tmp_path)
    result = run_qreg(qreg_exe, "inspect", "--verify", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == sha256_of(path)


def test_cli_unknown_name(tmp_path, qreg_exe):
    result = run_qreg(qreg_exe, "inspect", "Q9_Z")
    assert_one_line_error(result, 3, "'Q9_Z' is neither a file nor a variant")


def test_cli_missing_gguf_name(tmp_path, qreg_exe):
    result = run_qreg(qreg_exe, "inspect", "absent.gguf")
    assert_one_line_error(result, 3, "absent.gguf: no such file")


def test_cli_variant_path_missing(tmp_path, qreg_exe):
    missing = tmp_path / "Qwen3-Embedding-0.6B-Q4_K_M-imat.gguf"
    result = run_qreg(qreg_exe, "inspect", str(missing))
    assert_one_line_error(result, 3, f"{missing}: no such file", "qreg inspect Q4_K_M")


# --- fixture GGUFs quantized by llama-quantize ---------------------------------------

# The type llama-quantize gives the bulk of the weight matrices for each variant.
MAIN_TENSOR_TYPE = {
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q4_K_M": "Q4_K",
    "Q3_K_M": "Q3_K",
    "Q2_K": "Q2_K",
    "IQ4_XS": "IQ4_XS",
    "TQ1_0": "TQ1_0",
    "IQ2_XXS": "IQ2_XXS",
}


@pytest.mark.parametrize("variant", sorted(MAIN_TENSOR_TYPE))
def test_fixture_report(variant, fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path)
    report = inspect_file(fixture_ggufs.files[variant], manifest)
    assert report.file_type == "MOSTLY_" + variant
    assert report.parameters == manifest.model.parameters
    assert report.vocab_size == manifest.model.vocab_size
    assert report.eos_token == "<|endoftext|>"
    assert report.variant_match.variant == variant
    assert report.variant_match.confidence == "high"


@pytest.mark.parametrize("variant", sorted(MAIN_TENSOR_TYPE))
def test_fixture_histogram(variant, fixture_ggufs):
    report = inspect_file(fixture_ggufs.files[variant], load_manifest(fixture_ggufs.manifest_path))
    header = report.header
    rows = {row.type: row for row in report.tensor_types}
    assert MAIN_TENSOR_TYPE[variant] in rows
    assert "F32" in rows  # the norms stay F32 in every variant
    assert sum(row.tensors for row in rows.values()) == len(header.tensors)
    assert sum(row.parameters for row in rows.values()) == report.parameters
    assert sum(row.bytes for row in rows.values()) == report.tensor_data_bytes

    # The data region contains every tensor plus at most one alignment of padding each.
    data_bytes = report.file_size - header.data_offset
    assert report.tensor_data_bytes <= data_bytes < report.tensor_data_bytes + header.alignment * len(header.tensors)


def test_fixture_histogram_matches_reader(fixture_ggufs):
    # gguf's own reader is the oracle here; it takes seconds on this vocabulary,
    # so it checks one variant only.
    path = fixture_ggufs.files["Q4_K_M"]
    expected: dict[str, list[int]] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        row = expected.setdefault(tensor.tensor_type.name, [0, 0, 0])
        row[0] += 1
        row[1] += int(tensor.n_elements)
        row[2] += int(tensor.n_bytes)
    report = inspect_file(path, load_manifest(fixture_ggufs.manifest_path))
    assert {row.type: [row.tensors, row.parameters, row.bytes] for row in report.tensor_types} == expected


@pytest.mark.parametrize("variant", ["Q4_K_M", "TQ1_0"])
def test_fixture_verify_exact(variant, fixture_ggufs):
    report = inspect_file(fixture_ggufs.files[variant], load_manifest(fixture_ggufs.manifest_path), verify=True)
    assert report.variant_match.variant == variant
    assert report.variant_match.confidence == "exact"


def test_fixture_warnings(fixture_ggufs):
    manifest = load_manifest(fixture_ggufs.manifest_path)
    q4 = inspect_file(fixture_ggufs.files["Q4_K_M"], manifest)
    tq1 = inspect_file(fixture_ggufs.files["TQ1_0"], manifest)
    assert q4.add_eos is False
    assert q4.pooling == "last"
    assert codes(q4) == ["add-eos-off"]
    assert codes(tq1) == ["add-eos-off", "ternary-type"]


def test_fixture_other_manifest(fixture_ggufs):
    report = inspect_file(fixture_ggufs.files["Q4_K_M"], load_manifest())
    assert report.variant_match.variant is None
    assert report.variant_match.other_model
    assert codes(report) == ["other-model"]


def test_fixture_cut_fails(fixture_ggufs, tmp_path, qreg_exe):
    source = fixture_ggufs.files["Q8_0"]
    data = source.read_bytes()
    cut = tmp_path / source.name
    cut.write_bytes(data[: len(data) * 60 // 100])
    result = run_qreg(qreg_exe, "inspect", str(cut))
    assert_one_line_error(result, 5, str(cut), "truncated in tensor data", f"the file has {len(data) * 60 // 100:,}")
    assert source.read_bytes() == data


def test_fixture_cli_json(fixture_ggufs, qreg_exe):
    path = fixture_ggufs.files["Q4_K_M"]
    result = run_qreg(qreg_exe, "inspect", "--json", "--manifest", str(fixture_ggufs.manifest_path), str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["file_type"] == "MOSTLY_Q4_K_M"
    assert data["variant_match"]["variant"] == "Q4_K_M"
    assert data["vocab_size"] == 151_669
    assert data["add_eos"] is False


# --- llama-server appends <|endoftext|> with the override the warning names ------------

HELLO_WORLD_IDS = [14990, 1879]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tokenize_with_server(server_bin: Path, model: Path, extra: list[str]) -> list[int]:
    """Start llama-server on loopback, tokenize 'hello world' with special tokens, stop it."""
    port = free_port()
    command = [str(server_bin), "-m", str(model), "--embedding", "--pooling", "last"]
    command += ["--host", "127.0.0.1", "--port", str(port), "-c", "512", "-t", "1", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **child_options())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process)
        body = json.dumps({"content": "hello world", "add_special": True}).encode()
        request = urllib.request.Request(f"{base}/tokenize", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["tokens"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"llama-server exited with {process.returncode}: {process.stderr.read()[-2000:]!r}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"llama-server at {base} not healthy after {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_override_appends_eos(fixture_ggufs, llama_server_bin):
    model = fixture_ggufs.files["Q4_K_M"]
    assert inspect_file(model, load_manifest(fixture_ggufs.manifest_path)).add_eos is False

    plain = tokenize_with_server(llama_server_bin, model, [])
    overridden = tokenize_with_server(
        llama_server_bin, model, ["--override-kv", "tokenizer.ggml.add_eos_token=bool:true"]
    )
    assert plain == HELLO_WORLD_IDS
    assert overridden == HELLO_WORLD_IDS + [151_643]


# --- the shape-faithful twin of Qwen3-Embedding-0.6B ---------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("variant", ["Q4_K_M", "BF16"])
def test_twin_matched_by_size(variant, twin_gguf_factory, qreg_exe):
    path = twin_gguf_factory(variant)
    result = run_qreg(qreg_exe, "inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["parameters"] == PARAMETERS
    assert data["file_type"] == "MOSTLY_" + variant
    assert data["variant_match"]["variant"] == variant
    assert data["variant_match"]["confidence"] == "high"
    assert data["variant_match"]["method"] == "file type and size"


# --- a variant name selects the pulled file ---------------------------------------------


def test_cli_variant_not_pulled(fixture_ggufs, qreg_exe):
    result = run_qreg(qreg_exe, "inspect", "--manifest", str(fixture_ggufs.manifest_path), "Q8_0")
    assert_one_line_error(result, 3, "variant Q8_0 is not pulled", "run 'qreg pull Q8_0'")


def test_cli_variant_pulled(gguf_mirror, fixture_ggufs, qreg_exe):
    manifest = load_manifest(fixture_ggufs.manifest_path)
    pulled = hub.pull(manifest, "Q4_K_M").path
    result = run_qreg(qreg_exe, "inspect", "--json", "--manifest", str(fixture_ggufs.manifest_path), "q4km")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["path"] == str(pulled)
    assert data["variant_match"]["variant"] == "Q4_K_M"


def test_cli_variant_changed_after_pull(gguf_mirror, fixture_ggufs, qreg_exe):
    manifest = load_manifest(fixture_ggufs.manifest_path)
    pulled = hub.pull(manifest, "Q4_K_M").path
    before = pulled.stat().st_size
    with open(pulled, "r+b") as handle:  # flip one byte in the middle, keeping the size
        handle.seek(before // 2)
        byte = handle.read(1)
        handle.seek(before // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))

    result = run_qreg(qreg_exe, "inspect", "--manifest", str(fixture_ggufs.manifest_path), "Q4_K_M")
    assert_one_line_error(result, 3, "changed since it was verified", "qreg verify Q4_K_M")
    assert pulled.stat().st_size == before
