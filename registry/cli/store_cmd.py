"""`qreg ls`, `qreg verify` and `qreg rm`: the pulled variants in the local store."""

from __future__ import annotations

import click

from registry.cli.options import json_option, make_output, manifest_option, quiet_option
from registry.cli.output import format_table, print_error
from registry.errors import DigestMismatchError, NotFoundError
from registry.manifest import load_manifest


def _state_cell(item: dict) -> str:
    if item["state"] != "partial":
        return item["state"]
    total = item["partial_size"]
    percent = f" {100 * item['partial_bytes'] / total:.0f}%" if total else ""
    return f"partial{percent}"


def _render_ls(data: dict) -> str:
    if not data["variants"]:
        return f"no pulled variants of {data['repo']} in {data['cache_dir']}"
    rows = []
    for item in data["variants"]:
        size = item["size"] or item["partial_bytes"]
        rows.append([
            item["variant"],
            _state_cell(item),
            f"{size / (1 << 20):.2f}",
            item["digest_source"] or "-",
            item["path"] or "-",
        ])
    return format_table(["VARIANT", "STATE", "SIZE MiB", "DIGEST", "PATH"], rows, align_right={2})


@click.command("ls")
@manifest_option
@json_option
def ls_command(manifest_path: str | None, json_mode: bool) -> None:
    """List pulled variants and partial downloads: state, size, digest source and path.

    STATE is verified (size and mtime unchanged since the sha256 was checked),
    modified (run 'qreg verify'), missing (the file was deleted) or partial.

    \b
    Examples:
      qreg ls
      qreg list --local --json
    """
    from registry import store

    manifest = load_manifest(manifest_path)
    data = {
        "manifest": str(manifest.path),
        "repo": manifest.model.repo,
        "cache_dir": str(store.hub_cache_dir()),
        "variants": [item.to_dict() for item in store.list_pulled(manifest)],
    }
    make_output(json_mode).result(data, _render_ls)


def _render_verify(data: dict) -> str:
    if not data["results"]:
        return "no pulled variants to verify"
    lines = []
    for item in data["results"]:
        if item["ok"]:
            lines.append(f"{item['variant']}: ok, sha256 {item['actual_sha256']}")
        else:
            lines.append(
                f"{item['variant']}: MISMATCH, expected {item['expected_sha256']}, got {item['actual_sha256']}; "
                f"moved to {item['quarantined']}"
            )
    return "\n".join(lines)


@click.command("verify")
@click.argument("variant_names", metavar="[VARIANT]...", nargs=-1)
@manifest_option
@json_option
@quiet_option
@click.pass_context
def verify_command(
    ctx: click.Context, variant_names: tuple[str, ...], manifest_path: str | None, json_mode: bool, quiet: bool
) -> None:
    """Hash pulled variants again and compare with their recorded sha256.

    Without VARIANT every pulled variant is checked. A file that does not match is
    moved to qreg's quarantine folder and forgotten, so the next pull fetches it again.

    \b
    Examples:
      qreg verify
      qreg verify Q4_K_M Q8_0 --json
    """
    from registry import store

    manifest = load_manifest(manifest_path)
    if variant_names:
        variants = [manifest.resolve(name) for name in variant_names]
    else:
        variants = [manifest.resolve(item.variant) for item in store.list_pulled(manifest) if item.state != "partial"]
    for variant in variants:
        if store.load_record(store.paths_for(manifest, variant)) is None:
            raise NotFoundError(f"{variant.name} is not pulled", hint=f"run 'qreg pull {variant.name}'")

    output = make_output(json_mode, quiet)
    results = []
    for variant in variants:
        output.info(f"hashing {variant.file}")
        results.append(store.verify_variant(manifest, variant))

    output.result({"results": [r.to_dict() for r in results]}, _render_verify)
    failed = [r for r in results if not r.ok]
    if failed:
        names = ", ".join(r.variant for r in failed)
        message = f"sha256 mismatch for {names}; the files were moved to quarantine; run 'qreg pull' on them again"
        print_error(message, kind=DigestMismatchError.kind, exit_code=DigestMismatchError.exit_code, json_mode=False)
        ctx.exit(DigestMismatchError.exit_code)


@click.command("rm")
@click.argument("variant_name", metavar="VARIANT")
@manifest_option
@json_option
def rm_command(variant_name: str, manifest_path: str | None, json_mode: bool) -> None:
    """Remove one pulled variant: its blob, snapshot link, record and partial download.

    Other variants stay, and so do files of the same repo that qreg did not pull.

    \b
    Examples:
      qreg rm Q4_K_M
    """
    from registry import store

    manifest = load_manifest(manifest_path)
    variant = manifest.resolve(variant_name)
    output = make_output(json_mode)
    for server in _servers_using(manifest, variant):
        output.warn(
            f"llama-server pid {server.pid} on port {server.port} serves {variant.name} and keeps the deleted file "
            f"open, so its space is freed only after 'qreg stop {server.port}'"
        )
    removed = store.remove_variant(manifest, variant)
    data = {"variant": variant.name, "removed": [str(path) for path in removed]}
    output.result(data, lambda d: f"removed {d['variant']}: " + ", ".join(d["removed"]))


def _servers_using(manifest, variant) -> list:
    """Return the detached servers whose model file is this variant's pulled file."""
    import os

    from registry import store
    from registry.server import list_detached

    paths = store.paths_for(manifest, variant)
    record = store.load_record(paths)
    if record is None:
        return []
    pulled = os.path.realpath(paths.snapshot(record.commit))
    return [server for server in list_detached() if os.path.realpath(server.model) == pulled]
