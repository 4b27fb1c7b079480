"""Helpers shared by the benchmark scripts in this folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def load_make_fixtures() -> Any:
    """Import scripts/make_fixtures.py (the fixture and twin builder), which is no package."""
    spec = importlib.util.spec_from_file_location("make_fixtures", REPO_ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fixtures"] = module
    spec.loader.exec_module(module)
    return module
