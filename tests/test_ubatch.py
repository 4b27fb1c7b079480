"""Tests that qreg's small micro-batch gives the same vectors as one micro-batch per input.

qreg passes `-b = -ub = min(ctx, 512)` by default. Qwen3-Embedding attends causally
and pools the last token, so llama-server (llama.cpp 11434) splits a longer input
over several micro-batches, and the KV cache carries the earlier ones. These tests
run the real llama-server on the tiny fixture model twice, with qreg's arguments for
the default micro-batch and with `-b = -ub = ctx`, and compare the vectors.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from registry.embed import EmbedClient, cosine_matrix
from registry.errors import EmbedError
from registry.server import LaunchSpec, ServerProcess, build_server_args, server_env
from registry.serving import DEFAULT_UBATCH, ServeSettings
from server_helpers import free_port, process_gone

SLOT_CONTEXT = 4096
LONG_TOKENS = 3000  # six micro-batches of 512
SAME_VECTOR = 0.9999

# Words that Qwen's tokenizer encodes as one token each, with their leading space.
WORDS = "market revenue growth risk bond price rate cash debt stock the of and to in is was for on that with".split()


@contextlib.contextmanager
def qreg_llama_server(binary: Path, model: Path, settings: ServeSettings, log_dir: Path) -> Iterator[str]:
    """Run llama-server with the arguments `qreg serve` builds for these settings; yield its URL."""
    port = free_port()
    spec = LaunchSpec(model_path=model, settings=settings, port=port)
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess.start(binary, build_server_args(spec), env=server_env(None), url=url, log_path=log_dir / f"{port}.log")
    try:
        server.wait_until_healthy(60)
        yield url
    finally:
        server.stop()
        assert process_gone(server.pid)


@pytest.fixture(scope="module")
def model(fixture_ggufs) -> Path:
    return fixture_ggufs.files["Q8_0"]


@pytest.fixture(scope="module")
def small_ubatch_url(llama_server_bin, model, tmp_path_factory):
    """llama-server with qreg's default micro-batch: -b/-ub 512 at a per-slot context of 4096."""
    settings = ServeSettings(ctx=SLOT_CONTEXT)
    with qreg_llama_server(llama_server_bin, model, settings, tmp_path_factory.mktemp("small")) as url:
        yield url


@pytest.fixture(scope="module")
def whole_ubatch_url(llama_server_bin, model, tmp_path_factory):
    """llama-server that runs every input as one micro-batch: -b/-ub equal to the per-slot context."""
    settings = ServeSettings(ctx=SLOT_CONTEXT, ubatch_size=SLOT_CONTEXT)
    with qreg_llama_server(llama_server_bin, model, settings, tmp_path_factory.mktemp("whole")) as url:
        yield url


def text_of(words: int, seed: int) -> str:
    """Return a text of `words` tokens; every word has its leading space, the first one too."""
    rng = random.Random(seed)
    return "".join(" " + rng.choice(WORDS) for _ in range(words))


def embed_one(url: str, text: str) -> tuple[int, list[float]]:
    with EmbedClient(url) as client:
        [embedding] = client.embed([text])
    return embedding.tokens, embedding.vector


def cosine(left: list[float], right: list[float]) -> float:
    return cosine_matrix([left, right])[0][1]


def test_default_flags_use_small_ubatch(model):
    args = build_server_args(LaunchSpec(model_path=model, settings=ServeSettings(ctx=SLOT_CONTEXT)))
    assert args[args.index("-ub") + 1] == str(DEFAULT_UBATCH)
    assert args[args.index("-b") + 1] == str(DEFAULT_UBATCH)
    assert args[args.index("-c") + 1] == str(SLOT_CONTEXT)


@pytest.mark.parametrize("tokens", [LONG_TOKENS, SLOT_CONTEXT - 1])
def test_long_input_same_vector(small_ubatch_url, whole_ubatch_url, tokens):
    # The server appends EOS to the tokens - 1 words.
    text = text_of(tokens - 1, seed=tokens)
    split_tokens, split = embed_one(small_ubatch_url, text)
    whole_tokens, whole = embed_one(whole_ubatch_url, text)

    assert split_tokens == tokens
    assert whole_tokens == tokens
    assert cosine(split, whole) >= SAME_VECTOR


def test_short_input_same_vector(small_ubatch_url, whole_ubatch_url):
    text = text_of(40, seed=2)
    _, split = embed_one(small_ubatch_url, text)
    _, whole = embed_one(whole_ubatch_url, text)
    assert cosine(split, whole) >= SAME_VECTOR


def test_split_input_depends_on_early_tokens(small_ubatch_url):
    # Were the earlier micro-batches lost, both texts would end in the same 512 tokens
    # and give the same vector, and the comparisons above would prove nothing.
    tail = text_of(DEFAULT_UBATCH, seed=3)
    _, first = embed_one(small_ubatch_url, text_of(1500, seed=4) + " " + tail)
    _, second = embed_one(small_ubatch_url, text_of(1500, seed=5) + " " + tail)
    assert cosine(first, second) < SAME_VECTOR


def test_over_limit_rejected_by_client(small_ubatch_url):
    with EmbedClient(small_ubatch_url) as client:
        with pytest.raises(EmbedError) as caught:
            client.embed([text_of(SLOT_CONTEXT, seed=6)])
    message = caught.value.one_line()
    assert f"over the server's per-slot limit of {SLOT_CONTEXT - 1}" in message
    assert "larger --ctx" in message


def test_over_limit_rejected_by_server(small_ubatch_url):
    # The server rejects the input by itself too, while the client test above stops it before sending.
    response = httpx.post(f"{small_ubatch_url}/v1/embeddings", json={"input": [text_of(SLOT_CONTEXT, seed=7)]}, timeout=60)
    assert response.status_code == 400
    assert "exceeds the available context size" in response.json()["error"]["message"]
