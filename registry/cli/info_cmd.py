"""`qreg info VARIANT`: everything the manifest records about one variant."""

from __future__ import annotations

import dataclasses

import click

from registry.cli.options import json_option, make_output, manifest_option
from registry.manifest import load_manifest


def _render(data: dict) -> str:
    variant = data["variant"]
    model = data["model"]
    lines = [f"{variant['name']}  ({model['name']}, {model['repo']})"]
    for key, value in variant.items():
        if key == "name" or value is None or value == "":
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"  {key.replace('_', ' ')}: {value}")
    if not variant["sha256"]:
        lines.append("  sha256: not pinned (run 'qreg manifest refresh' to fetch it from the hub)")
    return "\n".join(lines)


@click.command("info")
@click.argument("variant_name", metavar="VARIANT")
@manifest_option
@json_option
def info_command(variant_name: str, manifest_path: str | None, json_mode: bool) -> None:
    """Show the manifest's record of one variant.

    VARIANT is a llama.cpp name in any case (Q4_K_M, q4_k_m), the model card's
    squashed name (Q4KM, Q3KM-imat, Q80) or the file name.

    \b
    Examples:
      qreg info Q4_K_M
      qreg info q3km-imat
      qreg info Qwen3-Embedding-0.6B-Q3_K_M-imat.gguf --json
    """
    manifest = load_manifest(manifest_path)
    variant = manifest.resolve(variant_name)
    model = dataclasses.asdict(manifest.model)
    data = {"manifest": str(manifest.path), "model": model, "variant": variant.to_dict()}
    make_output(json_mode).result(data, _render)
