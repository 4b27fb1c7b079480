"""`qreg manifest refresh`: pin every variant's sha256, size and the repo's commit from the hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from registry.cli.options import json_option, make_output, manifest_option, quiet_option
from registry.errors import ManifestError, UsageError
from registry.manifest import Manifest, load_manifest, overlay_path_for, shipped_manifest_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


@click.group("manifest")
def manifest_group() -> None:
    """Keep the manifest's digests, sizes and revision in step with the hub."""


def _overlay_document(manifest: Manifest, pins: Any) -> dict[str, Any]:
    variants = []
    for variant in manifest.variants:
        if variant.file not in pins.files:
            continue
        size, sha256 = pins.files[variant.file]
        entry: dict[str, Any] = {"name": variant.name, "file": variant.file, "size_bytes": size}
        if sha256:
            entry["sha256"] = sha256
        variants.append(entry)
    return {
        "schema_version": 1,
        "source": str(manifest.path),
        "model": {"repo": manifest.model.repo, "revision": pins.commit},
        "variants": variants,
    }


def _full_manifest(manifest: Manifest, overlay: dict[str, Any]) -> dict[str, Any]:
    """Return the manifest's own TOML data with the overlay's revision, digests and sizes written in."""
    with open(manifest.path, "rb") as handle:
        data = tomllib.load(handle)
    data["model"]["revision"] = overlay["model"]["revision"]
    pinned = {entry["name"]: entry for entry in overlay["variants"]}
    for variant in data["variants"]:
        entry = pinned.get(variant.get("name"))
        if entry is not None:
            variant["size_bytes"] = entry["size_bytes"]
            variant["sha256"] = entry.get("sha256", "")
    return data


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(temporary, path)


def _check_output_path(output_path: Path) -> None:
    # A mistyped folder should fail here, before the hub is asked, not be created.
    if not output_path.parent.is_dir():
        raise UsageError(
            f"--output {output_path}: folder {output_path.parent} does not exist",
            hint="create it first or pass a path in an existing folder",
        )
    try:
        shipped = shipped_manifest_path().resolve()
    except ManifestError:  # no shipped manifest next to this install: nothing to protect
        return
    if output_path.resolve() == shipped:
        raise UsageError(
            f"--output {output_path} is the manifest shipped with qreg, which refresh never edits",
            hint="write to another path and pass it with --manifest, or omit --output to write the overlay",
        )


def _render(data: dict) -> str:
    lines = [
        f"pinned {len(data['pinned'])} of {data['variants']} variants of {data['repo']} "
        f"at commit {data['commit']} into {data['written']}"
    ]
    for name in data["missing"]:
        lines.append(f"  {name}: not found on the hub at that commit, left unpinned")
    for name in data["no_sha256"]:
        lines.append(f"  {name}: the hub reports no LFS sha256, size pinned only")
    return "\n".join(lines)


@manifest_group.command("refresh")
@click.option("--revision", default=None, help="Branch, tag or commit to pin [default: the manifest's, else main].")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a complete manifest here instead of the overlay in qreg's config dir.")
@manifest_option
@json_option
@quiet_option
def refresh_command(
    revision: str | None, output_path: Path | None, manifest_path: str | None, json_mode: bool, quiet: bool
) -> None:
    """Ask the hub for every variant's size and sha256 and the repo's commit, and pin them.

    By default the pins go to an overlay under qreg's config dir, which is applied when
    the manifest loads, so the manifest file itself is not edited. With --output, a
    complete manifest with the pins is written there instead, to use with --manifest.

    \b
    Examples:
      qreg manifest refresh
      qreg manifest refresh --revision main --output pinned.toml
    """
    from registry import hub, store

    manifest = load_manifest(manifest_path, apply_overlay=False)
    target = output_path or overlay_path_for(manifest.path)
    if output_path is not None:
        _check_output_path(output_path)
    requested = store.check_revision(revision or manifest.model.revision or hub.DEFAULT_REVISION)

    output = make_output(json_mode, quiet)
    pins = hub.fetch_repo_pins(manifest.model.repo, [v.file for v in manifest.variants], requested, output=output)
    overlay = _overlay_document(manifest, pins)
    _write_toml(target, _full_manifest(manifest, overlay) if output_path else overlay)
    load_manifest(target if output_path else manifest.path)  # raises ManifestError if the result is invalid

    pinned = [entry["name"] for entry in overlay["variants"]]
    data = {
        "repo": manifest.model.repo,
        "revision": requested,
        "commit": pins.commit,
        "written": str(target),
        "variants": len(manifest.variants),
        "pinned": pinned,
        "missing": [v.name for v in manifest.variants if v.file not in pins.files],
        "no_sha256": [e["name"] for e in overlay["variants"] if "sha256" not in e],
    }
    output.result(data, _render)
