"""Build the `qreg inspect` report from a GGUF header: facts, tensor types, variant match, warnings.

`inspect_file` reads only the header (see registry.gguf_header), so it is cheap
enough to run before every serve. Hashing the file costs a full read and happens
only with verify=True.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from registry.gguf_header import ArrayValue, GGUFHeader, OmittedString, TensorInfo, gguf_constants, read_header
from registry.manifest import MIB, Manifest, Model, Variant, bits_per_weight, load_manifest

# A file whose size is within this of a variant's listed size_mib counts as that size.
# The card lists most sizes rounded to 0.01 MiB; see size_tolerance_bytes for the rest.
SIZE_TOLERANCE_BYTES = int(0.02 * MIB)
GIB = 1024 * MIB

LOW_BPW = 3.0  # the model card: below ~3 BPW the models are not for production use
TERNARY_TYPES = ("TQ1_0", "TQ2_0")

_KEYS = gguf_constants.Keys


@dataclass(frozen=True)
class ServingWarning:
    """A finding that would make serving this file go wrong, with the fix in one line."""

    code: str
    message: str
    fix: str

    def one_line(self) -> str:
        return f"{self.message}; fix: {self.fix}"


@dataclass(frozen=True)
class TypeStats:
    """One row of the tensor type histogram."""

    type: str
    tensors: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class VariantMatch:
    """The manifest variant a file is, and how sure the match is.

    confidence is "exact" (sha256), "high" (file type and size), "medium" (file type
    or size alone), "low" (file type, but a sha256 other than the pinned one) or "none".
    """

    variant: str | None
    confidence: str
    method: str | None
    reason: str
    candidates: tuple[str, ...] = ()
    other_model: bool = False


@dataclass(frozen=True)
class InspectReport:
    """The facts about a GGUF file that a user needs before serving it."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str | None
    name: str | None
    parameters: int
    tensor_data_bytes: int
    file_type: str | None
    file_type_id: int | None
    quantization_version: int | None
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    rope_freq_base: float | None
    pooling: str | None
    pooling_type_id: int | None
    tokenizer_model: str | None
    tokenizer_pre: str | None
    vocab_size: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    padding_token_id: int | None
    eos_token: str | None
    add_bos: bool | None
    add_eos: bool | None
    tensor_types: tuple[TypeStats, ...]
    variant_match: VariantMatch
    warnings: tuple[ServingWarning, ...]
    sha256: str | None = None
    header: GGUFHeader | None = field(default=None, repr=False, compare=False)

    @property
    def bits_per_weight(self) -> float | None:
        """Return file bytes x 8 / parameters, as the model card computes it."""
        return bits_per_weight(self.file_size, self.parameters) if self.parameters else None

    @property
    def tensor_bits_per_weight(self) -> float | None:
        """Return tensor data bytes x 8 / parameters, leaving out the header (metadata and vocabulary)."""
        return bits_per_weight(self.tensor_data_bytes, self.parameters) if self.parameters else None

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        """Return the report as JSON-ready data; docs/inspect.md documents every key."""
        data = _scalar_fields(self)
        data["bits_per_weight"] = _rounded(self.bits_per_weight)
        data["tensor_bits_per_weight"] = _rounded(self.tensor_bits_per_weight)
        data["tensor_types"] = [vars(row) for row in self.tensor_types]
        data["variant_match"] = {**vars(self.variant_match), "candidates": list(self.variant_match.candidates)}
        data["warnings"] = [vars(warning) for warning in self.warnings]
        if tensors and self.header is not None:
            data["tensors"] = [_tensor_dict(tensor) for tensor in self.header.tensors]
        return data


def inspect_file(
    path: str | os.PathLike[str],
    manifest: Manifest | None = None,
    verify: bool = False,
) -> InspectReport:
    """Read a GGUF file's header and build its report against a manifest.

    manifest defaults to load_manifest() (QREG_MANIFEST or the shipped one). With
    verify, the file is hashed so a variant can match by sha256.
    Raises the errors of registry.gguf_header.read_header.
    """
    header = read_header(path)
    if manifest is None:
        manifest = load_manifest()

    digest = None
    if verify:
        from registry.store import sha256_file

        digest = sha256_file(header.path)
    return build_report(header, manifest, digest)


def build_report(header: GGUFHeader, manifest: Manifest, sha256: str | None = None) -> InspectReport:
    """Build the report from an already read header; sha256 is the file's digest, if hashed."""
    facts = _header_facts(header)
    match = match_variant(header, manifest, sha256)
    report = InspectReport(
        **facts,
        tensor_types=tensor_type_histogram(header.tensors),
        variant_match=match,
        warnings=(),
        sha256=sha256,
        header=header,
    )
    # The warnings read the finished facts, so they are added in a second step.
    return replace(report, warnings=tuple(serving_warnings(report, manifest.model)))


def _header_facts(header: GGUFHeader) -> dict[str, Any]:
    meta = header.metadata
    tokens = meta.get(_KEYS.Tokenizer.LIST)
    eos_id = _int_or_none(meta.get(_KEYS.Tokenizer.EOS_ID))
    pooling_id = _int_or_none(header.arch_value(_KEYS.LLM.POOLING_TYPE))
    file_type_id = _int_or_none(meta.get(_KEYS.General.FILE_TYPE))
    return {
        "path": header.path,
        "file_size": header.file_size,
        "gguf_version": header.version,
        "architecture": header.architecture,
        "name": _str_or_none(meta.get(_KEYS.General.NAME)),
        "parameters": header.parameter_count,
        "tensor_data_bytes": header.tensor_data_bytes,
        "file_type": _enum_name(gguf_constants.LlamaFileType, file_type_id),
        "file_type_id": file_type_id,
        "quantization_version": _int_or_none(meta.get(_KEYS.General.QUANTIZATION_VERSION)),
        "context_length": _int_or_none(header.arch_value(_KEYS.LLM.CONTEXT_LENGTH)),
        "embedding_length": _int_or_none(header.arch_value(_KEYS.LLM.EMBEDDING_LENGTH)),
        "block_count": _int_or_none(header.arch_value(_KEYS.LLM.BLOCK_COUNT)),
        "head_count": _int_or_none(header.arch_value(_KEYS.Attention.HEAD_COUNT)),
        "head_count_kv": _int_or_none(header.arch_value(_KEYS.Attention.HEAD_COUNT_KV)),
        "key_length": _int_or_none(header.arch_value(_KEYS.Attention.KEY_LENGTH)),
        "value_length": _int_or_none(header.arch_value(_KEYS.Attention.VALUE_LENGTH)),
        "rope_freq_base": _float_or_none(header.arch_value(_KEYS.Rope.FREQ_BASE)),
        "pooling": _pooling_name(pooling_id),
        "pooling_type_id": pooling_id,
        "tokenizer_model": _str_or_none(meta.get(_KEYS.Tokenizer.MODEL)),
        "tokenizer_pre": _str_or_none(meta.get(_KEYS.Tokenizer.PRE)),
        "vocab_size": tokens.length if isinstance(tokens, ArrayValue) else None,
        "bos_token_id": _int_or_none(meta.get(_KEYS.Tokenizer.BOS_ID)),
        "eos_token_id": eos_id,
        "padding_token_id": _int_or_none(meta.get(_KEYS.Tokenizer.PAD_ID)),
        "eos_token": header.token_texts.get(eos_id) if eos_id is not None else None,
        "add_bos": _bool_or_none(meta.get(_KEYS.Tokenizer.ADD_BOS)),
        "add_eos": _bool_or_none(meta.get(_KEYS.Tokenizer.ADD_EOS)),
    }


def tensor_type_histogram(tensors: Iterable[TensorInfo]) -> tuple[TypeStats, ...]:
    """Count tensors, parameters and bytes per tensor type, most bytes first."""
    totals: dict[str, list[int]] = {}
    for tensor in tensors:
        row = totals.setdefault(tensor.type_name, [0, 0, 0])
        row[0] += 1
        row[1] += tensor.n_elements
        row[2] += tensor.n_bytes
    rows = [TypeStats(name, *counts) for name, counts in totals.items()]
    return tuple(sorted(rows, key=lambda row: (-row.bytes, row.type)))


def match_variant(header: GGUFHeader, manifest: Manifest, sha256: str | None = None) -> VariantMatch:
    """Name the manifest variant a file is: by sha256 if given, else by file type, then size."""
    if sha256:
        for variant in manifest.variants:
            if variant.sha256 and variant.sha256 == sha256:
                return VariantMatch(variant.name, "exact", "sha256", "sha256 equals the manifest's digest")

    model = manifest.model
    parameters = header.parameter_count
    if header.architecture != model.architecture or parameters != model.parameters:
        reason = (
            f"another model: {header.architecture or 'no architecture'} with {parameters:,} parameters, "
            f"but {model.name} is {model.architecture} with {model.parameters:,}"
        )
        return VariantMatch(None, "none", None, reason, other_model=True)

    file_type = _enum_name(gguf_constants.LlamaFileType, _int_or_none(header.metadata.get(_KEYS.General.FILE_TYPE)))
    by_type = [variant for variant in manifest.variants if variant.file_type == file_type]
    if by_type:
        return _match_by_file_type(by_type, header.file_size, file_type, sha256)
    return _match_by_size(manifest.variants, header.file_size, file_type)


def _match_by_file_type(by_type: list[Variant], file_size: int, file_type: str, sha256: str | None) -> VariantMatch:
    sized = [variant for variant in by_type if _size_matches(variant, file_size)]
    variant = (sized or by_type)[0]
    if sized:
        confidence, method = "high", "file type and size"
        reason = f"file type {file_type} and size match {variant.name}"
    else:
        confidence, method = "medium", "file type"
        difference = (file_size - _listed_size(variant)) / MIB
        reason = (
            f"file type {file_type} matches {variant.name}, but the size differs by {difference:+.2f} MiB: "
            "probably another build of this quantization"
        )

    if sha256 and variant.sha256:
        confidence = "low"
        reason += f"; but its sha256 differs from the manifest's digest of {variant.name}"
    elif sha256:
        reason += f"; the manifest pins no sha256 for {variant.name} (run 'qreg manifest refresh')"
    return VariantMatch(variant.name, confidence, method, reason, tuple(v.name for v in by_type))


def _match_by_size(variants: Iterable[Variant], file_size: int, file_type: str | None) -> VariantMatch:
    sized = [variant for variant in variants if _size_matches(variant, file_size)]
    type_text = f"file type {file_type} matches no variant" if file_type else "general.file_type is missing"
    names = tuple(variant.name for variant in sized)
    if len(sized) == 1:
        return VariantMatch(sized[0].name, "medium", "size", f"{type_text}; the size matches {names[0]}", names)
    if sized:
        return VariantMatch(None, "none", "size", f"{type_text}; the size matches {', '.join(names)}", names)
    return VariantMatch(None, "none", None, f"{type_text}, and no variant has this size")


def _size_matches(variant: Variant, file_size: int) -> bool:
    if variant.size_bytes:
        return variant.size_bytes == file_size
    return abs(file_size - variant.size_mib * MIB) <= size_tolerance_bytes(variant)


def size_tolerance_bytes(variant: Variant) -> int:
    """Return how far a file's size may be from the variant's size_mib and still match.

    The model card prints sizes like "378.11 MB" (MiB) but BF16 as "1.12 GB" (GiB), so
    a file matches within half of the last printed digit, and never less than 0.02 MiB.
    """
    listed = re.fullmatch(r"\s*\d+(?:\.(\d+))?\s*(MB|GB)\s*", variant.size_listed)
    if listed is None:
        return SIZE_TOLERANCE_BYTES
    decimals = len(listed.group(1) or "")
    unit = MIB if listed.group(2) == "MB" else GIB
    return max(SIZE_TOLERANCE_BYTES, int(unit * 0.5 / 10**decimals))


def _listed_size(variant: Variant) -> float:
    return variant.size_bytes or variant.size_mib * MIB


def serving_warnings(report: InspectReport, model: Model) -> list[ServingWarning]:
    """List what would make llama-server serve this file wrongly as `model`."""
    if report.variant_match.other_model:
        return [
            ServingWarning(
                "other-model",
                f"this file is not {model.name}, so the serving checks for {model.name} were skipped",
                "check that this is the file you meant, or pass --manifest for its model",
            )
        ]

    warnings = [
        *_pooling_warnings(report, model),
        *_eos_warnings(report, model),
        *_ternary_warnings(report),
    ]
    bpw = report.bits_per_weight
    if bpw is not None and bpw < LOW_BPW:
        warnings.append(
            ServingWarning(
                "low-bpw",
                f"{bpw:.2f} bits per weight is under {LOW_BPW:g}; below that, quality degrades steeply",
                "use a variant of 3 BPW or more, such as Q3_K_M or Q4_K_M",
            )
        )
    return warnings


def _pooling_warnings(report: InspectReport, model: Model) -> list[ServingWarning]:
    fix = f"qreg serve passes --pooling {model.pooling}; pass it too when running llama-server yourself"
    key = f"{report.architecture}.pooling_type"
    if report.pooling_type_id is None:
        message = f"{key} is missing, so llama-server will not pool by the {model.pooling} token as {model.name} needs"
        return [ServingWarning("pooling-missing", message, fix)]
    if report.pooling != model.pooling:
        message = f"{key} is {report.pooling}, but {model.name} needs {model.pooling}-token pooling"
        return [ServingWarning("pooling-not-last", message, fix)]
    return []


def _eos_warnings(report: InspectReport, model: Model) -> list[ServingWarning]:
    expected = model.eos_token_id
    warnings = []
    if report.add_eos is not True:
        state = "missing" if report.add_eos is None else "false"
        warnings.append(
            ServingWarning(
                "add-eos-off",
                f"tokenizer.ggml.add_eos_token is {state}, so llama-server will not append <|endoftext|> "
                f"(id {expected}), which {model.name} needs at the end of every input (<|im_end|> is no substitute)",
                "qreg serve passes --override-kv tokenizer.ggml.add_eos_token=bool:true, which makes "
                f"llama-server append it ('hello world' becomes [14990, 1879, {expected}])",
            )
        )

    if report.eos_token_id != expected:
        found = "missing" if report.eos_token_id is None else f"{report.eos_token_id} ({report.eos_token})"
        warnings.append(
            ServingWarning(
                "eos-id",
                f"tokenizer.ggml.eos_token_id is {found}, but {model.name} needs {expected} (<|endoftext|>)",
                f"pass --override-kv tokenizer.ggml.eos_token_id=int:{expected} to llama-server",
            )
        )
    return warnings


def _ternary_warnings(report: InspectReport) -> list[ServingWarning]:
    ternary = [row for row in report.tensor_types if row.type in TERNARY_TYPES]
    if not ternary:
        return []
    names = ", ".join(f"{row.tensors} {row.type}" for row in ternary)
    return [
        ServingWarning(
            "ternary-type",
            f"the file has {names} tensors; ternary types diverge on this architecture",
            "use a non-ternary variant, such as Q4_K_M",
        )
    ]


def _scalar_fields(report: InspectReport) -> dict[str, Any]:
    skipped = {"tensor_types", "variant_match", "warnings", "header"}
    data = {name: value for name, value in vars(report).items() if name not in skipped}
    data["path"] = str(report.path)
    return data


def _tensor_dict(tensor: TensorInfo) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "shape": list(tensor.shape),
        "type": tensor.type_name,
        "parameters": tensor.n_elements,
        "bytes": tensor.n_bytes,
        "offset": tensor.offset,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _pooling_name(pooling_id: int | None) -> str | None:
    if pooling_id is None:
        return None
    name = _enum_name(gguf_constants.PoolingType, pooling_id)
    return name.lower() if name else f"unknown ({pooling_id})"


def _enum_name(enum_type: type, value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return enum_type(value).name
    except ValueError:
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _str_or_none(value: Any) -> str | None:
    if isinstance(value, OmittedString):
        return f"<{value.length} bytes, not read>"
    return value if isinstance(value, str) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
