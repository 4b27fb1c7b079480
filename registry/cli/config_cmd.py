"""`qreg config`: read and write settings in qreg's config file."""

from __future__ import annotations

import click

from registry import config
from registry.cli.options import json_option, make_output
from registry.cli.output import format_table


@click.group("config")
def config_group() -> None:
    """Read and write settings. An option beats the environment, which beats this file.

    \b
    Examples:
      qreg config set server.bin /opt/llama.cpp/bin/llama-server
      qreg config get serve.port
      qreg config list
    """


@config_group.command("get")
@click.argument("key")
@json_option
def get_command(key: str, json_mode: bool) -> None:
    """Print a setting's value and where it comes from."""
    value, source = config.resolve(key)
    data = {"key": key, "value": value, "source": source}
    make_output(json_mode).result(data, lambda d: "" if d["value"] is None else str(d["value"]))


@config_group.command("set")
@click.argument("key")
@click.argument("value")
def set_command(key: str, value: str) -> None:
    """Store a setting in the config file."""
    path = config.write_setting(key, value)
    click.echo(f"set {key} in {path}", err=True)


@config_group.command("unset")
@click.argument("key")
def unset_command(key: str) -> None:
    """Remove a setting from the config file, so its default applies."""
    path = config.write_setting(key, None)
    click.echo(f"removed {key} from {path}", err=True)


@config_group.command("list")
@json_option
def list_command(json_mode: bool) -> None:
    """List every setting with its value, source and environment variable."""
    rows = []
    for key, setting in config.SETTINGS.items():
        value, source = config.resolve(key)
        rows.append({"key": key, "value": value, "source": source, "env": setting.env, "help": setting.help})

    def render(items: list[dict]) -> str:
        table = [[r["key"], "" if r["value"] is None else str(r["value"]), r["source"], r["env"]] for r in items]
        return format_table(["KEY", "VALUE", "SOURCE", "ENV"], table) + f"\n\nconfig file: {config.config_path()}"

    make_output(json_mode).result(rows, render)
