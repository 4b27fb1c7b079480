"""Helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def installed_command(name: str) -> str:
    """Return the console script next to this interpreter, else the one on PATH.

    The script next to sys.executable is preferred because a version manager's shim
    on PATH (pyenv) adds a shell start to every run.
    """
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"benchmark: command {name} not found next to {sys.executable} or on PATH")
    return found
