"""Pick the variant to run: the best expected quality among those that fit the memory budget.

The policy, in order (docs/recommend.md explains each rule):

1. Eligible variants: the backend runs them, they are not unusable (diverging PPL),
   BF16 (the reference) only with include_reference, and variants below 3 bits per
   weight only with allow_low_quality.
2. Quality order: bits per weight, highest first. A variant whose PPL delta is worse
   than a smaller variant's moves to just below that variant. Negative deltas (a
   quantized file scoring better than its own unquantized source) are noise and
   are ignored.
3. Fit: the memory estimate plus HEADROOM must be within the budget of every pool
   it uses. The pools are RAM, VRAM on cuda and vulkan, and on Apple Silicon the
   Metal working-set limit.
4. The pick is the first eligible variant in quality order that fits.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from registry.device import Device
from registry.estimate import CONTEXT_PAD, MemoryEstimate, estimate_memory
from registry.manifest import NOT_FOR_PRODUCTION_BELOW_BPW, Manifest, Variant
from registry.serving import CACHE_TYPES, ServeSettings
from registry.units import format_size

log = logging.getLogger(__name__)

# Share of the estimate kept free on top of it. The estimate matched llama-server's
# measured peak within 0.5 % on x86-64 Linux (docs/benchmarks.md), so the 10 % is for
# other processes' growth, allocator fragmentation and untested platforms.
HEADROOM = 0.10

# Each halving of the micro-batch saves about 1.16 MiB per token of it. Suggestions
# stop at 64 tokens, the smallest size benchmarks/serve.py --ubatch-sweep measured.
MIN_SUGGESTED_UBATCH = 64


@dataclass(frozen=True)
class Budget:
    """The memory qreg may plan to use, per pool, and where each figure came from."""

    ram_bytes: int
    ram_source: str
    vram_bytes: int | None = None
    vram_source: str = ""
    metal_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RankedVariant:
    """One variant in quality order, with its estimate and whether (and why not) it is chosen."""

    rank: int
    variant: Variant
    estimate: MemoryEstimate
    eligible: bool
    fits: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "variant": self.variant.name,
            "bits_per_weight": self.variant.bits_per_weight,
            "status": self.variant.status,
            "ppl_delta": self.variant.ppl_delta,
            "eligible": self.eligible,
            "fits": self.fits,
            "need_bytes": self.estimate.total_bytes,
            "ram_bytes": self.estimate.ram_bytes,
            "vram_bytes": self.estimate.vram_bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Recommendation:
    """The pick (None when nothing fits), the full ranking, and the reason in one or two lines."""

    pick: Variant | None
    ranked: list[RankedVariant]
    reason: str
    settings: ServeSettings
    budget: Budget
    suggestions: list[str] = field(default_factory=list)

    @property
    def pick_entry(self) -> RankedVariant | None:
        for entry in self.ranked:
            if self.pick is not None and entry.variant.name == self.pick.name:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        entry = self.pick_entry
        return {
            "pick": self.pick.name if self.pick else None,
            "file": self.pick.file if self.pick else None,
            "reason": self.reason,
            "estimate": entry.estimate.to_dict() if entry else None,
            "settings": self.settings.to_dict(),
            "budget": self.budget.to_dict(),
            "headroom": HEADROOM,
            "suggestions": list(self.suggestions),
            "ranked": [item.to_dict() for item in self.ranked],
        }


def budget_from_device(device: Device, settings: ServeSettings, *, ram_bytes: int | None = None, vram_bytes: int | None = None) -> Budget:
    """Build the budget from overrides, else from what the device reports as available now.

    Raises UsageError when a needed figure is neither given nor detected.
    """
    from registry.errors import UsageError

    if ram_bytes is not None:
        ram, ram_source = ram_bytes, "--ram"
    elif device.ram_available_bytes is not None:
        ram = device.ram_available_bytes
        total = format_size(device.ram_total_bytes) if device.ram_total_bytes else "unknown"
        ram_source = f"available RAM, detected (total {total})"
    else:
        raise UsageError("could not detect this machine's available RAM", hint="pass --ram, such as --ram 8GB")

    vram, vram_source = None, ""
    if settings.backend in ("cuda", "vulkan"):
        if vram_bytes is not None:
            vram, vram_source = vram_bytes, "--vram"
        elif device.vram_free_bytes is not None and settings.backend == "cuda":
            vram, vram_source = device.vram_free_bytes, "free VRAM, detected by nvidia-smi"
        else:
            raise UsageError(
                f"no free VRAM known for --backend {settings.backend}: no NVIDIA GPU was detected",
                hint="pass --vram, such as --vram 8GB, or use --backend cpu",
            )

    metal = device.metal_budget_bytes if settings.backend == "metal" else None
    return Budget(ram_bytes=ram, ram_source=ram_source, vram_bytes=vram, vram_source=vram_source, metal_bytes=metal)


def recommend(
    manifest: Manifest,
    device: Device,
    settings: ServeSettings,
    *,
    allow_low_quality: bool = False,
    include_reference: bool = False,
    only: set[str] | None = None,
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
) -> Recommendation:
    """Rank every variant and pick the best one that fits; `pick` is None when none does.

    `only` restricts the pick to these variant names (the others stay in the ranking,
    marked). `ram_bytes`/`vram_bytes` override the device's available memory.
    """
    budget = budget_from_device(device, settings, ram_bytes=ram_bytes, vram_bytes=vram_bytes)
    features = device.cpu_features
    ordered = quality_order(manifest.variants)

    ranked = []
    for rank, variant in enumerate(ordered, start=1):
        estimate = estimate_memory(manifest.model, variant, settings, cpu_features=features)
        excluded = exclusion(variant, settings.backend, allow_low_quality, include_reference, only)
        fits, shortfall = check_fit(estimate, budget)
        reason = excluded or ("fits" if fits else shortfall)
        ranked.append(RankedVariant(rank, variant, estimate, eligible=excluded is None, fits=fits, reason=reason))

    pick = next((item for item in ranked if item.eligible and item.fits), None)
    if pick is None:
        reason = explain_nothing_fits(ranked, budget, settings)
        suggestions = suggest_fixes(manifest, device, settings, budget, ranked)
        return Recommendation(None, ranked, reason, settings, budget, suggestions)

    return Recommendation(pick.variant, ranked, explain_pick(pick, ranked, budget, settings), settings, budget)


# Ranking ------------------------------------------------------------------------------


def credible_delta(variant: Variant) -> float | None:
    """Return the variant's PPL delta, or None when it is missing or negative (noise)."""
    if variant.ppl_delta is None or variant.ppl_delta < 0:
        return None
    return variant.ppl_delta


def quality_order(variants: tuple[Variant, ...] | list[Variant]) -> list[Variant]:
    """Order variants by expected quality: bits per weight, then PPL demotions.

    A variant moves to just below the lowest-placed smaller variant whose credible
    PPL delta is strictly better. Variants are placed smallest first, so a chain of
    demotions (C worse than A worse than B) ends in the order B, A, C.
    """
    order = sorted(variants, key=lambda v: (-v.bits_per_weight, v.name))
    for variant in sorted(order, key=lambda v: (v.bits_per_weight, v.name)):
        delta = credible_delta(variant)
        if delta is None:
            continue
        beaters = [
            other
            for other in order
            if other.bits_per_weight < variant.bits_per_weight
            and credible_delta(other) is not None
            and credible_delta(other) < delta
        ]
        if not beaters:
            continue
        lowest = max(order.index(other) for other in beaters)
        if order.index(variant) < lowest:
            order.remove(variant)
            order.insert(lowest, variant)  # the removal shifted the beater up by one
    return order


def exclusion(variant: Variant, backend: str, allow_low_quality: bool, include_reference: bool, only: set[str] | None) -> str | None:
    """Return why a variant may not be picked, or None when it is eligible."""
    if only is not None and variant.name not in only:
        return "not among the variants to choose from"
    if backend not in variant.backends:
        return f"not supported on {backend}"
    if variant.status == "unusable":
        return "unusable: its PPL diverges on this model"
    if variant.status == "reference" and not include_reference:
        return "reference (unquantized), allowed with --include-reference"
    if variant.bits_per_weight < NOT_FOR_PRODUCTION_BELOW_BPW and not allow_low_quality:
        return f"below {NOT_FOR_PRODUCTION_BELOW_BPW:g} bits per weight, allowed with --allow-low-quality"
    return None


def with_headroom(size: int) -> int:
    return int(size * (1 + HEADROOM))


def check_fit(estimate: MemoryEstimate, budget: Budget) -> tuple[bool, str]:
    """Check the estimate plus headroom against each pool; return (fits, why not)."""
    ram_need = with_headroom(estimate.ram_bytes)
    if ram_need > budget.ram_bytes:
        return False, f"too large: needs {format_size(ram_need)} of RAM with headroom, {format_size(budget.ram_bytes)} available"

    if budget.vram_bytes is not None:
        vram_need = with_headroom(estimate.vram_bytes)
        if vram_need > budget.vram_bytes:
            return False, f"too large: needs {format_size(vram_need)} of VRAM with headroom, {format_size(budget.vram_bytes)} available"

    if budget.metal_bytes is not None:
        gpu_need = with_headroom(estimate.gpu_resident_bytes)
        if gpu_need > budget.metal_bytes:
            return False, f"too large: Metal needs {format_size(gpu_need)} with headroom, its limit is {format_size(budget.metal_bytes)}"
    return True, ""


# Explanations -------------------------------------------------------------------------


def describe_settings(settings: ServeSettings) -> str:
    slots = "1 slot" if settings.parallel == 1 else f"{settings.parallel} slots"
    return (
        f"{settings.ctx}-token inputs, {slots}, {settings.cache_type} KV cache, "
        f"{settings.ubatch}-token micro-batches, {settings.backend}"
    )


def explain_pick(pick: RankedVariant, ranked: list[RankedVariant], budget: Budget, settings: ServeSettings) -> str:
    """Say in one or two lines what the pick needs against the budget and why higher-ranked variants lost."""
    need = format_size(pick.estimate.ram_bytes)
    with_margin = format_size(with_headroom(pick.estimate.ram_bytes))
    line = (
        f"{pick.variant.name} ({pick.variant.bits_per_weight:.2f} BPW) needs {need} ({with_margin} with "
        f"{HEADROOM:.0%} headroom) of {format_size(budget.ram_bytes)} ({budget.ram_source}) for {describe_settings(settings)}"
    )
    if budget.vram_bytes is not None:
        line += f"; {format_size(pick.estimate.vram_bytes)} of {format_size(budget.vram_bytes)} VRAM ({budget.vram_source})"

    skipped = [item for item in ranked if item.rank < pick.rank]
    if not skipped:
        return line + "; it ranks first in quality."
    return line + ".\n" + "Ranked higher but left out: " + summarize_skipped(skipped) + "."


def summarize_skipped(skipped: list[RankedVariant]) -> str:
    """Group left-out variants by reason: 'Q8_0, Q6_K too large (Q6_K needs 1.9 GiB); BF16 reference'."""
    groups: dict[str, list[RankedVariant]] = {}
    for item in skipped:
        key = "too large" if item.reason.startswith("too large") else item.reason
        groups.setdefault(key, []).append(item)

    parts = []
    for key, items in groups.items():
        names = ", ".join(item.variant.name for item in items)
        if key == "too large":
            smallest = min(items, key=lambda item: item.estimate.total_bytes)
            parts.append(f"{names} too large (the smallest, {smallest.variant.name}, {smallest.reason.removeprefix('too large: ')})")
        else:
            parts.append(f"{names}: {key}")
    return "; ".join(parts)


def explain_nothing_fits(ranked: list[RankedVariant], budget: Budget, settings: ServeSettings) -> str:
    eligible = [item for item in ranked if item.eligible]
    if not eligible:
        return f"no variant is eligible for {describe_settings(settings)}"
    smallest = min(eligible, key=lambda item: item.estimate.total_bytes)
    message = (
        f"no variant fits {format_size(budget.ram_bytes)} ({budget.ram_source}) for {describe_settings(settings)}: "
        f"the smallest eligible, {smallest.variant.name}, {smallest.reason.removeprefix('too large: ')}"
    )
    token_buffers = smallest.estimate.terms["output_buffer"] + smallest.estimate.terms["compute_buffer"]
    if token_buffers * 2 > smallest.estimate.total_bytes:
        message += (
            f" ({format_size(token_buffers)} of it is llama.cpp's output and compute buffers, "
            "which hold logits over the whole vocabulary for every token of a micro-batch)"
        )
    return message


def suggest_fixes(manifest: Manifest, device: Device, settings: ServeSettings, budget: Budget, ranked: list[RankedVariant]) -> list[str]:
    """Find changes that make some eligible variant fit: a smaller --ctx, a quantized KV cache, fewer slots, a smaller micro-batch."""
    if not any(item.eligible for item in ranked):
        return []

    def best_fit(candidate: ServeSettings) -> Variant | None:
        for item in ranked:
            if item.eligible:
                estimate = estimate_memory(manifest.model, item.variant, candidate, cpu_features=device.cpu_features)
                if check_fit(estimate, budget)[0]:
                    return item.variant
        return None

    suggestions = []
    ctx = largest_fitting_ctx(settings, best_fit)
    if ctx is not None:
        variant = best_fit(dataclasses.replace(settings, ctx=ctx))
        suggestions.append(f"--ctx {ctx} (then {variant.name} fits)")

    if settings.cache_type == "f16":
        for cache_type in CACHE_TYPES[1:]:
            variant = best_fit(dataclasses.replace(settings, cache_type=cache_type))
            if variant is not None:
                suggestions.append(f"--cache-type {cache_type} (then {variant.name} fits)")
                break

    if settings.parallel > 1:
        variant = best_fit(dataclasses.replace(settings, parallel=1))
        if variant is not None:
            suggestions.append(f"--parallel 1 (then {variant.name} fits)")

    ubatch_fix = smaller_ubatch_fix(settings, best_fit)
    if ubatch_fix is not None:
        suggestions.append(ubatch_fix)
    return suggestions


def smaller_ubatch_fix(settings: ServeSettings, best_fit: Callable[[ServeSettings], Variant | None]) -> str | None:
    """Suggest the largest halved micro-batch, down to MIN_SUGGESTED_UBATCH, at which some variant fits."""
    ubatch = settings.ubatch // 2
    while ubatch >= MIN_SUGGESTED_UBATCH:
        variant = best_fit(dataclasses.replace(settings, ubatch_size=ubatch))
        if variant is not None:
            return f"--ubatch {ubatch} (then {variant.name} fits)"
        ubatch //= 2
    return None


def largest_fitting_ctx(settings: ServeSettings, best_fit: Callable[[ServeSettings], Variant | None]) -> int | None:
    """Return the largest per-slot context below the current one at which some variant fits.

    Memory grows with the context, so a binary search finds it. Contexts of 256 tokens
    or more are rounded down to a multiple of 256, the unit llama.cpp pads to anyway.
    """
    low, high = 1, settings.ctx - 1
    if high < low or best_fit(dataclasses.replace(settings, ctx=low)) is None:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if best_fit(dataclasses.replace(settings, ctx=middle)) is not None:
            low = middle
        else:
            high = middle - 1
    if low >= CONTEXT_PAD:
        low -= low % CONTEXT_PAD
    return low
