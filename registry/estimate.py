"""How much memory llama-server needs to serve one variant with given settings.

The model follows llama.cpp 11434 (the version scripts/build-llama-cpp builds), one
function per term; docs/recommend.md gives the formula and benchmarks/memory.py
compares it with the peak resident memory (VmHWM) of the real llama-server:

    weights           the GGUF file, memory-mapped; on Linux llama.cpp maps it with
                      MAP_POPULATE, so every page is resident from load on
    weights_repacked  on the CPU backend, llama.cpp copies the matrix weights of some
                      quantization types into an interleaved layout (CPU_REPACK);
                      the copy is anonymous memory on top of the mapped file
    kv_cache          layers x cells x (K row + V row), allocated and zeroed at load
    output_buffer     llama.cpp's host buffer of logits and embeddings per output
                      token; in embedding mode every token of a logical batch (-b)
                      is an output
    compute_buffer    ggml's graph buffer for one micro-batch (-ub): the vocabulary
                      projection (logits for every token), a few hidden-state rows
                      per token, the attention mask
    runtime_overhead  the server process itself: code, tokenizer tables, HTTP threads

Memory that is allocated but never touched does not count against RAM on Linux, so
the token-dependent terms are computed for the input length that is planned for: by
default a full-context input (`settings.ctx` tokens), the worst case that `qreg
recommend` must plan for. An input longer than the batch runs as several batches
that reuse the same buffers, so those terms stop growing at the batch size. Only
the attention mask keeps growing with the input, because the last micro-batch
attends to every earlier token.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from registry.manifest import MIB, Model, Variant
from registry.serving import ServeSettings

log = logging.getLogger(__name__)

# ggml type name -> (elements per block, bytes per block), as in ggml's type traits.
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q8_0": (32, 34),
    "q2_k": (256, 84),
    "q3_k": (256, 110),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
    "iq1_s": (256, 50),
    "iq1_m": (256, 56),
    "iq2_xxs": (256, 66),
    "iq2_xs": (256, 74),
    "iq2_s": (256, 82),
    "iq3_xxs": (256, 98),
    "iq3_s": (256, 110),
    "iq4_nl": (32, 18),
    "iq4_xs": (256, 136),
    "tq1_0": (256, 54),
    "tq2_0": (256, 66),
    "mxfp4": (32, 17),
}

# Tensor types per variant: the token embedding's type, and each type's share of the
# parameters of the block matrices (attn_q/k/v/output, ffn_gate/up/down). Read with
# `llama-quantize --dry-run` (llama.cpp 11434) from a BF16 file with the real shapes of
# Qwen3-Embedding-0.6B; benchmarks/memory.py --type-mix prints this table again.
# The quantized files of that shape-faithful twin have the model card's sizes to the
# 0.01 MiB, so the card's files very likely share these mixes.
TYPE_MIX: dict[str, tuple[str, dict[str, float]]] = {
    "IQ1_S": ("q5_k", {"iq1_s": 0.7786, "iq2_xxs": 0.1333, "q2_k": 0.0881}),
    "IQ1_M": ("q5_k", {"iq1_m": 0.7786, "iq2_xxs": 0.1333, "q2_k": 0.0881}),
    "IQ2_XXS": ("q5_k", {"iq2_xxs": 0.9119, "q2_k": 0.0881}),
    "IQ2_XS": ("q5_k", {"iq2_xs": 0.9119, "q2_k": 0.0881}),
    "IQ2_S": ("q5_k", {"iq2_xs": 0.7786, "iq3_s": 0.2214}),
    "IQ2_M": ("q5_k", {"iq2_s": 0.7786, "iq3_s": 0.2214}),
    "IQ3_XXS": ("q5_k", {"iq2_s": 0.2, "iq3_s": 0.2, "q4_k": 0.0214, "iq3_xxs": 0.4, "q3_k": 0.1786}),
    "IQ3_XS": ("q6_k", {"iq3_xxs": 0.5, "iq3_s": 0.5}),
    "IQ3_S": ("q6_k", {"iq3_s": 1.0}),
    "IQ3_M": ("q6_k", {"iq3_s": 0.7786, "q4_k": 0.2214}),
    "IQ4_XS": ("q6_k", {"iq4_xs": 0.9786, "q5_k": 0.0214}),
    "IQ4_NL": ("q6_k", {"iq4_nl": 0.9786, "q5_k": 0.0214}),
    "Q2_K_S": ("q6_k", {"q2_k": 0.9786, "q4_k": 0.0214}),
    "Q2_K": ("q6_k", {"q2_k": 0.6, "q3_k": 0.4}),
    "Q3_K_S": ("q6_k", {"q3_k": 1.0}),
    "Q3_K_M": ("q6_k", {"q3_k": 0.6, "q4_k": 0.3881, "q5_k": 0.0119}),
    "Q3_K_L": ("q6_k", {"q3_k": 0.6, "q5_k": 0.4}),
    "Q4_0": ("q6_k", {"q4_0": 1.0}),
    "Q4_1": ("q6_k", {"q4_1": 1.0}),
    "Q4_K_S": ("q6_k", {"q4_k": 0.969, "q5_k": 0.031}),
    "Q4_K_M": ("q6_k", {"q4_k": 0.8667, "q6_k": 0.1333}),
    "Q5_0": ("q6_k", {"q5_0": 1.0}),
    "Q5_1": ("q6_k", {"q5_1": 1.0}),
    "Q5_K_S": ("q6_k", {"q5_k": 1.0}),
    "Q5_K_M": ("q6_k", {"q5_k": 0.8667, "q6_k": 0.1333}),
    "Q6_K": ("q6_k", {"q6_k": 1.0}),
    "Q8_0": ("q8_0", {"q8_0": 1.0}),
    "TQ1_0": ("q6_k", {"tq1_0": 1.0}),
    "TQ2_0": ("q6_k", {"tq2_0": 1.0}),
    "BF16": ("bf16", {"bf16": 1.0}),
}

# Types whose matrix weights ggml-cpu repacks (ggml/src/ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type), by the CPU feature that enables it.
REPACKED_TYPES: dict[str, frozenset[str]] = {
    "avx2": frozenset({"q4_0", "q4_k", "iq4_nl", "mxfp4"}),
    "avx512f": frozenset({"q2_k"}),
    "dotprod": frozenset({"q4_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "mxfp4", "q8_0"}),
    "i8mm": frozenset({"q4_0", "q4_k", "q5_k", "q6_k", "q8_0"}),
}

# llama.cpp rounds the context up to a multiple of 256 (llama_context constructor)
# and pads the number of KV cells a graph attends to, to a multiple of 256 (get_n_kv).
CONTEXT_PAD = 256

# Bytes per token of the compute buffer besides the logits and the mask: about five
# f32 hidden-state rows (20 x n_embd bytes) plus 40 bytes of token, position and
# output ids. Measured from llama-server's "compute buffer size" at ubatch 256 to
# 32768 on two shapes (n_embd 1024 and 256, n_ff 3072 and 512), exact to 0.1 MiB.
ACTIVATION_BYTES_PER_EMBD = 20
ACTIVATION_BYTES_PER_TOKEN = 40

# The llama-server process without model, KV cache or buffers: about 52 MiB of heap
# (tokenizer tables of the 151,669-token vocabulary, HTTP and worker threads) and
# 5-7 MiB of resident code. Measured on Linux x86-64 with the static build of
# scripts/build-llama-cpp, from VmHWM minus the other terms.
CPU_RUNTIME_OVERHEAD = 60 * MIB
# NOTE: with one slot, VmHWM exceeded the estimate by about 5 MiB at ctx 32768
# (docs/benchmarks.md). Some allocation that no term models grows by roughly
# 0.2 KiB per token of per-slot context. The 60 MiB above covers it up to ctx 8192.

# NOTE: not measured, because no GPU was available. The CUDA and Vulkan runtimes keep
# a context, kernels and pinned staging buffers in host memory and reserve some VRAM
# of their own. These are round figures chosen to be on the high side.
GPU_HOST_OVERHEAD = 512 * MIB
GPU_DEVICE_OVERHEAD = 384 * MIB

F32 = 4


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters the memory model needs."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int

    @classmethod
    def from_model(cls, model: Model) -> ModelShape:
        return cls(
            n_layer=model.block_count,
            n_embd=model.embedding_length,
            n_head=model.head_count,
            n_head_kv=model.head_count_kv,
            key_length=model.key_length,
            value_length=model.value_length,
            n_ff=model.feed_forward_length,
            n_vocab=model.vocab_size,
            n_ctx_train=model.context_length,
        )

    @property
    def block_matrix_parameters(self) -> int:
        """Return the parameters of all attention and feed-forward matrices."""
        q = self.n_embd * self.n_head * self.key_length
        k = self.n_embd * self.n_head_kv * self.key_length
        v = self.n_embd * self.n_head_kv * self.value_length
        o = self.n_head * self.value_length * self.n_embd
        ffn = 3 * self.n_embd * self.n_ff
        return self.n_layer * (q + k + v + o + ffn)


@dataclass(frozen=True)
class WeightLayout:
    """Byte counts of a variant's weights: file size, token embedding, block matrices by type.

    `output_type`/`output_bytes` describe a separate output projection; None means
    the output is tied to the token embedding, as in Qwen3-Embedding.
    """

    file_bytes: int
    token_embd_type: str
    token_embd_bytes: int
    matrix_bytes: dict[str, int]
    output_type: str | None = None
    output_bytes: int = 0
    source: str = "manifest"


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one variant needs, term by term, and which pool each term uses.

    `placement` maps each term to "ram" (host memory), "vram" (GPU memory) or
    "unified" (Apple Silicon: GPU-resident, in the one shared pool).
    """

    variant: str
    settings: ServeSettings
    request_tokens: int
    terms: dict[str, int]
    placement: dict[str, str]
    layout_source: str
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def ram_bytes(self) -> int:
        """Return what counts against host memory (on Apple Silicon, the unified pool)."""
        return sum(size for name, size in self.terms.items() if self.placement[name] in ("ram", "unified"))

    @property
    def vram_bytes(self) -> int:
        return sum(size for name, size in self.terms.items() if self.placement[name] == "vram")

    @property
    def gpu_resident_bytes(self) -> int:
        """Return what the GPU holds: VRAM on cuda/vulkan, Metal buffers on Apple Silicon."""
        return sum(size for name, size in self.terms.items() if self.placement[name] in ("vram", "unified"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "total_bytes": self.total_bytes,
            "ram_bytes": self.ram_bytes,
            "vram_bytes": self.vram_bytes,
            "request_tokens": self.request_tokens,
            "terms": dict(self.terms),
            "placement": dict(self.placement),
            "layout_source": self.layout_source,
            "notes": list(self.notes),
        }


def estimate_memory(
    model: Model | ModelShape,
    variant: Variant,
    settings: ServeSettings,
    *,
    file_size: int | None = None,
    layout: WeightLayout | None = None,
    request_tokens: int | None = None,
    cpu_features: frozenset[str] | None = None,
) -> MemoryEstimate:
    """Estimate llama-server's memory for one variant, term by term.

    `file_size` overrides the manifest's size. `layout` (from `read_weight_layout` on
    the file) replaces the manifest's type mix. `request_tokens` is the input length
    to plan for, by default `settings.ctx`. `cpu_features` decides CPU repacking;
    None reads this machine's.
    """
    shape = model if isinstance(model, ModelShape) else ModelShape.from_model(model)
    if layout is None:
        layout = layout_from_manifest(shape, variant, file_size)
    elif file_size is not None:
        layout = replace(layout, file_bytes=file_size)
    tokens = settings.ctx if request_tokens is None else request_tokens
    if cpu_features is None:
        cpu_features = this_cpu_features()

    notes: list[str] = []
    if layout.source == "guess":
        notes.append(f"tensor types of {variant.name} are unknown; CPU repacking is not counted")

    terms: dict[str, int] = {"weights": layout.file_bytes}
    if settings.backend == "cpu":
        terms["weights_repacked"] = repacked_weight_bytes(layout, cpu_features)
    terms["kv_cache"] = kv_cache_bytes(shape, settings)
    terms["output_buffer"] = output_buffer_bytes(shape, settings, tokens)
    terms["compute_buffer"] = compute_buffer_bytes(shape, settings, tokens)
    terms["runtime_overhead"] = CPU_RUNTIME_OVERHEAD

    placement = {name: "ram" for name in terms}
    if settings.backend in ("cuda", "vulkan"):
        _offload_to_gpu(terms, placement, layout, shape, settings, tokens)
    elif settings.backend == "metal":
        for name in ("weights", "kv_cache", "compute_buffer"):
            placement[name] = "unified"

    return MemoryEstimate(
        variant=variant.name,
        settings=settings,
        request_tokens=tokens,
        terms=terms,
        placement=placement,
        layout_source=layout.source,
        notes=tuple(notes),
    )


def _offload_to_gpu(
    terms: dict[str, int], placement: dict[str, str], layout: WeightLayout, shape: ModelShape, settings: ServeSettings, tokens: int
) -> None:
    """Move the offloaded terms to VRAM, for full offload (llama-server's default -ngl).

    llama.cpp keeps the input layer (token_embd, read by row lookups) in host memory
    and uploads every other weight, the tied output projection included. The mapped
    file is still counted in RAM: at load every page of it is resident.
    """
    output_bytes = layout.output_bytes if layout.output_type else layout.token_embd_bytes
    terms["weights_on_gpu"] = layout.file_bytes - layout.token_embd_bytes + output_bytes
    terms["host_compute_buffer"] = min(tokens, settings.ubatch) * shape.n_embd * F32
    terms["gpu_runtime_overhead"] = GPU_DEVICE_OVERHEAD
    terms["runtime_overhead"] += GPU_HOST_OVERHEAD

    placement.update(
        weights_on_gpu="vram",
        kv_cache="vram",
        compute_buffer="vram",
        gpu_runtime_overhead="vram",
        host_compute_buffer="ram",
    )


# The terms ---------------------------------------------------------------------------


def padded(value: int, multiple: int = CONTEXT_PAD) -> int:
    return -(-value // multiple) * multiple


def kv_cells(settings: ServeSettings) -> tuple[int, int]:
    """Return (streams, cells per stream) of llama.cpp's KV cache for llama-server's -c and -np.

    llama-server passes -np slots with a non-unified cache, so there is one stream per
    slot. llama_context pads -c to 256, divides it among the slots and pads each
    slot's share to 256 again.
    """
    total = padded(settings.total_context)
    per_slot = padded(total // settings.parallel)
    return settings.parallel, per_slot


def type_bytes(ggml_type: str, elements: int) -> int:
    """Return the bytes of `elements` values stored as a ggml type."""
    block_elements, block_bytes = GGML_BLOCKS[ggml_type]
    return -(-elements // block_elements) * block_bytes


def kv_cache_bytes(shape: ModelShape, settings: ServeSettings) -> int:
    """KV cache: per layer, cells x (n_head_kv x key_length K values + n_head_kv x value_length V values).

    Qwen3-Embedding attends causally, so llama.cpp allocates a KV cache (it skips it
    only for non-causal encoders such as BERT). K and V both use the cache type
    (-ctk/-ctv); quantized types store 32-value blocks (q8_0: 34 bytes, q4_0: 18).
    """
    streams, cells = kv_cells(settings)
    k_row = type_bytes(settings.cache_type, shape.n_head_kv * shape.key_length)
    v_row = type_bytes(settings.cache_type, shape.n_head_kv * shape.value_length)
    return shape.n_layer * streams * cells * (k_row + v_row)


def output_buffer_bytes(shape: ModelShape, settings: ServeSettings, tokens: int) -> int:
    """Output buffer: f32 logits (n_vocab) and embedding (n_embd) per output token.

    llama_context::output_reserve always reserves logits, and with embeddings on every
    token of a logical batch is an output. llama-server hands llama_decode at most -b
    tokens at a time, and the buffer is sized for the largest such batch (at least
    one row per slot) and zeroed when allocated. So a t-token input needs
    (n_vocab + n_embd) x min(t, -b) floats.
    """
    outputs = max(min(tokens, settings.batch), settings.parallel)
    return (shape.n_vocab + shape.n_embd) * F32 * outputs


def compute_buffer_bytes(shape: ModelShape, settings: ServeSettings, tokens: int) -> int:
    """Compute buffer for the largest micro-batch of a t-token input: logits, hidden-state rows, mask.

    A micro-batch has u = min(t, -ub) tokens. Qwen3's graph ends in the vocabulary
    projection even in embedding mode, so ggml's allocator peaks there with
    u x n_vocab f32 logits. The attention mask is n_kv x u, in f16 because flash
    attention is on (auto-enabled on every backend that qreg plans for). n_kv is the
    number of cells the last micro-batch attends to, which is the whole input padded
    to 256, at most the slot's cells. llama.cpp reserves the buffer for n_kv = all
    cells (sched_reserve), but a shorter input never touches the rest of the mask.
    """
    _, cells = kv_cells(settings)
    n_kv = min(cells, max(CONTEXT_PAD, padded(tokens)))
    micro_batch = min(tokens, settings.ubatch)
    logits = micro_batch * shape.n_vocab * F32
    activations = micro_batch * (ACTIVATION_BYTES_PER_EMBD * shape.n_embd + ACTIVATION_BYTES_PER_TOKEN)
    mask = n_kv * micro_batch * 2
    return logits + activations + mask


def repacked_weight_bytes(layout: WeightLayout, cpu_features: frozenset[str]) -> int:
    """Bytes of matrix weights that ggml-cpu copies into its repacked layout on this CPU.

    The token embedding is read by row lookups and never repacked, but a tied output
    projection is a matrix product over the same data and is repacked when its type is.
    """
    repacked = repacked_types(cpu_features)
    total = sum(size for ggml_type, size in layout.matrix_bytes.items() if ggml_type in repacked)

    output_type = layout.output_type or layout.token_embd_type
    output_bytes = layout.output_bytes if layout.output_type else layout.token_embd_bytes
    if output_type in repacked:
        total += output_bytes
    return total


def repacked_types(cpu_features: frozenset[str]) -> frozenset[str]:
    types: set[str] = set()
    for feature in cpu_features:
        types |= REPACKED_TYPES.get(feature, frozenset())
    return frozenset(types)


@functools.lru_cache(maxsize=1)
def this_cpu_features() -> frozenset[str]:
    """Return this machine's repack-relevant CPU features; unknown means every repacking feature.

    Assuming all of them when they cannot be read overestimates, which is the safe side.
    """
    from registry.device import detect_cpu_features

    features = detect_cpu_features()
    if features is None:
        return frozenset(REPACKED_TYPES)
    return features


# Weight layouts ----------------------------------------------------------------------


def file_bytes_of(variant: Variant) -> int:
    """Return the variant's file size: the pinned byte count, else the card's MiB."""
    if variant.size_bytes:
        return variant.size_bytes
    return int(variant.size_mib * MIB)


def layout_from_manifest(shape: ModelShape, variant: Variant, file_size: int | None = None) -> WeightLayout:
    """Lay out a variant's weights from the model's shape and TYPE_MIX, without the file."""
    file_bytes = file_size if file_size is not None else file_bytes_of(variant)
    mix = TYPE_MIX.get(variant.name)
    if mix is None:
        return WeightLayout(file_bytes=file_bytes, token_embd_type="unknown", token_embd_bytes=0, matrix_bytes={}, source="guess")

    token_embd_type, shares = mix
    parameters = shape.block_matrix_parameters
    matrix_bytes = {ggml_type: type_bytes(ggml_type, int(parameters * share)) for ggml_type, share in shares.items()}
    return WeightLayout(
        file_bytes=file_bytes,
        token_embd_type=token_embd_type,
        token_embd_bytes=type_bytes(token_embd_type, shape.n_vocab * shape.n_embd),
        matrix_bytes=matrix_bytes,
        source="manifest",
    )


def read_weight_layout(path: str | os.PathLike[str]) -> tuple[WeightLayout, ModelShape]:
    """Read a GGUF file's tensor types and hyper-parameters with gguf's reader.

    Raises GGUFError when the file is not a GGUF file of a model qreg can estimate.
    """
    from registry.errors import GGUFError

    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise GGUFError(f"cannot read GGUF file {path}: {error}") from None

    matrix_bytes: dict[str, int] = {}
    token_embd: tuple[str, int] | None = None
    output: tuple[str, int] | None = None
    for tensor in reader.tensors:
        ggml_type = tensor.tensor_type.name.lower()
        if tensor.name == "token_embd.weight":
            token_embd = (ggml_type, int(tensor.n_bytes))
        elif tensor.name == "output.weight":
            output = (ggml_type, int(tensor.n_bytes))
        elif tensor.name.startswith("blk.") and len(tensor.shape) >= 2 and int(tensor.shape[1]) > 1:
            matrix_bytes[ggml_type] = matrix_bytes.get(ggml_type, 0) + int(tensor.n_bytes)
    if token_embd is None:
        raise GGUFError(f"GGUF file {path} has no token_embd.weight tensor")

    layout = WeightLayout(
        file_bytes=Path(path).stat().st_size,
        token_embd_type=token_embd[0],
        token_embd_bytes=token_embd[1],
        matrix_bytes=matrix_bytes,
        output_type=output[0] if output else None,
        output_bytes=output[1] if output else 0,
        source="file",
    )
    return layout, _shape_from_reader(reader, path)


def _shape_from_reader(reader: Any, path: str | os.PathLike[str]) -> ModelShape:
    from registry.errors import GGUFError

    def value(key: str) -> Any:
        field_ = reader.fields.get(key)
        if field_ is None:
            raise GGUFError(f"GGUF file {path} has no metadata key {key}")
        if len(field_.data) != 1:
            return len(field_.data)
        return field_.parts[field_.data[0]][0].item()

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_embd = value(f"{arch}.embedding_length")
    n_head = value(f"{arch}.attention.head_count")
    head_length = n_embd // n_head
    key_length = value(f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in reader.fields else head_length
    value_length = value(f"{arch}.attention.value_length") if f"{arch}.attention.value_length" in reader.fields else head_length
    return ModelShape(
        n_layer=value(f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=value(f"{arch}.attention.head_count_kv"),
        key_length=key_length,
        value_length=value_length,
        n_ff=value(f"{arch}.feed_forward_length"),
        n_vocab=value("tokenizer.ggml.tokens"),
        n_ctx_train=value(f"{arch}.context_length"),
    )
