"""Pytest fixtures of real GGUF files made by scripts/make_fixtures.py and llama.cpp's tools.

`fixture_ggufs` is the tiny Qwen3 embedding model in nine variants with its fixture
manifest; llama-server loads every file. `twin_gguf_factory` quantizes the
shape-faithful twin of Qwen3-Embedding-0.6B on request; tests that use it take
minutes on a cold cache, so mark them `@pytest.mark.slow`. Both are cached across
sessions (docs/fixtures.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

import pytest

__all__ = ["fixture_ggufs", "twin_gguf_factory"]

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_fixtures.py"


def load_make_fixtures():
    """Import scripts/make_fixtures.py as the module `make_fixtures` (once per process)."""
    module = sys.modules.get("make_fixtures")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location("make_fixtures", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fixtures"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fixture_ggufs(llama_bin_dir: Path):
    """Return the tiny model's FixtureSet: `.dir`, `.files` (variant -> Path), `.manifest_path`, `.repo`, `.index`.

    Variants: BF16, Q8_0, Q6_K, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, TQ1_0, IQ2_XXS; files are
    named like the card's, e.g. Tiny-Qwen3-Embedding-Q4_K_M-imat.gguf. `.index` maps
    each variant to its path, size_bytes and sha256. Treat the files as read-only:
    they are shared with every other test and session, so copy one before changing it.
    """
    return load_make_fixtures().build_tiny(llama_bin_dir)


@pytest.fixture(scope="session")
def twin_gguf_factory(llama_bin_dir: Path) -> Callable[[str], Path]:
    """Return make(variant) -> Path of the twin quantized to that variant (read-only, cached).

    The first call writes the 1.2 GB BF16 twin and its imatrix; each new variant
    then costs one llama-quantize run.
    """
    twin = load_make_fixtures().Twin(llama_bin_dir)

    def make(variant: str) -> Path:
        return twin.ensure(variant)

    return make
