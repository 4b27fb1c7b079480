"""`qreg recommend`: detect the device and pick the best variant that fits its memory.

This module also defines the serving options (--ctx, --parallel, --cache-type) that
`qreg serve` shares, and the size option parser.
"""

from __future__ import annotations

from typing import Callable

import click

from registry.cli.options import json_option, make_output, manifest_option
from registry.cli.output import format_table
from registry.errors import NothingFitsError, UsageError
from registry.serving import CACHE_TYPES
from registry.units import MIB, SIZE_FORMS, format_size, parse_size, to_mib


def serving_options(command: Callable) -> Callable:
    """Add --ctx, --parallel, --cache-type and --ubatch; each resolves option > env > config > default.

    The values reach the command as ctx, parallel, cache_type and ubatch, None when not
    given; pass them to ServeSettings.from_options, which resolves and validates them.
    """
    options = [
        click.option(
            "--ctx",
            type=int,
            default=None,
            metavar="TOKENS",
            help="Per-slot context in tokens: one request's input may have up to ctx - 1 tokens; "
            "llama-server's -c is ctx x parallel [default: 8192; env: QREG_CTX; config: serve.ctx].",
        ),
        click.option(
            "--parallel",
            type=int,
            default=None,
            metavar="SLOTS",
            help="Requests served at once (llama-server's -np) [default: 1; env: QREG_PARALLEL; config: serve.parallel].",
        ),
        click.option(
            "--cache-type",
            default=None,
            metavar="TYPE",
            help=f"KV cache type: {', '.join(CACHE_TYPES)} (llama-server's -ctk/-ctv; quantized types turn on "
            "flash attention) [default: f16; env: QREG_CACHE_TYPE; config: serve.cache_type].",
        ),
        click.option(
            "--ubatch",
            type=int,
            default=None,
            metavar="TOKENS",
            help="Micro-batch size in tokens (llama-server's -b and -ub), at most ctx; longer inputs are "
            "split over several micro-batches with the same result, and each token of a micro-batch costs "
            "about 1.2 MiB of memory [default: 512; env: QREG_UBATCH; config: serve.ubatch].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# No machine has this much memory; a larger value is a typing error.
MAX_SIZE = 1 << 60


def parse_size_option(text: str | None, option: str) -> int | None:
    """Parse a size option such as --ram 2GB; raise UsageError (exit 2) showing the accepted forms."""
    if text is None:
        return None
    try:
        size = parse_size(text)
    except ValueError as error:
        raise UsageError(f"{option}: {error}") from None
    if size < MIB:
        unitless = text.strip().replace(".", "", 1).isdigit() and float(text) > 0
        hint = f"a number without a unit is bytes: write {text.strip()}GB" if unitless else f"use a size such as {SIZE_FORMS}"
        raise UsageError(f"invalid {option} '{text}': {size} bytes is less than 1 MiB", hint=hint)
    if size > MAX_SIZE:
        raise UsageError(f"invalid {option} '{text}': more than 1 EiB", hint=f"use a size such as {SIZE_FORMS}")
    return size


@click.command("recommend")
@click.option(
    "--ram",
    metavar="SIZE",
    help="Memory qreg may plan to use. GB/MB are decimal (2GB = 2x10^9 bytes); GiB/MiB and G/M are "
    "binary (2GiB = 2G = 2x2^30 bytes) [default: the RAM available now].",
)
@click.option("--vram", metavar="SIZE", help="GPU memory to plan for on cuda/vulkan, in the --ram units [default: free VRAM from nvidia-smi].")
@click.option("--backend", metavar="NAME", help="cpu, cuda, metal or vulkan [default: cuda with an NVIDIA GPU, metal on Apple Silicon, else cpu].")
@serving_options
@click.option("--allow-low-quality", is_flag=True, help="Allow variants below 3 bits per weight.")
@click.option("--include-reference", is_flag=True, help="Allow BF16, the unquantized reference.")
@click.option("--all", "show_all", is_flag=True, help="Also list every variant with its rank, need and fit.")
@click.option("--show-device", is_flag=True, help="Print what was detected about this machine and exit.")
@manifest_option
@json_option
def recommend_command(
    ram: str | None,
    vram: str | None,
    backend: str | None,
    ctx: int | None,
    parallel: int | None,
    cache_type: str | None,
    ubatch: int | None,
    allow_low_quality: bool,
    include_reference: bool,
    show_all: bool,
    show_device: bool,
    manifest_path: str | None,
    json_mode: bool,
) -> None:
    """Pick the best variant whose llama-server fits this device's memory.

    The estimate covers a full-context input: weights, KV cache, llama-server's output
    and compute buffers (sized by the micro-batch) and its runtime, plus 10 % headroom
    (docs/recommend.md).

    \b
    Examples:
      qreg recommend
      qreg recommend --ram 3GB
      qreg recommend --ram 2GB --ctx 4096
      qreg recommend --ram 2GB --cache-type q8_0
      qreg recommend --ram 1GB --ctx 256
      qreg recommend --ram 16GB --backend metal --json
      qreg recommend --show-device
    """
    from registry.device import detect_device
    from registry.manifest import load_manifest
    from registry.recommend import recommend
    from registry.serving import ServeSettings

    output = make_output(json_mode)
    ram_bytes = parse_size_option(ram, "--ram")
    vram_bytes = parse_size_option(vram, "--vram")
    device = detect_device()

    if show_device:
        output.result(device.to_dict(), render_device)
        return

    manifest = load_manifest(manifest_path)
    settings = ServeSettings.from_options(
        ctx=ctx,
        parallel=parallel,
        cache_type=cache_type,
        ubatch=ubatch,
        backend=backend,
        detected_backend=device.backend,
        model_context=manifest.model.context_length,
    )
    for note in device.notes:
        output.warn(note)

    result = recommend(
        manifest,
        device,
        settings,
        allow_low_quality=allow_low_quality,
        include_reference=include_reference,
        ram_bytes=ram_bytes,
        vram_bytes=vram_bytes,
    )
    if result.pick is None:
        hint = "try " + " or ".join(result.suggestions) if result.suggestions else None
        raise NothingFitsError(result.reason, hint=hint, details=result.to_dict())

    if json_mode:
        output.result(result.to_dict())
    else:
        output.result(result, lambda data: render_recommendation(data, show_all))


def render_device(data: dict) -> str:
    lines = [f"system: {data['system']} {data['machine']}, {data['cpu_cores']} usable cores"]
    total = data["ram_total_bytes"]
    available = data["ram_available_bytes"]
    lines.append(f"RAM: {format_size(available) if available else 'unknown'} available of {format_size(total) if total else 'unknown'}")
    for gpu in data["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']}, {format_size(gpu['free_bytes'])} free of {format_size(gpu['total_bytes'])}")
    if data["unified_memory"]:
        budget = data["metal_budget_bytes"]
        lines.append(f"Apple Silicon: unified memory, Metal may use {format_size(budget) if budget else 'an unknown share'}")
    features = data["cpu_features"]
    lines.append(f"CPU features: {', '.join(features) if features else 'none that llama.cpp repacks for' if features is not None else 'unknown'}")
    lines.append(f"backend: {data['backend']}")
    lines.extend(f"note: {note}" for note in data["notes"])
    return "\n".join(lines)


def render_recommendation(result, show_all: bool) -> str:
    entry = result.pick_entry
    lines = [f"pick: {result.pick.name}  ({result.pick.file})", result.reason, "", f"estimate for {result.pick.name}:"]
    for name, size in entry.estimate.terms.items():
        where = entry.estimate.placement[name]
        lines.append(f"  {name:<22} {to_mib(size):>10.1f} MiB  {where}")
    lines.append(f"  {'total':<22} {to_mib(entry.estimate.total_bytes):>10.1f} MiB")
    if show_all:
        lines += ["", render_ranking(result.ranked)]
    return "\n".join(lines)


def render_ranking(ranked) -> str:
    rows = [
        [
            str(item.rank),
            item.variant.name,
            f"{item.variant.bits_per_weight:.2f}",
            f"{to_mib(item.estimate.total_bytes):.0f}",
            item.reason,
        ]
        for item in ranked
    ]
    return format_table(["RANK", "VARIANT", "BPW", "NEED MiB", "FIT"], rows, align_right={0, 2, 3})
