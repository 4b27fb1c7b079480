"""One output helper for every command: data on stdout, messages on stderr, --json mode.

Human output goes through click.echo. In JSON mode the command's data is printed
as one JSON document on stdout and informational messages are suppressed; warnings
still go to stderr so scripts can log them.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable

import click


class Output:
    """The destination of a command's result, notes and warnings."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet

    def result(self, data: Any, render: Callable[[Any], str] | None = None) -> None:
        """Print a command's result: as JSON, or through the human renderer."""
        if self.json_mode:
            click.echo(json.dumps(data, indent=2, default=str))
        elif render is not None:
            text = render(data)
            if text:
                click.echo(text)

    def info(self, message: str) -> None:
        """Print a progress or status note on stderr (off with --json and --quiet)."""
        if not self.json_mode and not self.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        """Print a warning on stderr, in every mode but --quiet."""
        if not self.quiet:
            click.echo(f"warning: {message}", err=True)

    @property
    def progress_enabled(self) -> bool:
        """Whether a progress bar may be drawn: only for humans on a terminal."""
        return not self.json_mode and not self.quiet and sys.stderr.isatty()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def print_error(message: str, *, kind: str, exit_code: int, json_mode: bool, details: dict | None = None) -> None:
    """Print an error as one line on stderr and, in JSON mode, as one object on stdout.

    `details`, for example the recommendation that found nothing, joins the object beside "error".
    """
    click.echo(f"qreg: error: {_printable(message)}", err=True)
    if json_mode:
        payload = {**(details or {}), "error": {"type": kind, "message": message, "exit_code": exit_code}}
        click.echo(json.dumps(payload))


def _printable(text: str) -> str:
    # A name read from a damaged file may contain control bytes (NUL, form feed, escape
    # sequences). Shown as \xNN, they cannot break the one line or drive the terminal.
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def format_table(headers: list[str], rows: list[list[str]], align_right: set[int] | None = None) -> str:
    """Format rows as a plain text table with columns padded to their widest cell."""
    align_right = align_right or set()
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i in align_right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in rows])
