"""Serving settings shared by `qreg recommend` (memory estimate) and `qreg serve` (llama-server flags).

`ctx` is the per-slot context: the longest input one request may have. llama-server's
`-c` is the total context, which it divides evenly among its `-np` slots, so
`-c = ctx x parallel`.

`-b` and `-ub` (logical batch and micro-batch) need not cover a whole input.
Qwen3-Embedding attends causally and pools the last token, so llama-server 11434
splits a longer input over several micro-batches and returns the same vector (the
KV cache carries the earlier tokens). The micro-batch decides memory instead,
because in embedding mode llama.cpp keeps f32 logits over the whole vocabulary for
every token of a batch, twice, about 1.16 MiB per token for Qwen's 151,669 tokens.
qreg therefore passes a small micro-batch, `-b = -ub = min(ctx, ubatch)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.errors import UsageError
from registry.manifest import BACKENDS

CACHE_TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_CTX = 8192
DEFAULT_PARALLEL = 1
DEFAULT_CACHE_TYPE = "f16"
DEFAULT_BACKEND = "cpu"
# llama-server's own default -ub. In benchmarks/serve.py --ubatch-sweep (twin Q4_K_M,
# 2 x86-64 cores) sizes from 64 to 2048 embedded at the same speed within 14 %, and
# each micro-batch token costs about 1.16 MiB.
DEFAULT_UBATCH = 512
# The smallest per-slot context that can embed anything: llama-server rejects an input
# of n_ctx tokens or more, and the shortest input is one token plus EOS.
MIN_CTX = 3


@dataclass(frozen=True)
class ServeSettings:
    """The llama-server settings that decide memory: per-slot context, slots, KV cache type, backend, micro-batch.

    `ubatch_size` is the requested micro-batch size. `ubatch` and `batch` are the
    values passed to llama-server, capped at the per-slot context.
    """

    ctx: int = DEFAULT_CTX
    parallel: int = DEFAULT_PARALLEL
    cache_type: str = DEFAULT_CACHE_TYPE
    backend: str = DEFAULT_BACKEND
    ubatch_size: int = DEFAULT_UBATCH
    # The source of each value ("option", "env", "config", "detected" or "default"), ignored by ==.
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_options(
        cls,
        *,
        ctx: int | None = None,
        parallel: int | None = None,
        cache_type: str | None = None,
        backend: str | None = None,
        detected_backend: str | None = None,
        model_context: int | None = None,
        ubatch: int | None = None,
    ) -> ServeSettings:
        """Resolve each setting (option > environment > config file > default) and validate it.

        `model_context` is the model's trained context (the manifest's context_length);
        when given, ctx may not exceed it. `backend` has no setting of its own: without
        it, `detected_backend` (from registry.device) is used, else "cpu". Raises
        UsageError (exit 2).
        """
        from registry.config import resolve

        ctx_value, ctx_source = resolve("serve.ctx", ctx)
        parallel_value, parallel_source = resolve("serve.parallel", parallel)
        cache_value, cache_source = resolve("serve.cache_type", cache_type)
        ubatch_value, ubatch_source = resolve("serve.ubatch", ubatch)
        if backend is not None:
            backend_value, backend_source = backend, "option"
        elif detected_backend is not None:
            backend_value, backend_source = detected_backend, "detected"
        else:
            backend_value, backend_source = DEFAULT_BACKEND, "default"

        settings = cls(
            ctx=validate_ctx(ctx_value, model_context, ctx_source),
            parallel=validate_parallel(parallel_value, parallel_source),
            cache_type=validate_cache_type(cache_value, cache_source),
            backend=validate_backend(backend_value),
            ubatch_size=validate_ubatch(ubatch_value, ubatch_source),
            sources={
                "ctx": ctx_source,
                "parallel": parallel_source,
                "cache_type": cache_source,
                "backend": backend_source,
                "ubatch": ubatch_source,
            },
        )
        return settings

    @property
    def total_context(self) -> int:
        """Return llama-server's `-c`: per-slot context times parallel slots."""
        return self.ctx * self.parallel

    @property
    def ubatch(self) -> int:
        """Return the micro-batch size (`-ub`): `ubatch_size`, at most the per-slot context."""
        return min(self.ctx, self.ubatch_size)

    @property
    def batch(self) -> int:
        """Return the logical batch size (`-b`), equal to the micro-batch.

        llama-server 11434 lowers `-b` to `-ub` in embedding mode anyway.
        """
        return self.ubatch

    @property
    def flash_attn(self) -> str | None:
        """Return `-fa` value: "on" when the V cache is quantized (llama.cpp needs it), else None."""
        return "on" if self.cache_type != "f16" else None

    def to_dict(self) -> dict[str, object]:
        return {
            "ctx": self.ctx,
            "parallel": self.parallel,
            "cache_type": self.cache_type,
            "backend": self.backend,
            "total_context": self.total_context,
            "ubatch": self.ubatch,
            "batch": self.batch,
            "ubatch_size": self.ubatch_size,
            "flash_attn": self.flash_attn or "auto",
            "sources": dict(self.sources),
        }


def _named(source: str, option: str, setting: str) -> str:
    # Name the thing the user typed or set, so the error points at the right place.
    if source == "option":
        return option
    return f"setting {setting} (from {source})"


def validate_ctx(value: int, model_context: int | None, source: str = "option") -> int:
    """Check a per-slot context: MIN_CTX to the model's trained context, in tokens."""
    where = _named(source, "--ctx", "serve.ctx")
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_CTX:
        upper = f" to {model_context}" if model_context else " or more"
        raise UsageError(
            f"invalid {where} {value!r}: the per-slot context must be {MIN_CTX}{upper} tokens "
            f"(the shortest input, one token plus EOS, needs {MIN_CTX})"
        )
    if model_context is not None and value > model_context:
        raise UsageError(
            f"invalid {where} {value}: the model's context is {model_context} tokens",
            hint=f"use a per-slot context from {MIN_CTX} to {model_context}",
        )
    return value


def validate_parallel(value: int, source: str = "option") -> int:
    """Check the number of parallel slots (llama-server's -np): at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        where = _named(source, "--parallel", "serve.parallel")
        raise UsageError(f"invalid {where} {value!r}: the number of parallel slots must be 1 or more")
    return value


def validate_ubatch(value: int, source: str = "option") -> int:
    """Check a micro-batch size in tokens (llama-server's -ub): at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        where = _named(source, "--ubatch", "serve.ubatch")
        raise UsageError(f"invalid {where} {value!r}: the micro-batch size must be 1 or more tokens")
    return value


def validate_cache_type(value: str, source: str = "option") -> str:
    """Check a KV cache type (llama-server's -ctk/-ctv): f16, q8_0 or q4_0."""
    if value not in CACHE_TYPES:
        where = _named(source, "--cache-type", "serve.cache_type")
        raise UsageError(f"invalid {where} '{value}': the KV cache type must be one of {', '.join(CACHE_TYPES)}")
    return value


def validate_backend(value: str) -> str:
    """Check a backend name: cpu, cuda, metal or vulkan."""
    if value not in BACKENDS:
        raise UsageError(f"invalid --backend '{value}': the backend must be one of {', '.join(BACKENDS)}")
    return value
