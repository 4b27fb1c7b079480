"""Tests of the embed client and `qreg embed` against the real llama-server.

Two servers run the tiny fixture model for the whole module: one appends EOS
itself (the override `qreg serve` passes), one does not (the card's files as they
are). The client must give the same vectors from both.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from click.testing import CliRunner

from registry.cli.main import cli
from registry.embed import (
    EOS_TEXT,
    EmbedClient,
    cosine_matrix,
    query_with_instruction,
    strip_eos,
    truncate_and_normalize,
)
from registry.errors import EmbedError, UsageError
from registry.server import ADD_EOS_OVERRIDE
from registry.serving import ServeSettings
from server_helpers import free_port, llama_server

EMBEDDING_LENGTH = 256  # the tiny fixture model's embedding length
SLOT_CONTEXT = 512


@pytest.fixture(scope="module")
def model(fixture_ggufs):
    return fixture_ggufs.files["Q8_0"]


def _server_args(parallel: int = 2) -> tuple[str, ...]:
    # The -c, -np, -b and -ub that `qreg serve --ctx 512 --parallel N` passes.
    settings = ServeSettings(ctx=SLOT_CONTEXT, parallel=parallel)
    return (
        "--pooling", "last", "-c", str(settings.total_context), "-np", str(parallel),
        "-b", str(settings.batch), "-ub", str(settings.ubatch),
    )


@pytest.fixture(scope="module")
def eos_url(llama_server_bin, model):
    """A server that appends EOS itself, started the way `qreg serve` does."""
    with llama_server(llama_server_bin, model, *_server_args(), "--override-kv", ADD_EOS_OVERRIDE) as url:
        yield url


@pytest.fixture(scope="module")
def plain_url(llama_server_bin, model):
    """A server that does not append EOS: the card's files served as they are."""
    with llama_server(llama_server_bin, model, *_server_args()) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(llama_server_bin, model):
    import os

    env = {**os.environ, "LLAMA_API_KEY": "t0ken"}
    with llama_server(llama_server_bin, model, *_server_args(1), env=env) as url:
        yield url


def raw_vector(url: str, text: str) -> list[float]:
    response = httpx.post(f"{url}/v1/embeddings", json={"input": [text]}, timeout=60)
    response.raise_for_status()
    return response.json()["data"][0]["embedding"]


def cosine(left: list[float], right: list[float]) -> float:
    return cosine_matrix([left, right])[0][1]


def run_embed(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["embed", *args], input=input)


# --- pure helpers -------------------------------------------------------------------


def test_instruction_format_exact():
    text = query_with_instruction("Given a question, retrieve passages", "what is GGUF?")
    assert text == "Instruct: Given a question, retrieve passages\nQuery:what is GGUF?"


def test_strip_eos_removes_all_trailing():
    assert strip_eos("text" + EOS_TEXT + EOS_TEXT) == "text"
    assert strip_eos(EOS_TEXT + "text") == EOS_TEXT + "text"


def test_truncate_and_normalize():
    vector = truncate_and_normalize([3.0, 4.0, 12.0], 2)
    assert vector == pytest.approx([0.6, 0.8])


def test_cosine_matrix_symmetric():
    matrix = cosine_matrix([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert matrix[0][1] == pytest.approx(0.0)
    assert matrix[0][2] == pytest.approx(matrix[2][0])
    assert matrix[1][1] == pytest.approx(1.0)


# --- EOS handling against the real server -------------------------------------------


def test_detects_server_eos(eos_url, plain_url):
    with EmbedClient(eos_url) as client:
        assert client.server_adds_eos() is True
        assert client.eos_id() == 151643
    with EmbedClient(plain_url) as client:
        assert client.server_adds_eos() is False


def test_exactly_one_eos_reaches_model(eos_url, plain_url):
    # The reference: the text with one EOS, sent to a server that adds none.
    reference = raw_vector(plain_url, "the quarterly report" + EOS_TEXT)
    for url in (eos_url, plain_url):
        with EmbedClient(url) as client:
            for text in ("the quarterly report", "the quarterly report" + EOS_TEXT, "the quarterly report" + EOS_TEXT * 2):
                vector = client.embed([text])[0].vector
                assert cosine(vector, reference) == pytest.approx(1.0, abs=1e-5), (url, text)


def test_second_eos_changes_vector(plain_url):
    # Why "exactly one" matters: the model's vector depends on the count of EOS tokens.
    one = raw_vector(plain_url, "the quarterly report" + EOS_TEXT)
    two = raw_vector(plain_url, "the quarterly report" + EOS_TEXT * 2)
    assert cosine(one, two) < 0.9999


def test_token_count_includes_eos(eos_url, plain_url):
    for url in (eos_url, plain_url):
        with EmbedClient(url) as client:
            embedding = client.embed(["hello world"])[0]
            assert embedding.tokens == 3  # "hello", " world", <|endoftext|>


def test_vectors_unit_norm(plain_url):
    with EmbedClient(plain_url) as client:
        for item in client.embed(["alpha", "beta gamma"]):
            assert len(item.vector) == EMBEDDING_LENGTH
            assert math.sqrt(sum(v * v for v in item.vector)) == pytest.approx(1.0, abs=1e-5)


def test_many_inputs_keep_order(eos_url):
    texts = [f"text number {i}" for i in range(40)]  # more than one request batch
    with EmbedClient(eos_url) as client:
        together = client.embed(texts)
        alone = client.embed([texts[37]])[0]
    assert [item.text for item in together] == texts
    assert cosine(together[37].vector, alone.vector) == pytest.approx(1.0, abs=1e-5)


# --- length limit ---------------------------------------------------------------------------


def test_too_long_input_names_text(eos_url):
    long_text = " ".join(["word"] * 600)
    with EmbedClient(eos_url) as client:
        with pytest.raises(EmbedError) as caught:
            client.embed(["short", long_text])
    message = caught.value.message
    assert message.startswith("input 2 ('word word word")
    assert "has 601 tokens, over the server's per-slot limit of 511" in message
    assert "--ctx" in caught.value.hint


def test_limit_edge_accepted(plain_url):
    with EmbedClient(plain_url) as client:
        text = "word" + " word" * 509  # 510 tokens, 511 with the appended EOS
        assert client.embed([text])[0].tokens == 511


def test_cli_too_long_exit_code(eos_url):
    result = run_embed("--url", eos_url, "ok", " ".join(["word"] * 600))
    assert result.exit_code == EmbedError.exit_code
    assert "input 2" in result.stderr
    assert "601 tokens" in result.stderr


# --- the command line ----------------------------------------------------------------------


def test_cli_similarity_table(eos_url):
    result = run_embed("--url", eos_url, "same text", "same text", "other")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("cosine similarity\n")
    assert "#1  same text  (3 tokens)" in result.stdout


def test_cli_json(eos_url):
    result = run_embed("--url", eos_url, "--json", "first text", "first text", "something else")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dimensions"] == EMBEDDING_LENGTH
    assert [item["text"] for item in data["inputs"]] == ["first text", "first text", "something else"]
    similarity = data["similarity"]
    assert similarity[0][1] == pytest.approx(1.0, abs=1e-6)
    assert similarity[0][2] == pytest.approx(similarity[2][0])
    for item in data["inputs"]:
        assert math.sqrt(sum(v * v for v in item["embedding"])) == pytest.approx(1.0, abs=1e-5)


def test_cli_one_text_prints_vector(eos_url):
    result = run_embed("--url", eos_url, "just one")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.split()) == EMBEDDING_LENGTH


def test_cli_dimensions(eos_url):
    full = json.loads(run_embed("--url", eos_url, "--json", "matryoshka").stdout)["inputs"][0]["embedding"]
    result = run_embed("--url", eos_url, "--json", "--dimensions", "64", "matryoshka")
    assert result.exit_code == 0, result.stderr
    vector = json.loads(result.stdout)["inputs"][0]["embedding"]
    assert len(vector) == 64
    assert vector == pytest.approx(truncate_and_normalize(full, 64), abs=1e-6)


@pytest.mark.parametrize("dimensions", ["16", "257", "0"])
def test_cli_dimensions_invalid(eos_url, dimensions):
    result = run_embed("--url", eos_url, "--dimensions", dimensions, "text")
    assert result.exit_code == UsageError.exit_code
    assert f"invalid --dimensions {dimensions}" in result.stderr
    assert "32 to 256" in result.stderr


def test_cli_instruct_matches_manual_format(eos_url, plain_url):
    task = "Given a web search query, retrieve relevant passages"
    result = run_embed("--url", eos_url, "--json", "--instruct", task, "what is a GGUF file")
    assert result.exit_code == 0, result.stderr
    vector = json.loads(result.stdout)["inputs"][0]["embedding"]
    manual = raw_vector(plain_url, f"Instruct: {task}\nQuery:what is a GGUF file{EOS_TEXT}")
    assert cosine(vector, manual) == pytest.approx(1.0, abs=1e-5)


def test_cli_file_input(eos_url, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond line\n", encoding="utf-8")
    result = run_embed("--url", eos_url, "--json", "--file", str(texts))
    assert result.exit_code == 0, result.stderr
    assert [item["text"] for item in json.loads(result.stdout)["inputs"]] == ["first line", "second line"]


def test_cli_stdin_input(eos_url):
    result = run_embed("--url", eos_url, "--json", input="from stdin\nand more\n")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["inputs"]) == 2


def test_cli_no_text(eos_url):
    result = run_embed("--url", eos_url, input="")
    assert result.exit_code == UsageError.exit_code
    assert "no text to embed" in result.stderr


def test_cli_empty_argument(eos_url):
    result = run_embed("--url", eos_url, "fine", "  ")
    assert result.exit_code == UsageError.exit_code
    assert "text 2 is empty" in result.stderr


def test_cli_file_not_utf8(eos_url, tmp_path):
    texts = tmp_path / "latin1.txt"
    texts.write_bytes("caf\xe9\n".encode("latin-1"))
    result = run_embed("--url", eos_url, "--file", str(texts))
    assert result.exit_code == UsageError.exit_code
    assert "is not UTF-8 text" in result.stderr


def test_cli_no_server():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_embed("--url", url, "text")
    assert result.exit_code == EmbedError.exit_code
    assert f"no server responds at {url}" in result.stderr
    assert "qreg serve" in result.stderr


def test_cli_default_url_from_config(eos_url, monkeypatch):
    monkeypatch.setenv("QREG_PORT", eos_url.rsplit(":", 1)[1])
    result = run_embed("text")
    assert result.exit_code == 0, result.stderr


# --- API key ------------------------------------------------------------------------------------


def test_cli_api_key_missing(keyed_url):
    result = run_embed("--url", keyed_url, "text")
    assert result.exit_code == EmbedError.exit_code
    assert "unauthorized (401)" in result.stderr
    assert "QREG_API_KEY" in result.stderr


def test_cli_api_key_from_env(keyed_url, monkeypatch):
    monkeypatch.setenv("QREG_API_KEY", "t0ken")
    result = run_embed("--url", keyed_url, "text")
    assert result.exit_code == 0, result.stderr


def test_cli_api_key_wrong(keyed_url):
    result = run_embed("--url", keyed_url, "--api-key", "wrong", "text")
    assert result.exit_code == EmbedError.exit_code
    assert "wrong" not in result.stderr


def test_cli_query_gets_instruction_documents_not(eos_url, plain_url):
    task = "Given a question, retrieve passages that answer it"
    result = run_embed("--url", eos_url, "--json", "--instruct", task, "--query", "what rose?", "Revenue rose.")
    assert result.exit_code == 0, result.stderr
    inputs = json.loads(result.stdout)["inputs"]
    assert [item["text"] for item in inputs] == ["what rose?", "Revenue rose."]
    assert inputs[0]["sent"] == f"Instruct: {task}\nQuery:what rose?"
    assert inputs[1]["sent"] == "Revenue rose."

    document = raw_vector(plain_url, "Revenue rose." + EOS_TEXT)
    assert cosine(inputs[1]["embedding"], document) == pytest.approx(1.0, abs=1e-5)


def test_cli_query_default_task(eos_url):
    result = run_embed("--url", eos_url, "--json", "--query", "what is GGUF")
    assert result.exit_code == 0, result.stderr
    sent = json.loads(result.stdout)["inputs"][0]["sent"]
    assert sent == "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:what is GGUF"
