"""`qreg inspect FILE|VARIANT`: what a GGUF file is, which variant, and what would break serving it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from registry.cli.options import json_option, make_output, manifest_option, quiet_option
from registry.cli.output import format_table
from registry.errors import NotFoundError
from registry.manifest import MIB, Manifest, Variant, load_manifest


@click.command("inspect")
@click.argument("target", metavar="FILE|VARIANT")
@click.option("--tensors", is_flag=True, help="Also list every tensor with its shape, type and bytes.")
@click.option(
    "--verify",
    is_flag=True,
    help="Hash the file (sha256) and match the variant by digest; reads the whole file.",
)
@manifest_option
@json_option
@quiet_option
def inspect_command(
    target: str,
    tensors: bool,
    verify: bool,
    manifest_path: str | None,
    json_mode: bool,
    quiet: bool,
) -> None:
    """Read a GGUF file's header and report what it is.

    Shows the metadata, a histogram of tensor types, bits per weight, which
    variant of the manifest the file is, and warnings about what would make
    llama-server embed wrongly, each with its fix. Only the header is read,
    unless --verify hashes the whole file.

    FILE|VARIANT is a path, or a variant name (Q4_K_M, q3km-imat) whose pulled
    file is inspected.

    \b
    Examples:
      qreg inspect Qwen3-Embedding-0.6B-Q4_K_M-imat.gguf
      qreg inspect Q4_K_M --verify
      qreg inspect ./model.gguf --tensors --json
    """
    from registry.gguf_header import read_header
    from registry.inspect import build_report
    from registry.store import sha256_file

    output = make_output(json_mode, quiet)
    manifest = load_manifest(manifest_path)
    path = resolve_target(target, manifest)

    header = read_header(path)
    digest = None
    if verify:
        output.info(f"hashing {path} ({header.file_size / MIB:,.1f} MiB)")
        digest = sha256_file(path)
    report = build_report(header, manifest, digest)

    output.result(report.to_dict(tensors=tensors), render_report)


def resolve_target(target: str, manifest: Manifest) -> Path:
    """Return the file to inspect: the path itself if it exists, else the pulled file of a variant.

    A bare name that resolves as a variant (Q4_K_M, or the variant's file name)
    selects the pulled file. A missing target with a directory part is a missing file.
    """
    path = Path(target)
    if os.path.lexists(path):
        return path

    looks_like_path = os.sep in target or (os.altsep is not None and os.altsep in target)
    try:
        variant = manifest.resolve(target)
    except NotFoundError:
        if looks_like_path or target.lower().endswith(".gguf"):
            raise NotFoundError(f"{target}: no such file", hint="check the path, or pass a variant name") from None
        raise NotFoundError(
            f"'{target}' is neither a file nor a variant of {manifest.path.name}",
            hint="pass a .gguf path, or a variant name from 'qreg list'",
        ) from None
    if looks_like_path:
        raise NotFoundError(f"{target}: no such file", hint=f"run 'qreg inspect {variant.name}' for the pulled file")

    return _pulled_file(manifest, variant)


def _pulled_file(manifest: Manifest, variant: Variant) -> Path:
    from registry.store import not_pulled_error, pulled_path

    pulled = pulled_path(manifest, variant)
    if pulled is None:
        raise not_pulled_error(manifest, variant)
    return Path(pulled)


def render_report(data: dict) -> str:
    """Format the report for a terminal: facts, tensor types, variant, warnings."""
    sections = [_render_facts(data), "", _render_histogram(data)]
    if "tensors" in data:
        sections += ["", _render_tensors(data["tensors"])]
    sections += ["", _render_match(data["variant_match"])]
    sections += [_render_warnings(data["warnings"])]
    return "\n".join(sections)


def _render_facts(data: dict) -> str:
    rows = [
        ("file", f"{data['path']} ({data['file_size']:,} bytes, {data['file_size'] / MIB:.2f} MiB)"),
        ("sha256", data["sha256"]),
        ("GGUF version", data["gguf_version"]),
        ("architecture", data["architecture"]),
        ("name", data["name"]),
        ("parameters", _number(data["parameters"])),
        ("file type", _with_id(data["file_type"], data["file_type_id"])),
        ("quantization version", data["quantization_version"]),
        ("bits per weight", _bpw(data)),
        ("context length", _number(data["context_length"])),
        ("embedding length", _number(data["embedding_length"])),
        ("layers", data["block_count"]),
        ("heads (KV heads)", f"{_text(data['head_count'])} ({_text(data['head_count_kv'])})"),
        ("key/value length", f"{_text(data['key_length'])}/{_text(data['value_length'])}"),
        ("rope base", _number(data["rope_freq_base"])),
        ("pooling", _with_id(data["pooling"], data["pooling_type_id"])),
        ("tokenizer", f"{_text(data['tokenizer_model'])}, pre-tokenizer {_text(data['tokenizer_pre'])}"),
        ("vocabulary size", _number(data["vocab_size"])),
        ("BOS/EOS/padding id", _token_ids(data)),
        ("add BOS/EOS", f"{_text(data['add_bos'])}/{_text(data['add_eos'])}"),
    ]
    shown = [(label, value) for label, value in rows if label != "sha256" or value]
    width = max(len(label) for label, _value in shown)
    return "\n".join(f"{label.ljust(width)}  {_text(value)}" for label, value in shown)


def _render_histogram(data: dict) -> str:
    total_bytes = sum(row["bytes"] for row in data["tensor_types"]) or 1
    rows = [
        [row["type"], str(row["tensors"]), f"{row['parameters']:,}", f"{row['bytes']:,}", f"{row['bytes'] / total_bytes:.1%}"]
        for row in data["tensor_types"]
    ]
    table = format_table(["type", "tensors", "parameters", "bytes", "share"], rows, align_right={1, 2, 3, 4})
    return "tensor types\n" + table


def _render_tensors(tensors: list[dict]) -> str:
    rows = [
        [tensor["name"], "x".join(str(dim) for dim in tensor["shape"]), tensor["type"], f"{tensor['bytes']:,}"]
        for tensor in tensors
    ]
    return "tensors\n" + format_table(["name", "shape", "type", "bytes"], rows, align_right={3})


def _render_match(match: dict) -> str:
    variant = match["variant"] or "none"
    return f"variant: {variant} (confidence {match['confidence']}: {match['reason']})"


def _render_warnings(warnings: list[dict]) -> str:
    if not warnings:
        return "warnings: none"
    return "\n".join(f"warning [{item['code']}]: {item['message']}; fix: {item['fix']}" for item in warnings)


def _bpw(data: dict) -> str:
    if data["bits_per_weight"] is None:
        return "unknown (no tensors)"
    return f"{data['bits_per_weight']:.2f} (file), {data['tensor_bits_per_weight']:.2f} (tensor data only)"


def _token_ids(data: dict) -> str:
    eos = _text(data["eos_token_id"])
    if data["eos_token"] is not None:
        eos += f" {data['eos_token']}"
    return f"{_text(data['bos_token_id'])}/{eos}/{_text(data['padding_token_id'])}"


def _with_id(name: str | None, type_id: int | None) -> str:
    if type_id is None:
        return "missing"
    return f"{name or 'unknown'} ({type_id})"


def _number(value: int | float | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,}"
    return f"{int(value):,}"


def _text(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
