"""`qreg pull VARIANT`: download a variant into the Hugging Face cache and verify its sha256."""

from __future__ import annotations

import click

from registry.cli.options import json_option, make_output, manifest_option, quiet_option
from registry.cli.output import print_error
from registry.errors import EXIT_INTERRUPTED
from registry.manifest import load_manifest
from registry.server import StopSignal, stop_signals_raise


def _render(data: dict) -> str:
    verb = "already pulled" if data["already_present"] else "pulled"
    source = "pinned by the manifest" if data["digest_source"] == "manifest" else "taken from the hub, not pinned"
    lines = [
        f"{verb} {data['variant']}: {data['path']}",
        f"  size: {data['size']} bytes",
        f"  sha256: {data['sha256']} ({source})",
        f"  revision: {data['revision']} (commit {data['commit']})",
    ]
    if data["resumed_from"]:
        lines.append(f"  resumed at byte {data['resumed_from']}")
    return "\n".join(lines)


@click.command("pull")
@click.argument("variant_name", metavar="VARIANT")
@click.option("--revision", default=None, help="Branch, tag or commit to download; overrides the manifest's revision.")
@manifest_option
@json_option
@quiet_option
@click.pass_context
def pull_command(
    ctx: click.Context, variant_name: str, revision: str | None, manifest_path: str | None, json_mode: bool, quiet: bool
) -> None:
    """Download a variant's GGUF file and verify its sha256.

    The file goes into the Hugging Face cache (HF_HUB_CACHE). The expected sha256 is
    the manifest's pin, or the hub's LFS digest when the manifest pins none. An
    interrupted pull resumes where it stopped when run again. Honours HF_ENDPOINT,
    HF_TOKEN, HF_HUB_OFFLINE and HF_HOME.

    \b
    Examples:
      qreg pull Q4_K_M
      qreg pull q3km-imat --revision main
      HF_HUB_OFFLINE=1 qreg pull Q8_0 --json
    """
    from registry import hub, store

    manifest = load_manifest(manifest_path)
    variant = manifest.resolve(variant_name)
    output = make_output(json_mode, quiet)
    try:
        # SIGTERM and SIGHUP unwind the transfer like Ctrl-C, so the received bytes are kept.
        with stop_signals_raise():
            result = hub.pull(manifest, variant, revision=revision, output=output)
    except (KeyboardInterrupt, StopSignal) as stop:
        exit_code = stop.exit_code if isinstance(stop, StopSignal) else EXIT_INTERRUPTED
        cause = "stopped by a signal" if isinstance(stop, StopSignal) else "interrupted"
        kept = store.partial_info(store.paths_for(manifest, variant))
        progress = f" ({kept[0]} of {kept[1]} bytes kept)" if kept else ""
        message = f"{cause} while pulling {variant.name}{progress}; run 'qreg pull {variant_name}' again to resume"
        print_error(message, kind="interrupted", exit_code=exit_code, json_mode=json_mode)
        ctx.exit(exit_code)
        return
    output.result(result.to_dict(), _render)

