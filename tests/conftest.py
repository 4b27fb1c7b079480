"""Shared test fixtures: isolated user directories, llama.cpp's tools, fixture GGUF files.

Every test runs with qreg's config, data and cache directories and the Hugging Face
cache under its own tmp_path, so nothing reads or writes the real user's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "scripts"

# huggingface_hub reads these once, when it is first imported. With telemetry on, its
# first request also fetches {HF_ENDPOINT}/api/agent-harnesses (huggingface_hub 2.4.0),
# so a test that forgot to point HF_ENDPOINT at a mirror would reach out to the real hub.
# Set before any test imports it: telemetry off, and a closed loopback port as the
# import-time endpoint. Each test still sets HF_ENDPOINT for itself.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

_ISOLATED_ENV_VARS = (
    "QREG_MANIFEST",
    "QREG_CONFIG",
    "QREG_LLAMA_SERVER",
    "QREG_HOST",
    "QREG_PORT",
    "QREG_CTX",
    "QREG_PARALLEL",
    "QREG_CACHE_TYPE",
    "QREG_API_KEY",
    "QREG_DEBUG",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "LLAMA_ARG_API_KEY",
)


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point config, data, cache and HF_HOME at tmp_path and clear qreg's environment."""
    home = tmp_path / "home"
    for name in _ISOLATED_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    return home


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def llama_bin_dir() -> Path:
    """Return the directory of llama.cpp's built tools, building them if they are not cached.

    Outside CI a failed build skips the test; with CI=true it fails it, so a missing
    llama-server can never turn into a skip there.
    """
    result = subprocess.run(
        ["bash", str(SCRIPTS_DIR / "build-llama-cpp")],
        capture_output=True,
        text=True,
    )
    bin_dir = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    if result.returncode != 0 or bin_dir is None or not (bin_dir / "llama-server").is_file():
        message = f"scripts/build-llama-cpp failed (exit {result.returncode}): {result.stderr[-2000:]}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return bin_dir


@pytest.fixture(scope="session")
def llama_server_bin(llama_bin_dir: Path) -> Path:
    return llama_bin_dir / "llama-server"


@pytest.fixture
def qreg_exe() -> str:
    """Return the installed `qreg` console script, for end-to-end runs of the real command."""
    exe = shutil.which("qreg")
    if exe is None:
        exe = str(Path(sys.executable).with_name("qreg"))
    return exe


# Fixtures shared across test modules live in these modules; importing them here
# registers them with pytest for every test.
from gguf_fixtures import *  # noqa: E402,F401,F403
from hf_mirror_fixtures import *  # noqa: E402,F401,F403
