"""Serving settings shared by `qreg recommend` (memory estimate) and `qreg serve` (llama-server flags).

`ctx` is the per-slot context: the longest input one request may have. llama-server's
`-c` is the total context, which it divides evenly among its `-np` slots, so
`-c = ctx x parallel`. With embeddings on, llama-server processes a whole input in
one micro-batch, so `-b` and `-ub` must be at least the per-slot context.
"""

from __future__ import annotations

from dataclasses import dataclass

CACHE_TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_CTX = 8192
DEFAULT_PARALLEL = 1
DEFAULT_CACHE_TYPE = "f16"


@dataclass(frozen=True)
class ServeSettings:
    """How llama-server will run: per-slot context, slots, KV cache type and backend."""

    ctx: int = DEFAULT_CTX
    parallel: int = DEFAULT_PARALLEL
    cache_type: str = DEFAULT_CACHE_TYPE
    backend: str = "cpu"

    @property
    def total_context(self) -> int:
        """Return llama-server's `-c`: per-slot context times parallel slots."""
        return self.ctx * self.parallel

    @property
    def ubatch(self) -> int:
        """Return the micro-batch size (`-ub`), equal to the per-slot context."""
        return self.ctx

    @property
    def batch(self) -> int:
        """Return the logical batch size (`-b`), equal to the per-slot context."""
        return self.ctx

    @property
    def flash_attn(self) -> str | None:
        """Return `-fa` value: "on" when the V cache is quantized (llama.cpp needs it), else None."""
        return "on" if self.cache_type != "f16" else None
