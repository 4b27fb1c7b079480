#!/usr/bin/env python3
"""Build GGUF fixture files: a tiny Qwen3 embedding model and a shape-faithful twin.

Both models are written by gguf's GGUFWriter with random weights and the Qwen2
tokenizer of llama.cpp's models/ggml-vocab-qwen2.gguf, then quantized by the real
llama-quantize, with an importance matrix from the real llama-imatrix for the
variants the model card marks -imat. scripts/build-llama-cpp builds those tools.

The tiny model (2 layers, width 256, 151,669-row token embedding) loads in
llama-server and returns 256-dim embeddings; tests pull, inspect and serve it.
The twin has every tensor shape of Qwen3-Embedding-0.6B (595,776,512 parameters),
so its quantized files have the sizes of the real ones. scripts/check-sizes
compares those sizes with the shipped manifest.

Files are cached under ${QREG_FIXTURE_CACHE:-~/.cache/qreg/fixtures}/<key>/, where
the key is a digest of this script, the llama.cpp version and the variant set, so
editing this file or upgrading llama.cpp builds afresh. Builds run under a file
lock and are renamed into place, so concurrent pytest processes build once.

Usage: scripts/make_fixtures.py [--out DIR] [--twin] [--types T1,T2] [--llama-bin DIR]
Prints the fixture directory, then a JSON index: variant -> path, size, sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCRIPT_PATH = Path(__file__).resolve()
REPO_ROOT = SCRIPT_PATH.parent.parent

log = logging.getLogger("make_fixtures")

# Qwen3-Embedding-0.6B's token embedding has 151,669 rows; the tokenizer of
# ggml-vocab-qwen2.gguf lists 151,936 tokens, padded entries included.
VOCAB_SIZE = 151_669
EOS_TOKEN_ID = 151_643

TINY_TYPES = ("BF16", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "TQ1_0", "IQ2_XXS")
TINY_REPO = "qreg-test/Tiny-Qwen3-Embedding-GGUF"

# Statuses of the fixture manifest: card_role makes a variant "recommended",
# diverges makes it "unusable", so every class of the status rule occurs.
TINY_CARD_ROLES = {"Q8_0": "fixture pick", "Q4_K_M": "fixture pick"}
TINY_DIVERGING = {"TQ1_0"}

# llama-quantize and llama-imatrix get this long before the build is abandoned;
# the slowest step (IQ1_S of the twin on 2 cores) takes a few minutes.
TOOL_TIMEOUT_SECONDS = 3600

SEED = 20240605
WEIGHT_SCALE = 0.02
MIB = 1 << 20


class FixtureBuildError(Exception):
    """A fixture could not be built: a tool failed, or an input is missing or invalid."""


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a Qwen3 model, enough to lay out all of its tensors."""

    name: str
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    head_length: int
    feed_forward_length: int
    vocab_size: int = VOCAB_SIZE
    context_length: int = 32_768
    rope_freq_base: float = 1_000_000.0
    rms_eps: float = 1e-6

    @property
    def file_prefix(self) -> str:
        return self.name + "-"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Return (name, numpy shape) of every tensor, in the order llama.cpp's qwen3 loader lists them.

        A numpy shape is (rows, row length); GGUF stores it reversed. The output
        projection is tied to token_embd, so there is no output.weight.
        """
        width, q_width = self.embedding_length, self.head_count * self.head_length
        kv_width = self.head_count_kv * self.head_length
        tensors: list[tuple[str, tuple[int, ...]]] = [
            ("token_embd.weight", (self.vocab_size, width)),
            ("output_norm.weight", (width,)),
        ]
        for block in range(self.block_count):
            prefix = f"blk.{block}."
            tensors += [
                (prefix + "attn_norm.weight", (width,)),
                (prefix + "attn_q.weight", (q_width, width)),
                (prefix + "attn_k.weight", (kv_width, width)),
                (prefix + "attn_v.weight", (kv_width, width)),
                (prefix + "attn_output.weight", (width, q_width)),
                (prefix + "attn_k_norm.weight", (self.head_length,)),
                (prefix + "attn_q_norm.weight", (self.head_length,)),
                (prefix + "ffn_norm.weight", (width,)),
                (prefix + "ffn_gate.weight", (self.feed_forward_length, width)),
                (prefix + "ffn_down.weight", (width, self.feed_forward_length)),
                (prefix + "ffn_up.weight", (self.feed_forward_length, width)),
            ]
        return tensors

    def parameter_count(self) -> int:
        total = 0
        for _, shape in self.tensors():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


# Every quantized row of the tiny model is 256 or 512 long, a multiple of the
# 256-element K-quant and IQ blocks, so llama-quantize needs no fallback types.
TINY = ModelShape(
    name="Tiny-Qwen3-Embedding",
    embedding_length=256,
    block_count=2,
    head_count=4,
    head_count_kv=2,
    head_length=64,
    feed_forward_length=512,
)

# Qwen3-Embedding-0.6B: 595,776,512 parameters.
TWIN = ModelShape(
    name="Twin-Qwen3-Embedding-0.6B",
    embedding_length=1024,
    block_count=28,
    head_count=16,
    head_count_kv=8,
    head_length=128,
    feed_forward_length=3072,
)


@dataclass
class FixtureSet:
    """Built fixture files: one GGUF file per variant, and the fixture manifest when there is one."""

    dir: Path
    files: dict[str, Path]
    repo: str
    manifest_path: Path | None = None
    index: dict[str, dict[str, Any]] = field(default_factory=dict)


# --- locating llama.cpp -----------------------------------------------------


def find_llama_bin_dir() -> Path:
    """Return llama.cpp's bin directory, running scripts/build-llama-cpp (cached after the first build)."""
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "build-llama-cpp")],
        capture_output=True,
        text=True,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise FixtureBuildError(
            f"scripts/build-llama-cpp failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return Path(lines[-1])


def llama_version(bin_dir: Path) -> str:
    """Return the llama.cpp version of a bin directory laid out by scripts/build-llama-cpp.

    That script keys its cache by version (<cache>/<version>/bin); the binaries'
    own --version output carries no release number, so the directory name is used.
    """
    return bin_dir.resolve().parent.name


def vocab_path(bin_dir: Path) -> Path:
    path = bin_dir.parent / "ggml-vocab-qwen2.gguf"
    if not path.is_file():
        raise FixtureBuildError(f"tokenizer file {path} not found; run scripts/build-llama-cpp")
    return path


def tool(bin_dir: Path, name: str) -> Path:
    path = bin_dir / name
    if not os.access(path, os.X_OK):
        raise FixtureBuildError(f"{name} not found or not executable in {bin_dir}; run scripts/build-llama-cpp")
    return path


def check_llama_tools(bin_dir: Path) -> None:
    """Raise FixtureBuildError before any work when a tool or the tokenizer file is missing."""
    tool(bin_dir, "llama-quantize")
    tool(bin_dir, "llama-imatrix")
    vocab_path(bin_dir)


# --- cache layout and locking -----------------------------------------------


def cache_root(out: Path | None = None) -> Path:
    """Return the fixture cache root: --out, else QREG_FIXTURE_CACHE, else ~/.cache/qreg/fixtures.

    XDG_CACHE_HOME is ignored on purpose: the tests point it at a per-test
    directory, and the fixtures must outlive a test.
    """
    if out is not None:
        return out
    env = os.environ.get("QREG_FIXTURE_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "qreg" / "fixtures"


def cache_key(bin_dir: Path, *parts: str) -> str:
    digest = hashlib.sha256(SCRIPT_PATH.read_bytes())
    for part in (llama_version(bin_dir), *parts):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on path for the duration of the block, waiting for it if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the base GGUF file -----------------------------------------------------


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """Read the tokenizer.ggml.* keys of a vocab GGUF file as (key, value, type, sub type).

    The token lists are cut to vocab_size entries. add_bos/add_eos are set false
    and the EOS id to 151643, as in all 30 files of the model card.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    keys = []
    for key, item in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        value = item.contents()
        sub_type = item.types[1] if item.types[0] == gguf.GGUFValueType.ARRAY else None
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:vocab_size]
        keys.append((key, value, item.types[0], sub_type))

    overrides = {
        "tokenizer.ggml.eos_token_id": (EOS_TOKEN_ID, gguf.GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": (False, gguf.GGUFValueType.BOOL),
        "tokenizer.ggml.add_eos_token": (False, gguf.GGUFValueType.BOOL),
    }
    keys = [entry for entry in keys if entry[0] not in overrides]
    keys += [(key, value, value_type, None) for key, (value, value_type) in overrides.items()]
    return keys


def add_model_metadata(writer: Any, shape: ModelShape) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(shape.name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.embedding_length)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count_kv)
    writer.add_key_length(shape.head_length)
    writer.add_value_length(shape.head_length)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_pooling_type(gguf.PoolingType.LAST)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_base_gguf(path: Path, shape: ModelShape, tokenizer: list[tuple[str, Any, Any, Any]]) -> None:
    """Write a BF16 model with F32 norms, streaming tensor data so memory stays near one chunk.

    Weights are normal(0, 0.02) from a fixed seed and norms are 1, so embeddings are
    finite, not all alike, and the same on every build.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "qwen3")
    add_model_metadata(writer, shape)
    for key, value, value_type, sub_type in tokenizer:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)

    for name, dims in shape.tensors():
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            nbytes = dims[0] * dims[1] * 2
            writer.add_tensor_info(name, dims, np.dtype(np.uint16), nbytes, raw_dtype=gguf.GGMLQuantizationType.BF16)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    rng = np.random.default_rng(SEED)
    for name, dims in shape.tensors():
        _write_tensor(out, dims, rng, writer.data_alignment)
    writer.close()


def _write_tensor(out: Any, dims: tuple[int, ...], rng: Any, alignment: int) -> None:
    """Append one tensor's data at the next aligned offset, as GGUFWriter's tensor info expects."""
    import numpy as np

    _pad(out, alignment)
    if len(dims) == 1:
        np.ones(dims, dtype=np.float32).tofile(out)
        _pad(out, alignment)
        return

    rows, row_length = dims
    rows_per_chunk = max(1, (4 * MIB) // row_length)
    for start in range(0, rows, rows_per_chunk):
        count = min(rows_per_chunk, rows - start) * row_length
        values = rng.standard_normal(count, dtype=np.float32) * np.float32(WEIGHT_SCALE)
        # BF16 is the top half of an F32; adding 0x8000 first rounds to nearest.
        bits = (values.view(np.uint32) + np.uint32(0x8000)) >> np.uint32(16)
        bits.astype(np.uint16).tofile(out)
    _pad(out, alignment)


def _pad(out: Any, alignment: int) -> None:
    remainder = out.tell() % alignment
    if remainder:
        out.write(b"\0" * (alignment - remainder))


# --- reading a header back --------------------------------------------------


@dataclass
class GGUFHeader:
    """Scalar metadata (arrays as their length) and tensor infos (name, GGUF dims, GGML type) of a file."""

    metadata: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...], int]]


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _HeaderCursor:
    """Bounds-checked little-endian reads from the start of a GGUF file."""

    def __init__(self, path: Path, data: Any):
        self.path = path
        self.data = data
        self.offset = 0

    def fail(self, problem: str) -> None:
        raise FixtureBuildError(f"{self.path}: {problem} at byte {self.offset}")

    def take(self, fmt: str) -> Any:
        import struct

        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            self.fail("GGUF header truncated")
        value = struct.unpack_from("<" + fmt, self.data, self.offset)[0]
        self.offset += size
        return value

    def take_string(self) -> str:
        length = self.take("Q")
        if self.offset + length > len(self.data):
            self.fail(f"GGUF string of {length} bytes runs past the end")
        self.offset += length
        return bytes(self.data[self.offset - length:self.offset]).decode("utf-8", errors="replace")

    def take_value(self, value_type: int) -> Any:
        """Read one metadata value. An array is skipped item by item, and its length is returned."""
        if value_type == _STRING:
            return self.take_string()
        if value_type in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[value_type])
        if value_type != _ARRAY:
            self.fail(f"unknown GGUF value type {value_type}")
        item_type, count = self.take("I"), self.take("Q")
        for _ in range(count):
            self.take_value(item_type)
        return count


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor infos without keeping array items.

    gguf.GGUFReader decodes all 151,669 tokens (about 9 s); this skips arrays and
    takes well under a second. Raises FixtureBuildError when the file is not GGUF or
    its header runs past the end of the file.
    """
    import mmap

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _HeaderCursor(path, data)
        if bytes(data[:4]) != b"GGUF":
            cursor.fail(f"not a GGUF file (magic {bytes(data[:4])!r})")
        cursor.offset = 4
        cursor.take("I")
        tensor_count, kv_count = cursor.take("Q"), cursor.take("Q")

        metadata = {}
        for _ in range(kv_count):
            key = cursor.take_string()
            metadata[key] = cursor.take_value(cursor.take("I"))

        tensors = []
        for _ in range(tensor_count):
            name = cursor.take_string()
            dims = tuple(cursor.take("Q") for _ in range(cursor.take("I")))
            tensors.append((name, dims, cursor.take("I")))
            cursor.take("Q")
    return GGUFHeader(metadata=metadata, tensors=tensors)


# --- llama.cpp tools --------------------------------------------------------


def calibration_text(words: int = 1500) -> str:
    """Return a few KB of varied English text with numbers and some other scripts, from a fixed seed."""
    rng = random.Random(SEED)
    subjects = ["The company", "Revenue", "The index", "A student", "The server", "Our model", "The board",
                "Net income", "The solver", "Inflation", "The river", "A small bird", "Das Modell", "这个模型"]
    verbs = ["increased", "fell", "reported", "computed", "crossed", "returned", "estimated", "proved",
             "listed", "embedded", "quantized", "rose by", "dropped to", "measured"]
    objects = ["quarterly earnings", "the derivative of x^2", "a 10-K filing", "the cosine similarity",
               "interest rates", "the mountain pass", "a prime number", "cash flow", "the last token",
               "an embedding vector", "operating margin", "the integral from 0 to 1", "die Zinsen", "东京的天气"]
    sentences = []
    while sum(len(sentence.split()) for sentence in sentences) < words:
        number = rng.choice([f"{rng.randint(1, 999)}", f"{rng.uniform(0, 100):.2f}%", f"${rng.randint(1, 90)}M"])
        sentences.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ({number}).")
    paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paragraphs) + "\n"


def run_tool(args: list[str], what: str, cwd: Path) -> None:
    """Run a llama.cpp tool in cwd; raise FixtureBuildError with the end of its output when it fails."""
    log.info("%s (in %s): %s", what, cwd, " ".join(args))
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise FixtureBuildError(f"{what} timed out after {TOOL_TIMEOUT_SECONDS} s: {' '.join(args)}") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise FixtureBuildError(f"{what} failed (exit {result.returncode}): {tail}")


def _name_in(path: Path, directory: Path) -> str:
    """Return path relative to directory when it is directly inside, else absolute.

    llama-quantize records the imatrix and calibration file names in the output's
    metadata; short relative names keep the files free of temporary directory names.
    """
    return path.name if path.parent.resolve() == directory.resolve() else str(path.resolve())


def make_imatrix(bin_dir: Path, model: Path, out: Path, *, context: int, chunks: int) -> None:
    """Compute an importance matrix of model on the calibration text with llama-imatrix."""
    work = out.parent
    text = work / "calibration.txt"
    text.write_text(calibration_text(), encoding="utf-8")
    args = [
        str(tool(bin_dir, "llama-imatrix")), "-m", _name_in(model, work), "-f", text.name, "-o", out.name,
        "-c", str(context), "-b", str(context), "--chunks", str(chunks), "-t", str(os.cpu_count() or 1),
    ]
    try:
        run_tool(args, "llama-imatrix", work)
    finally:
        text.unlink(missing_ok=True)


def quantize(bin_dir: Path, base: Path, out: Path, variant: str, imatrix: Path | None) -> None:
    """Quantize base to variant with llama-quantize, writing a temporary file renamed to out."""
    work = base.parent
    partial = out.with_name(out.name + f".partial.{os.getpid()}")
    args = [str(tool(bin_dir, "llama-quantize"))]
    if imatrix is not None:
        args += ["--imatrix", _name_in(imatrix, work)]
    args += [base.name, _name_in(partial, work), variant, str(os.cpu_count() or 1)]
    try:
        run_tool(args, f"llama-quantize {variant}", work)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


# --- variants, manifest and index -------------------------------------------


def card_variants() -> dict[str, Any]:
    """Return the shipped manifest's variants by name; fixtures copy their strategy, imatrix and backends."""
    sys.path.insert(0, str(REPO_ROOT))
    from registry.manifest import load_manifest, shipped_manifest_path

    manifest = load_manifest(shipped_manifest_path(), apply_overlay=False)
    return {variant.name: variant for variant in manifest.variants}


def parse_types(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Split a comma-separated list of variant names, checked against the shipped manifest."""
    if not text:
        return default
    known = card_variants()
    types = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    unknown = [name for name in types if name not in known]
    if unknown or not types:
        raise FixtureBuildError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"use names of the shipped manifest, e.g. {', '.join(sorted(known)[:6])}"
        )
    return types


def file_name(shape: ModelShape, variant: str, imatrix: bool) -> str:
    return f"{shape.file_prefix}{variant}{'-imat' if imatrix else ''}.gguf"


def build_index(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {
        variant: {"path": str(path), "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for variant, path in files.items()
    }


def manifest_variant(variant: str, entry: dict[str, Any], card: Any, shape: ModelShape) -> dict[str, Any]:
    """Return the [[variants]] table of one fixture file, with size and BPW computed as the manifest checks them."""
    from registry.manifest import derive_status

    size_mib = round(entry["size_bytes"] / MIB, 2)
    bits = round(size_mib * MIB * 8 / shape.parameter_count(), 2)
    diverges = variant in TINY_DIVERGING
    card_role = TINY_CARD_ROLES.get(variant, "")
    table: dict[str, Any] = {
        "name": variant,
        "file": Path(entry["path"]).name,
        "size_mib": size_mib,
        "bits_per_weight": bits,
        "imatrix": card.imatrix,
        "strategy": card.strategy,
        "status": derive_status(name=variant, bits=bits, diverges=diverges, card_role=card_role),
        "backends": list(card.backends),
        "sha256": entry["sha256"],
        "size_bytes": entry["size_bytes"],
    }
    if diverges:
        table["diverges"] = True
    if card_role:
        table["card_role"] = card_role
    return table


def write_fixture_manifest(path: Path, shape: ModelShape, index: dict[str, dict[str, Any]]) -> None:
    """Write a manifest of the fixture files in the schema of manifests/qwen3-embedding-0.6b.toml."""
    import tomli_w

    cards = card_variants()
    model = {
        "name": shape.name,
        "repo": TINY_REPO,
        "revision": "",
        "file_prefix": shape.file_prefix,
        "architecture": "qwen3",
        "parameters": shape.parameter_count(),
        "context_length": shape.context_length,
        "embedding_length": shape.embedding_length,
        "block_count": shape.block_count,
        "head_count": shape.head_count,
        "head_count_kv": shape.head_count_kv,
        "key_length": shape.head_length,
        "value_length": shape.head_length,
        "feed_forward_length": shape.feed_forward_length,
        "vocab_size": shape.vocab_size,
        "pooling": "last",
        "eos_token_id": EOS_TOKEN_ID,
    }
    variants = [manifest_variant(name, entry, cards[name], shape) for name, entry in index.items()]
    document = {"schema_version": 1, "model": model, "variants": variants}
    header = f"# Fixture manifest written by scripts/make_fixtures.py for {shape.name}.\n\n"
    path.write_text(header + tomli_w.dumps(document), encoding="utf-8")


# --- the tiny fixture set ---------------------------------------------------


def build_tiny(bin_dir: Path, types: tuple[str, ...] = TINY_TYPES, out: Path | None = None) -> FixtureSet:
    """Return the tiny model's fixture set, building it into the cache first if it is missing."""
    check_llama_tools(bin_dir)
    root = cache_root(out)
    key = cache_key(bin_dir, "tiny", *types)
    final = root / key
    if not (final / "index.json").is_file():
        with file_lock(root / f"{key}.lock"):
            if not (final / "index.json").is_file():
                _build_tiny_into(bin_dir, types, root, final)
    return load_fixture_set(final, TINY_REPO)


def _build_tiny_into(bin_dir: Path, types: tuple[str, ...], root: Path, final: Path) -> None:
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.partial.", dir=root))
    work.chmod(0o755)  # mkdtemp makes it 0700; the renamed directory should read like the twin's
    try:
        cards = card_variants()
        base = work / file_name(TINY, "BF16", False)
        write_base_gguf(base, TINY, read_tokenizer(vocab_path(bin_dir), TINY.vocab_size))

        imatrix = work / "imatrix.gguf"
        if any(cards[name].imatrix for name in types):
            make_imatrix(bin_dir, base, imatrix, context=128, chunks=8)

        files = {}
        for variant in types:
            uses_imatrix = cards[variant].imatrix
            target = work / file_name(TINY, variant, uses_imatrix)
            if variant != "BF16":
                quantize(bin_dir, base, target, variant, imatrix if uses_imatrix else None)
            files[variant] = target
        imatrix.unlink(missing_ok=True)
        if "BF16" not in types:
            base.unlink()

        _finish_set(work, final, files, TINY)
        log.info("built %d tiny fixtures in %.1f s", len(files), time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish_set(work: Path, final: Path, files: dict[str, Path], shape: ModelShape) -> None:
    """Write the manifest and the index, then rename the work directory into place."""
    index = build_index(files)
    write_fixture_manifest(work / "fixture-manifest.toml", shape, index)
    for entry in index.values():
        entry["path"] = Path(entry["path"]).name
    (work / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


def load_fixture_set(directory: Path, repo: str) -> FixtureSet:
    """Read a built fixture directory's index.json; paths in it are relative to the directory."""
    index = json.loads((directory / "index.json").read_text(encoding="utf-8"))
    for entry in index.values():
        entry["path"] = str(directory / entry["path"])
    files = {variant: Path(entry["path"]) for variant, entry in index.items()}
    manifest = directory / "fixture-manifest.toml"
    return FixtureSet(
        dir=directory,
        files=files,
        repo=repo,
        manifest_path=manifest if manifest.is_file() else None,
        index=index,
    )


# --- the shape-faithful twin ------------------------------------------------


class Twin:
    """The twin's cache directory: the BF16 base and its imatrix once, quantized variants on request."""

    # llama-imatrix over 4 chunks of 128 tokens covers every tensor; more text only
    # changes weight choices inside a type, never a file size.
    IMATRIX_CONTEXT = 128
    IMATRIX_CHUNKS = 4

    def __init__(self, bin_dir: Path, out: Path | None = None):
        check_llama_tools(bin_dir)
        self.bin_dir = bin_dir
        root = cache_root(out)
        self.key = cache_key(bin_dir, "twin")
        self.dir = root / self.key
        self.lock_path = root / f"{self.key}.lock"
        self.cards = card_variants()

    @property
    def base(self) -> Path:
        return self.dir / file_name(TWIN, "BF16", False)

    @property
    def imatrix(self) -> Path:
        return self.dir / "imatrix.gguf"

    def path_of(self, variant: str) -> Path:
        if variant == "BF16":
            return self.base
        return self.dir / file_name(TWIN, variant, self.cards[variant].imatrix)

    def ensure_base(self) -> None:
        """Write the BF16 twin and its imatrix unless the cache has them."""
        if self.base.is_file() and self.imatrix.is_file():
            return
        with file_lock(self.lock_path):
            if self.base.is_file() and self.imatrix.is_file():
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            partial = self.base.with_name(self.base.name + f".partial.{os.getpid()}")
            try:
                write_base_gguf(partial, TWIN, read_tokenizer(vocab_path(self.bin_dir), TWIN.vocab_size))
                os.replace(partial, self.base)
            finally:
                partial.unlink(missing_ok=True)
            log.info("wrote the BF16 twin in %.1f s", time.monotonic() - started)
            self._make_imatrix()

    def _make_imatrix(self) -> None:
        started = time.monotonic()
        partial = self.imatrix.with_name(f"imatrix.gguf.partial.{os.getpid()}")
        try:
            make_imatrix(self.bin_dir, self.base, partial, context=self.IMATRIX_CONTEXT, chunks=self.IMATRIX_CHUNKS)
            os.replace(partial, self.imatrix)
        finally:
            partial.unlink(missing_ok=True)
        log.info("computed the twin's imatrix in %.1f s", time.monotonic() - started)

    def ensure(self, variant: str) -> Path:
        """Return the twin quantized to variant, quantizing it into the cache on first use."""
        if variant not in self.cards:
            raise FixtureBuildError(f"unknown variant {variant}; use a name of the shipped manifest")
        self.ensure_base()
        target = self.path_of(variant)
        if target.is_file():
            return target
        with file_lock(self.lock_path):
            if not target.is_file():
                self.quantize_to(variant, target)
        return target

    def quantize_to(self, variant: str, target: Path, *, use_imatrix: bool | None = None) -> None:
        """Quantize the BF16 twin to variant at target.

        The imatrix is used when use_imatrix is true, or, when it is None, when the
        card's file of that variant was quantized with one.
        """
        self.ensure_base()
        if use_imatrix is None:
            use_imatrix = self.cards[variant].imatrix
        imatrix = self.imatrix if use_imatrix else None
        started = time.monotonic()
        quantize(self.bin_dir, self.base, target, variant, imatrix)
        log.info("quantized the twin to %s in %.1f s", variant, time.monotonic() - started)

    def fixture_set(self, types: tuple[str, ...]) -> FixtureSet:
        files = {variant: self.ensure(variant) for variant in types}
        return FixtureSet(dir=self.dir, files=files, repo=TWIN.name, index=build_index(files))


# --- command line -----------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="cache root to build under (default: QREG_FIXTURE_CACHE or ~/.cache/qreg/fixtures)")
    parser.add_argument("--twin", action="store_true", help="build the shape-faithful twin of Qwen3-Embedding-0.6B instead of the tiny model")
    parser.add_argument("--types", help=f"comma-separated variants (default tiny: {','.join(TINY_TYPES)}; twin: Q8_0,Q4_K_M,Q2_K)")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp bin directory (default: the output of scripts/build-llama-cpp)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each tool run on stderr")
    return parser.parse_args(argv)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143), so cleanup blocks delete partial files and stop the running tool."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        bin_dir = args.llama_bin or find_llama_bin_dir()
        if args.twin:
            fixtures = Twin(bin_dir, args.out).fixture_set(parse_types(args.types, ("Q8_0", "Q4_K_M", "Q2_K")))
        else:
            fixtures = build_tiny(bin_dir, parse_types(args.types, TINY_TYPES), args.out)
    except FixtureBuildError as error:
        print(f"make_fixtures: {error}", file=sys.stderr)
        return 1
    print(fixtures.dir)
    print(json.dumps(fixtures.index, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
