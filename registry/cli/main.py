"""The `qreg` entry point: wires the command modules and is the one place that catches errors.

Command modules are imported only when their command runs, so `qreg --help` does not
pay for huggingface_hub, gguf, numpy or httpx.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import traceback

import click

from registry import __version__
from registry.cli.options import JSON_META_KEY
from registry.cli.output import print_error
from registry.errors import EXIT_INTERRUPTED, QregError, os_error

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "list": ("registry.cli.list_cmd", "list_command", "List the variants of the manifest, or the pulled ones."),
    "info": ("registry.cli.info_cmd", "info_command", "Show everything the manifest records about one variant."),
    "inspect": ("registry.cli.inspect_cmd", "inspect_command", "Read a GGUF file: metadata, tensor types, BPW, variant, warnings."),
    "recommend": ("registry.cli.recommend_cmd", "recommend_command", "Pick the best variant that fits this device."),
    "pull": ("registry.cli.pull_cmd", "pull_command", "Download a variant from Hugging Face and verify its sha256."),
    "ls": ("registry.cli.store_cmd", "ls_command", "List pulled variants and partial downloads."),
    "verify": ("registry.cli.store_cmd", "verify_command", "Re-hash pulled variants against their digests."),
    "rm": ("registry.cli.store_cmd", "rm_command", "Remove a pulled variant and its partial download."),
    "manifest": ("registry.cli.manifest_cmd", "manifest_group", "Refresh digests and sizes from the hub."),
    "serve": ("registry.cli.serve_cmd", "serve_command", "Run llama-server for a variant and wait until it is healthy."),
    "ps": ("registry.cli.serve_cmd", "ps_command", "List servers started with 'qreg serve --detach'."),
    "stop": ("registry.cli.serve_cmd", "stop_command", "Stop a server started with 'qreg serve --detach'."),
    "embed": ("registry.cli.embed_cmd", "embed_command", "Embed texts with a running server and print vectors or similarities."),
    "config": ("registry.cli.config_cmd", "config_group", "Read and write qreg's settings."),
}

log = logging.getLogger("registry")


class QregGroup(click.Group):
    """A click group that loads commands lazily and turns QregError into one line and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module_name, attribute, _help = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                return None  # the module is missing from this install, so click reports no such command
            raise
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the help lines above, so listing the commands imports none of them.
        rows = [(name, help_text) for name, (_m, _a, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QregError as error:
            _report(ctx, error.one_line(), error.kind, error.exit_code, error.details)
            _traceback_when_debugging()
            ctx.exit(error.exit_code)
        except OSError as error:
            # A file system failure that no command turned into a QregError: a folder
            # that is read-only, a file where a folder should be, a full disk.
            converted = os_error(error)
            _report(ctx, converted.one_line(), converted.kind, converted.exit_code)
            _traceback_when_debugging()
            ctx.exit(converted.exit_code)
        except KeyboardInterrupt:
            _report(ctx, "interrupted", "interrupted", EXIT_INTERRUPTED)
            ctx.exit(EXIT_INTERRUPTED)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            _usage_error(ctx, error)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Options before the command name (`qreg --json list`) are parsed here, outside invoke.
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            _usage_error(ctx, error)
            raise AssertionError("unreachable")  # ctx.exit raised


def _usage_error(ctx: click.Context, error: click.UsageError) -> None:
    """Print click's usage error as one line (and a JSON object with --json), then exit 2."""
    command_path = error.ctx.command_path if error.ctx else "qreg"
    message = f"{error.format_message().rstrip('.')}; run '{command_path} --help' for usage"
    option = re.match(r"No such option:? '?(-\d[\d.]*)'?$", error.format_message().rstrip("."))
    if option:
        message += f"; to pass the negative value {option.group(1)}, put '--' before it"
    json_mode = _json_requested(ctx) or _json_in_arguments(error.ctx or ctx)
    print_error(message, kind="usage", exit_code=error.exit_code, json_mode=json_mode)
    ctx.exit(error.exit_code)


def debugging() -> bool:
    """Return whether QREG_DEBUG is set to a true value (1, true, yes, on)."""
    return os.environ.get("QREG_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _traceback_when_debugging() -> None:
    if debugging():
        traceback.print_exc(file=sys.stderr)


def _report(ctx: click.Context, message: str, kind: str, exit_code: int, details: dict | None = None) -> None:
    json_mode = _json_requested(ctx)
    print_error(message, kind=kind, exit_code=exit_code, json_mode=json_mode, details=details)


def _json_in_arguments(ctx: click.Context) -> bool:
    # A usage error can stop parsing before the --json callback runs.
    return "--json" in ctx.args or "--json" in sys.argv[1:]


def _json_requested(ctx: click.Context) -> bool:
    # ctx.meta is shared by the whole context chain, so a subcommand's --json is visible here.
    return bool(ctx.meta.get(JSON_META_KEY))


@click.group(cls=QregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="qreg")
@click.option("-v", "--verbose", count=True, help="Log more on stderr: -v for info, -vv for debug.")
def cli(verbose: int) -> None:
    """qreg: pick, pull, inspect and serve the GGUF files of Qwen3-Embedding-0.6B.

    \b
    Examples:
      qreg list
      qreg recommend --ram 2GB
      qreg pull Q4_K_M
      qreg inspect Q4_K_M
      qreg serve Q4_K_M
      qreg embed "first text" "second text"

    Set QREG_DEBUG=1 to see the traceback of an error.
    """
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2 or debugging():
        level = logging.DEBUG
    logging.basicConfig(level=level, format="qreg: %(levelname)s: %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    cli(prog_name="qreg")
