"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Callable

import click

from registry.cli.output import Output

JSON_META_KEY = "qreg.json"


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    # The CLI edge reads this to print errors as JSON too.
    if value:
        ctx.meta[JSON_META_KEY] = True
    return value


def json_option(command: Callable) -> Callable:
    return click.option(
        "--json",
        "json_mode",
        is_flag=True,
        is_eager=True,
        callback=_remember_json,
        expose_value=True,
        help="Print the result as JSON on stdout (errors too).",
    )(command)


def manifest_option(command: Callable) -> Callable:
    return click.option(
        "--manifest",
        "manifest_path",
        type=click.Path(dir_okay=False),
        default=None,
        envvar="QREG_MANIFEST",
        help="Manifest TOML to use instead of the shipped one [env: QREG_MANIFEST].",
    )(command)


def quiet_option(command: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="Print only the result, no progress or notes.")(command)


def make_output(json_mode: bool, quiet: bool = False) -> Output:
    return Output(json_mode=json_mode, quiet=quiet)
