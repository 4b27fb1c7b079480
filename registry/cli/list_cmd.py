"""`qreg list`: the manifest's variants as a table, or with --local the pulled ones."""

from __future__ import annotations

import click

from registry.cli.options import json_option, make_output, manifest_option
from registry.cli.output import format_table
from registry.manifest import Variant, load_manifest


def _ppl_delta_cell(variant: Variant) -> str:
    if variant.diverges:
        return "diverges"
    if variant.ppl_delta is None:
        return "-"
    return f"{variant.ppl_delta:+.2f}"


def _render(data: dict) -> str:
    rows = []
    for item in data["variants"]:
        variant = item["variant"]
        rows.append(
            [
                variant.name,
                f"{variant.size_mib:.2f}",
                f"{variant.bits_per_weight:.2f}",
                _ppl_delta_cell(variant),
                variant.status,
                ",".join(variant.backends),
                "pinned" if variant.sha256 else "-",
            ]
        )
    headers = ["VARIANT", "SIZE MiB", "BPW", "PPL DELTA", "STATUS", "BACKENDS", "SHA256"]
    return format_table(headers, rows, align_right={1, 2, 3})


@click.command("list")
@click.option("--local", is_flag=True, help="List pulled variants instead (same as 'qreg ls').")
@manifest_option
@json_option
@click.pass_context
def list_command(ctx: click.Context, local: bool, manifest_path: str | None, json_mode: bool) -> None:
    """List the manifest's variants, smallest file first.

    \b
    Examples:
      qreg list
      qreg list --json
      qreg list --local
    """
    if local:
        from registry.cli.store_cmd import ls_command

        ctx.invoke(ls_command, manifest_path=manifest_path, json_mode=json_mode)
        return

    manifest = load_manifest(manifest_path)
    variants = sorted(manifest.variants, key=lambda v: (v.size_mib, v.name))
    data = {
        "manifest": str(manifest.path),
        "model": manifest.model.name,
        "repo": manifest.model.repo,
        "variants": [{"variant": v} for v in variants],
    }
    output = make_output(json_mode)
    if json_mode:
        data["variants"] = [v.to_dict() for v in variants]
    output.result(data, _render)
