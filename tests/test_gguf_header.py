"""Tests of the bounded GGUF header reader: valid files, and every kind of bad input.

Small GGUF files are written here with gguf's GGUFWriter; crafted headers (huge
counts, unknown types) are packed byte by byte with struct. Every bad input is run
through the installed `qreg inspect` under an address-space limit, and must give one
line on stderr, its documented exit code and no traceback.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from registry import gguf_header
from registry.errors import GGUFError, NotFoundError, QregError, UsageError
from registry.gguf_header import ArrayValue, OmittedString, read_header

# The reader's memory must not depend on what a file declares. 256 MiB of address
# space is enough for Python and click (and numpy, should gguf's constants need the
# whole gguf package), and far below what any declared count in these tests needs.
ADDRESS_SPACE_LIMIT = 256 << 20
RUN_TIMEOUT_SECONDS = 60

VT = gguf.GGUFValueType


def write_gguf(
    path: Path,
    *,
    arch: str = "qwen3",
    metadata: dict | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    tokens: list[str] | None = None,
    quantized: dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]] | None = None,
) -> Path:
    """Write a GGUF file with GGUFWriter: key/values, float tensors, raw quantized tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        _add_value(writer, key, value)
    if tokens is not None:
        writer.add_token_list(tokens)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    for name, (qtype, raw) in (quantized or {}).items():
        writer.add_tensor(name, raw, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def head(tensor_count: int, kv_count: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count)


def packed_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def packed_kv(key: str, value_type: int, payload: bytes) -> bytes:
    return packed_string(key) + struct.pack("<I", value_type) + payload


def packed_tensor_info(name: str, shape: tuple[int, ...], type_id: int, offset: int) -> bytes:
    dims = struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
    return packed_string(name) + dims + struct.pack("<IQ", type_id, offset)


def sample_file(tmp_path: Path, name: str = "sample.gguf") -> Path:
    """A valid file: a few keys, a 40-token vocabulary, one F32 and one Q8_0 tensor."""
    tokens = [f"tok{i}" for i in range(40)]
    q8_rows = np.zeros((4, 34), dtype=np.uint8)  # 4 rows of one Q8_0 block (32 weights, 34 bytes)
    return write_gguf(
        tmp_path / name,
        metadata={
            "general.name": "sample",
            "general.file_type": 7,
            "qwen3.context_length": 512,
            "qwen3.pooling_type": 3,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.eos_token_id": 39,
            "tokenizer.ggml.add_eos_token": False,
        },
        tokens=tokens,
        tensors={"output_norm.weight": np.ones(32, dtype=np.float32)},
        quantized={"token_embd.weight": (gguf.GGMLQuantizationType.Q8_0, q8_rows)},
    )


def run_qreg(qreg_exe: str, *args: str, limit: int = ADDRESS_SPACE_LIMIT, prefix: tuple[str, ...] = ()):
    """Run the installed qreg under an address-space limit and a timeout."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*prefix, qreg_exe, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        preexec_fn=limit_memory,
        env=env,
    )


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("qreg: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- valid files ---------------------------------------------------------------


def test_read_sample_metadata(tmp_path):
    header = read_header(sample_file(tmp_path))
    assert header.version == 3
    assert header.architecture == "qwen3"
    assert header.metadata["general.name"] == "sample"
    assert header.metadata["qwen3.context_length"] == 512
    assert header.metadata["tokenizer.ggml.add_eos_token"] is False
    assert header.arch_value(gguf.Keys.LLM.POOLING_TYPE) == 3


def test_read_sample_tensors(tmp_path):
    header = read_header(sample_file(tmp_path))
    by_name = {tensor.name: tensor for tensor in header.tensors}
    assert by_name["token_embd.weight"].type_name == "Q8_0"
    assert by_name["token_embd.weight"].shape == (32, 4)
    assert by_name["token_embd.weight"].n_bytes == 4 * 34
    assert by_name["output_norm.weight"].n_bytes == 128
    assert header.parameter_count == 32 * 4 + 32
    assert header.tensor_data_bytes == 4 * 34 + 128
    assert header.data_offset % header.alignment == 0


def test_read_matches_gguf_reader(tmp_path):
    path = sample_file(tmp_path)
    header = read_header(path)
    reference = gguf.GGUFReader(path)
    assert header.data_offset == reference.data_offset
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    assert [t.n_bytes for t in header.tensors] == [int(t.n_bytes) for t in reference.tensors]


def test_short_array_keeps_values(tmp_path):
    header = read_header(sample_file(tmp_path))
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert tokens == ArrayValue("STRING", 40, tuple(f"tok{i}" for i in range(40)))
    assert header.token_texts == {39: "tok39"}


def test_long_string_array_skipped(tmp_path):
    tokens = [f"token-{i}-" + "x" * (i % 7) for i in range(5000)]
    path = write_gguf(tmp_path / "vocab.gguf", metadata={"tokenizer.ggml.eos_token_id": 4321}, tokens=tokens)
    header = read_header(path)
    assert header.metadata["tokenizer.ggml.tokens"] == ArrayValue("STRING", 5000, None)
    assert header.token_texts == {4321: tokens[4321]}


def test_long_numeric_array_skipped(tmp_path):
    path = write_gguf(tmp_path / "array.gguf", metadata={"scores": [float(i) for i in range(1000)], "dims": [1, 2]})
    header = read_header(path)
    assert header.metadata["scores"] == ArrayValue("FLOAT32", 1000, None)
    assert header.metadata["dims"].values == (1, 2)


def test_small_window_reads_same(tmp_path, monkeypatch):
    # Refills and strings that cross the window's end happen on every few items
    # with a 64-byte window, so this walks every branch of the string skipper.
    tokens = ["a" * (i % 90) for i in range(3000)]
    path = write_gguf(tmp_path / "window.gguf", metadata={"tokenizer.ggml.eos_token_id": 2999}, tokens=tokens)
    expected = read_header(path)
    monkeypatch.setattr(gguf_header, "WINDOW_BYTES", 64)
    header = read_header(path)
    assert header == expected
    assert header.token_texts == {2999: tokens[2999]}


def test_long_string_value_omitted(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_header, "MAX_KEPT_STRING_BYTES", 100)
    path = write_gguf(tmp_path / "long.gguf", metadata={"tokenizer.chat_template": "x" * 101, "short": "ok"})
    header = read_header(path)
    assert header.metadata["tokenizer.chat_template"] == OmittedString(101)
    assert header.metadata["short"] == "ok"


def test_string_budget_omits_later(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_header, "MAX_STRING_BYTES", 150)
    path = write_gguf(tmp_path / "budget.gguf", metadata={"first": "a" * 100, "second": "b" * 100})
    header = read_header(path)
    assert header.metadata["first"] == "a" * 100
    assert header.metadata["second"] == OmittedString(100)


def test_name_budget_raises(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "names.gguf", metadata={"k" * 40: 1, "q" * 40: 2})
    monkeypatch.setattr(gguf_header, "MAX_NAME_BYTES", 60)
    with pytest.raises(GGUFError) as caught:
        read_header(path)
    assert "the name of key #3 is 40 bytes, past the 60 bytes of names" in caught.value.one_line()


def test_qwen_vocabulary_read(llama_bin_dir):
    # ggml-vocab-qwen2.gguf carries the full Qwen2 tokenizer: 151,936 tokens, 151,387 merges.
    header = read_header(llama_bin_dir.parent / "ggml-vocab-qwen2.gguf")
    assert header.metadata["tokenizer.ggml.tokens"].length == 151_936
    assert header.metadata["tokenizer.ggml.merges"].length == 151_387
    assert header.token_texts[151_643] == "<|endoftext|>"


# --- bad inputs: library errors ------------------------------------------------


def test_missing_path_raises(tmp_path):
    with pytest.raises(NotFoundError) as caught:
        read_header(tmp_path / "absent.gguf")
    assert "absent.gguf: no such file" in caught.value.one_line()


def test_directory_raises(tmp_path):
    with pytest.raises(UsageError) as caught:
        read_header(tmp_path)
    assert "is a directory" in caught.value.one_line()


def test_fifo_raises_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(UsageError) as caught:
        read_header(fifo)
    assert "not a regular file" in caught.value.one_line()


def test_gguf_error_is_qreg_error():
    assert issubclass(GGUFError, QregError)
    assert GGUFError.exit_code == 5


# --- bad inputs: the installed command, under a memory limit ---------------------

# name -> (file bytes, message fragments). The fragments name the problem; the
# path is checked separately.
CRAFTED_FILES = {
    "empty": (b"", ["file is empty (0 bytes)"]),
    "not_gguf": (b"PK\x03\x04" + b"\0" * 60, ["not a GGUF file", "b'PK\\x03\\x04'"]),
    "short": (b"GG", ["not a GGUF file: only 2 bytes"]),
    "truncated_head": (b"GGUF" + struct.pack("<I", 3) + b"\0" * 6, ["truncated at the file header", "needs 24 bytes, the file has 14"]),
    "version_1": (head(0, 0, version=1), ["GGUF version 1 is not supported"]),
    "big_endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), ["big-endian"]),
    "kv_count_huge": (head(0, 1 << 63), ["declares 9,223,372,036,854,775,808 key/value pairs", "only 0 bytes remain"]),
    "tensor_count_huge": (head(1 << 63, 0), ["declares 9,223,372,036,854,775,808 tensors"]),
    "tensor_count_over_cap": (
        head(gguf_header.MAX_TENSORS + 1, 0) + b"\0" * (gguf_header.MIN_TENSOR_INFO_BYTES * (gguf_header.MAX_TENSORS + 1)),
        ["declares 65,537 tensors; qreg reads at most 65,536"],
    ),
    "array_count_huge": (
        head(0, 1) + packed_kv("a", VT.ARRAY, struct.pack("<IQ", VT.STRING, 1 << 63)),
        ["declares 9,223,372,036,854,775,808 string items in key 'a'", "only 0 bytes remain"],
    ),
    "numeric_array_huge": (
        head(0, 1) + packed_kv("a", VT.ARRAY, struct.pack("<IQ", VT.UINT64, 1 << 62)),
        ["declares 4,611,686,018,427,387,904 UINT64 items in key 'a'"],
    ),
    "string_length_huge": (
        head(0, 1) + packed_kv("general.name", VT.STRING, struct.pack("<Q", 1 << 63)),
        ["truncated at the string of key 'general.name'", "the file has 56"],
    ),
    "key_length_huge": (
        head(0, 1) + struct.pack("<Q", 1 << 63) + b"\0" * 8,
        ["truncated at the name of key #1", "the file has 40"],
    ),
    "array_item_length_huge": (
        head(0, 1) + packed_kv("a", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2)) + struct.pack("<QQ", 1 << 62, 0),
        ["truncated at the string of key 'a'"],
    ),
    "unknown_value_type": (head(0, 1) + packed_kv("a", 99, b"\0" * 8), ["key 'a' has unknown value type 99"]),
    "unknown_array_type": (
        head(0, 1) + packed_kv("a", VT.ARRAY, struct.pack("<IQ", 77, 1)),
        ["the array key 'a' has unknown value type 77"],
    ),
    "nested_array": (
        head(0, 1) + packed_kv("a", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1)),
        ["key 'a' is an array of arrays"],
    ),
    "duplicate_key": (
        head(0, 2) + packed_kv("a", VT.UINT8, b"\1") + packed_kv("a", VT.UINT8, b"\2"),
        ["duplicate key 'a'"],
    ),
    "unknown_tensor_type": (
        head(1, 0) + packed_tensor_info("w", (32,), 99, 0) + b"\0" * 200,
        ["tensor 'w' has unknown tensor type 99"],
    ),
    "too_many_dims": (
        head(1, 0) + packed_tensor_info("w", (1, 1, 1, 1, 1), 0, 0) + b"\0" * 64,
        ["tensor 'w' has 5 dimensions"],
    ),
    "tensor_past_end": (
        head(1, 0) + packed_tensor_info("w", (32,), 0, 1 << 40) + b"\0" * 64,
        ["truncated in tensor data", "tensor 'w' ends there", "needs 1,099,511,627,968 bytes"],
    ),
    "tensor_misaligned": (
        head(1, 0) + packed_tensor_info("w", (8,), 0, 4) + b"\0" * 64,
        ["tensor 'w' has offset 4, not a multiple of the alignment 32"],
    ),
    "tensors_overlap": (
        head(2, 0) + packed_tensor_info("a", (64,), 0, 0) + packed_tensor_info("b", (8,), 0, 32) + b"\0" * 512,
        ["tensor 'b' at offset 32 overlaps tensor 'a'"],
    ),
    "bad_alignment": (
        head(0, 1) + packed_kv("general.alignment", VT.UINT32, struct.pack("<I", 3)),
        ["general.alignment is 3, not a positive power of two"],
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CRAFTED_FILES))
def test_crafted_file_fails(case, tmp_path, qreg_exe):
    content, fragments = CRAFTED_FILES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(content)
    result = run_qreg(qreg_exe, "inspect", str(path))
    assert_one_line_error(result, 5, str(path), *fragments)
    assert path.read_bytes() == content


def test_truncated_tensor_data_fails(tmp_path, qreg_exe):
    full = sample_file(tmp_path)
    data = full.read_bytes()
    header = read_header(full)
    needed = header.data_offset + max(tensor.offset + tensor.n_bytes for tensor in header.tensors)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: header.data_offset + 100])
    line = assert_one_line_error(
        run_qreg(qreg_exe, "inspect", str(cut)),
        5,
        str(cut),
        "truncated in tensor data",
        f"needs {needed:,} bytes",
        f"the file has {header.data_offset + 100:,}",
    )
    assert "download it again" in line


def test_truncated_header_fails(tmp_path, qreg_exe):
    full = sample_file(tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:300])
    result = run_qreg(qreg_exe, "inspect", str(cut))
    assert_one_line_error(result, 5, str(cut), "truncated at", "the file has 300")


def test_directory_fails(tmp_path, qreg_exe):
    result = run_qreg(qreg_exe, "inspect", str(tmp_path))
    assert_one_line_error(result, 2, str(tmp_path), "is a directory, not a GGUF file")


def test_missing_path_fails(tmp_path, qreg_exe):
    missing = tmp_path / "nowhere" / "model.gguf"
    result = run_qreg(qreg_exe, "inspect", str(missing))
    assert_one_line_error(result, 3, str(missing), "no such file")


def test_unreadable_file_fails(tmp_path, qreg_exe):
    path = sample_file(tmp_path)
    before = digest(path)
    path.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads any file; dropping the capabilities that bypass file
        # permissions lets the real permission check fail.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing, so permissions cannot be enforced")
        prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
    try:
        result = run_qreg(qreg_exe, "inspect", str(path), prefix=prefix)
    finally:
        path.chmod(0o644)
    assert_one_line_error(result, 1, str(path), "cannot read: permission denied")
    assert digest(path) == before


def test_json_error_object(tmp_path, qreg_exe):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    result = run_qreg(qreg_exe, "inspect", "--json", str(path))
    assert result.returncode == 5
    assert '"type": "gguf"' in result.stdout
    assert '"exit_code": 5' in result.stdout
