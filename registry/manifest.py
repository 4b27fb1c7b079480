"""Load and validate a model manifest, derive quality status, resolve variant names.

A manifest is a TOML file with a [model] table and one [[variants]] table per GGUF
file. docs/manifest.md describes every field and the status rule. The shipped
manifest is never edited: `qreg manifest refresh` writes an overlay under the user's
config directory whose digests, byte sizes and revision are applied on load.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from registry.errors import ManifestError, NotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

MIB = 1 << 20
SCHEMA_VERSION = 1
DEFAULT_MANIFEST_NAME = "qwen3-embedding-0.6b.toml"

STRATEGIES = ("standard", "k-quant", "importance-weighted", "reference")
STATUSES = ("unusable", "reference", "recommended", "not-for-production", "degraded", "ok")
BACKENDS = ("cpu", "cuda", "metal", "vulkan")

# Bits-per-weight bounds of the status rule (file bytes x 8 / parameters).
NOT_FOR_PRODUCTION_BELOW_BPW = 3.0
DEGRADED_BELOW_BPW = 4.0

# Stored bits per weight are rounded to 2 decimals; allow that rounding and no more.
BPW_TOLERANCE = 0.0051

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REVISION_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Perplexity:
    """The measurement setup behind the card's PPL figures."""

    tool: str
    corpus: str
    context: int
    chunks: int
    baseline_variant: str
    baseline_ppl: float


@dataclass(frozen=True)
class Model:
    """The model every variant of a manifest quantizes, with its hyper-parameters."""

    name: str
    repo: str
    revision: str
    architecture: str
    parameters: int
    context_length: int
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    feed_forward_length: int
    vocab_size: int
    pooling: str
    eos_token_id: int
    file_prefix: str
    perplexity: Perplexity | None = None


@dataclass(frozen=True)
class Variant:
    """One GGUF file of the model: its quantization, size, quality and digest."""

    name: str
    file: str
    size_mib: float
    bits_per_weight: float
    imatrix: bool
    strategy: str
    status: str
    backends: tuple[str, ...]
    sha256: str = ""
    size_bytes: int = 0
    ppl: float | None = None
    ppl_delta: float | None = None
    ppl_note: str = ""
    diverges: bool = False
    card_role: str = ""
    size_listed: str = ""
    note: str = ""

    @property
    def file_type(self) -> str:
        """Return llama.cpp's file type name (gguf.LlamaFileType member) for this variant."""
        if self.name in ("F32", "ALL_F32"):
            return "ALL_F32"
        return "MOSTLY_" + self.name

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "file": self.file,
            "size_mib": self.size_mib,
            "bits_per_weight": self.bits_per_weight,
            "imatrix": self.imatrix,
            "strategy": self.strategy,
            "status": self.status,
            "backends": list(self.backends),
            "sha256": self.sha256 or None,
            "size_bytes": self.size_bytes or None,
            "ppl": self.ppl,
            "ppl_delta": self.ppl_delta,
            "ppl_note": self.ppl_note or None,
            "diverges": self.diverges,
            "card_role": self.card_role or None,
            "size_listed": self.size_listed or None,
            "note": self.note or None,
        }
        return data


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated manifest and the path it came from."""

    path: Path
    model: Model
    variants: tuple[Variant, ...]
    overlay_path: Path | None = None
    _by_key: dict[str, Variant] = field(default_factory=dict, repr=False, compare=False)

    def resolve(self, name: str) -> Variant:
        """Find a variant by llama.cpp name, the card's squashed name or the file name.

        Raises NotFoundError with the closest names when nothing matches.
        """
        key = variant_key(name, self.model.file_prefix)
        variant = self._by_key.get(key)
        if variant is not None:
            return variant

        close = difflib.get_close_matches(key, list(self._by_key), n=3, cutoff=0.5)
        suggestions = [self._by_key[k].name for k in close]
        hint = (
            f"did you mean {', '.join(suggestions)}?"
            if suggestions
            else "run 'qreg list' to see the variants"
        )
        raise NotFoundError(f"unknown variant '{name}' in {self.path.name}", hint=hint)

    def by_file(self, file_name: str) -> Variant | None:
        for variant in self.variants:
            if variant.file == file_name:
                return variant
        return None


def variant_key(name: str, file_prefix: str = "") -> str:
    """Fold a variant spelling into a lookup key: Q4_K_M, q4km, Q4KM-imat and file names agree."""
    text = os.path.basename(name.strip())
    if text.lower().endswith(".gguf"):
        text = text[: -len(".gguf")]
    if file_prefix and text.lower().startswith(file_prefix.lower()):
        text = text[len(file_prefix):]
    text = text.lower()
    if text.endswith("-imat"):
        text = text[: -len("-imat")]
    return re.sub(r"[-_.\s]", "", text).upper()


def bits_per_weight(size_bytes: float, parameters: int) -> float:
    """Return file bits per weight: file bytes x 8 / parameters, as the model card computes it."""
    return size_bytes * 8 / parameters


def derive_status(*, name: str, bits: float, diverges: bool, card_role: str) -> str:
    """Apply the quality status rule; the first matching class wins (docs/manifest.md)."""
    if diverges:
        return "unusable"
    if name == "BF16":
        return "reference"
    if card_role:
        return "recommended"
    if bits < NOT_FOR_PRODUCTION_BELOW_BPW:
        return "not-for-production"
    if bits < DEGRADED_BELOW_BPW:
        return "degraded"
    return "ok"


def shipped_manifest_path() -> Path:
    """Return the manifest shipped with qreg (inside a wheel, or in a source checkout)."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (
        package_dir / "manifests" / DEFAULT_MANIFEST_NAME,
        package_dir.parent / "manifests" / DEFAULT_MANIFEST_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise ManifestError(
        f"shipped manifest {DEFAULT_MANIFEST_NAME} not found next to {package_dir}",
        hint="reinstall qreg or pass --manifest PATH",
    )


def overlay_path_for(manifest_path: Path) -> Path:
    """Return where `qreg manifest refresh` keeps the overlay for this manifest."""
    from registry.config import config_dir

    return config_dir() / "manifest-overlays" / manifest_path.name


def load_manifest(path: str | os.PathLike[str] | None = None, *, apply_overlay: bool = True) -> Manifest:
    """Load a manifest: the given path, else QREG_MANIFEST or the config file, else the shipped one.

    Raises ManifestError naming the file, the variant and the field on any problem.
    """
    if path is None:
        from registry.config import resolve

        path, _source = resolve("manifest")
    manifest_path = Path(path) if path is not None else shipped_manifest_path()
    data = _read_toml(manifest_path)

    overlay_file = overlay_path_for(manifest_path) if apply_overlay else None
    if overlay_file is not None and overlay_file.is_file():
        _merge_overlay(data, _read_toml(overlay_file), overlay_file)
    else:
        overlay_file = None

    return _build_manifest(manifest_path, data, overlay_file)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} not found",
                            hint="check --manifest, QREG_MANIFEST and 'qreg config get manifest'") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {path} is a directory, not a TOML file") from None
    except PermissionError:
        raise ManifestError(f"manifest {path} is not readable: permission denied") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"manifest {path} is not valid TOML: {error}") from None


def _merge_overlay(data: dict[str, Any], overlay: dict[str, Any], overlay_file: Path) -> None:
    """Copy revision, sha256 and size_bytes from an overlay into the manifest data."""
    revision = overlay.get("model", {}).get("revision")
    if isinstance(revision, str) and isinstance(data.get("model"), dict):
        data["model"]["revision"] = revision

    pinned = {item.get("name"): item for item in overlay.get("variants", []) if isinstance(item, dict)}
    for variant in data.get("variants", []):
        if not isinstance(variant, dict) or variant.get("name") not in pinned:
            continue
        entry = pinned[variant["name"]]
        if entry.get("file", variant.get("file")) != variant.get("file"):
            raise ManifestError(
                f"overlay {overlay_file}: variant {variant['name']}: file '{entry.get('file')}' "
                f"differs from the manifest's '{variant.get('file')}'",
                hint="run 'qreg manifest refresh' again",
            )
        for key in ("sha256", "size_bytes"):
            if key in entry:
                variant[key] = entry[key]


class _Fields:
    """Typed access to one TOML table that raises ManifestError naming file, table and field."""

    def __init__(self, path: Path, where: str, table: Any):
        self.path = path
        self.where = where
        if not isinstance(table, dict):
            self.fail(None, f"must be a table, got {type(table).__name__}")
        self.table = table

    def fail(self, key: str | None, problem: str) -> None:
        location = f"{self.where}: field '{key}'" if key else self.where
        raise ManifestError(f"manifest {self.path}: {location} {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                self.fail(key, "is missing")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML boolean is never a number here.
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"must be {_type_names(kinds)}, got boolean")
        if not isinstance(value, kinds):
            self.fail(key, f"must be {_type_names(kinds)}, got {type(value).__name__}")
        return value

    def positive_int(self, key: str) -> int:
        value = self.get(key, int)
        if value <= 0:
            self.fail(key, f"must be a positive integer, got {value}")
        return value

    def number(self, key: str, default: Any = ...) -> float | None:
        value = self.get(key, (int, float), default)
        return None if value is None else float(value)


def _type_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _build_manifest(path: Path, data: dict[str, Any], overlay_file: Path | None) -> Manifest:
    root = _Fields(path, "top level", data)
    schema = root.get("schema_version", int)
    if schema != SCHEMA_VERSION:
        root.fail("schema_version", f"is {schema}, but this qreg reads version {SCHEMA_VERSION}")

    model = _build_model(path, root.get("model", dict))
    raw_variants = root.get("variants", list)
    if not raw_variants:
        root.fail("variants", "must list at least one variant")

    variants: list[Variant] = []
    by_key: dict[str, Variant] = {}
    for index, raw in enumerate(raw_variants):
        variant = _build_variant(path, index, raw, model)
        key = variant_key(variant.name)
        if key in by_key:
            raise ManifestError(
                f"manifest {path}: variant {variant.name}: duplicate of variant {by_key[key].name}"
            )
        by_key[key] = variant
        variants.append(variant)

    for variant in variants:
        file_key = variant_key(variant.file, model.file_prefix)
        if file_key != variant_key(variant.name):
            raise ManifestError(
                f"manifest {path}: variant {variant.name}: field 'file' names "
                f"'{variant.file}', which does not match the variant name"
            )

    return Manifest(path=path, model=model, variants=tuple(variants), overlay_path=overlay_file, _by_key=by_key)


def _build_model(path: Path, table: Any) -> Model:
    fields = _Fields(path, "[model]", table)
    revision = fields.get("revision", str, "")
    if revision and not _REVISION_RE.match(revision):
        fields.fail("revision", f"must be a 40-hex commit id or empty, got '{revision}'")

    perplexity = None
    if "perplexity" in fields.table:
        ppl = _Fields(path, "[model.perplexity]", fields.table["perplexity"])
        perplexity = Perplexity(
            tool=ppl.get("tool", str),
            corpus=ppl.get("corpus", str),
            context=ppl.positive_int("context"),
            chunks=ppl.positive_int("chunks"),
            baseline_variant=ppl.get("baseline_variant", str),
            baseline_ppl=ppl.number("baseline_ppl"),
        )

    return Model(
        name=fields.get("name", str),
        repo=_repo_id(fields),
        revision=revision,
        architecture=fields.get("architecture", str),
        parameters=fields.positive_int("parameters"),
        context_length=fields.positive_int("context_length"),
        embedding_length=fields.positive_int("embedding_length"),
        block_count=fields.positive_int("block_count"),
        head_count=fields.positive_int("head_count"),
        head_count_kv=fields.positive_int("head_count_kv"),
        key_length=fields.positive_int("key_length"),
        value_length=fields.positive_int("value_length"),
        feed_forward_length=fields.positive_int("feed_forward_length"),
        vocab_size=fields.positive_int("vocab_size"),
        pooling=fields.get("pooling", str),
        eos_token_id=fields.get("eos_token_id", int),
        file_prefix=fields.get("file_prefix", str, ""),
        perplexity=perplexity,
    )


def _repo_id(fields: _Fields) -> str:
    repo = fields.get("repo", str)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo) or ".." in repo:
        fields.fail("repo", f"must be 'owner/name', got '{repo}'")
    return repo


def _build_variant(path: Path, index: int, raw: Any, model: Model) -> Variant:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = f"variant {name}" if isinstance(name, str) else f"variant #{index + 1}"
    fields = _Fields(path, where, raw)

    name = fields.get("name", str)
    file_name = fields.get("file", str)
    if "/" in file_name or "\\" in file_name or file_name in ("", ".", "..") or not file_name.endswith(".gguf"):
        fields.fail("file", f"must be a plain .gguf file name, got '{file_name}'")

    strategy = fields.get("strategy", str)
    if strategy not in STRATEGIES:
        fields.fail("strategy", f"must be one of {', '.join(STRATEGIES)}, got '{strategy}'")

    backends = tuple(fields.get("backends", list))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        fields.fail("backends", f"must list some of {', '.join(BACKENDS)}, got {list(backends)}")

    size_mib = fields.number("size_mib")
    if size_mib <= 0:
        fields.fail("size_mib", f"must be positive, got {size_mib}")
    bits = fields.number("bits_per_weight")
    computed = bits_per_weight(size_mib * MIB, model.parameters)
    if abs(bits - computed) > BPW_TOLERANCE:
        fields.fail("bits_per_weight", f"is {bits}, but size_mib gives {computed:.2f}")

    sha256 = fields.get("sha256", str).lower()
    if sha256 and not _SHA256_RE.match(sha256):
        fields.fail("sha256", "must be 64 hex digits or empty")
    size_bytes = fields.get("size_bytes", int)
    if size_bytes < 0:
        fields.fail("size_bytes", f"must be 0 (unknown) or positive, got {size_bytes}")

    diverges = fields.get("diverges", bool, False)
    card_role = fields.get("card_role", str, "")
    status = fields.get("status", str)
    expected = derive_status(name=name, bits=bits, diverges=diverges, card_role=card_role)
    if status != expected:
        fields.fail("status", f"is '{status}', but the status rule gives '{expected}'")

    return Variant(
        name=name,
        file=file_name,
        size_mib=size_mib,
        bits_per_weight=bits,
        imatrix=fields.get("imatrix", bool),
        strategy=strategy,
        status=status,
        backends=backends,
        sha256=sha256,
        size_bytes=size_bytes,
        ppl=fields.number("ppl", None),
        ppl_delta=fields.number("ppl_delta", None),
        ppl_note=fields.get("ppl_note", str, ""),
        diverges=diverges,
        card_role=card_role,
        size_listed=fields.get("size_listed", str, ""),
        note=fields.get("note", str, ""),
    )


def with_pins(variant: Variant, *, sha256: str, size_bytes: int) -> Variant:
    """Return a copy of a variant with a digest and exact size filled in."""
    return replace(variant, sha256=sha256, size_bytes=size_bytes)
