"""`qreg embed`: embed texts with a running llama-server and print vectors or similarities."""

from __future__ import annotations

import sys

import click

from registry.cli.options import json_option, make_output, quiet_option
from registry.cli.output import format_table
from registry.errors import NotFoundError, QregError, UsageError


def _default_url() -> str:
    from registry.config import resolve
    from registry.server import client_url

    host, _ = resolve("serve.host")
    port, _ = resolve("serve.port")
    return client_url(host, port)


def _base_url(url: str | None) -> str:
    """Return --url checked, or the URL of `qreg serve`'s settings when --url is not given."""
    from registry.embed import check_url

    base_url = _default_url() if url is None else url
    check_url(base_url)
    return base_url


def _check_task(task: str | None) -> None:
    if task is not None and not task.strip():
        raise UsageError(
            f"invalid --instruct '{task}': the task is empty",
            hint="pass a one-sentence task such as 'Given a question, retrieve passages that answer it', or leave out --instruct",
        )


def _read_texts(texts: tuple[str, ...], file_path: str | None, *, stdin_allowed: bool) -> tuple[list[str], str | None]:
    """Return the texts to embed and the name of the file or stream they were read from (None for arguments only)."""
    collected = list(texts)
    if file_path is not None:
        source = "stdin (--file -)" if file_path == "-" else f"--file {file_path}"
        return collected + _read_file_lines(file_path), source
    if not collected and stdin_allowed and not sys.stdin.isatty():
        return _lines(sys.stdin, "stdin"), "stdin"
    return collected, None


def _read_file_lines(file_path: str) -> list[str]:
    try:
        return _lines(click.open_file(file_path, "r", encoding="utf-8"), file_path)
    except FileNotFoundError:
        raise NotFoundError(f"--file {file_path}: no such file", hint="check the path") from None
    except OSError as error:
        raise QregError(f"--file {file_path} cannot be read: {error.strerror}", hint="check the path and its permissions") from None


def _with_instructions(
    queries: tuple[str, ...], documents: list[str], task: str | None, source: str | None
) -> list[tuple[str, str]]:
    """Return (text to send, text to show) for every input, queries first, with the instruction on the queries.

    Without --query, --instruct applies to every text: the caller says they are all queries.
    `source` names the file or stream the documents came from, for the error when there is no text.
    """
    from registry.embed import DEFAULT_TASK, query_with_instruction

    if not queries and task is not None:
        queries, documents = tuple(documents), []
    shown = list(queries) + documents
    if not shown and source is not None:
        raise UsageError(
            f"no text to embed: {source} is empty or has only blank lines",
            hint="write one text a line, or pass texts as arguments",
        )
    if not shown:
        raise UsageError("no text to embed", hint="pass texts as arguments, --query, --file PATH, or pipe them on stdin")
    for index, text in enumerate(shown):
        if not text.strip():
            raise UsageError(f"text {index + 1} is empty", hint="remove it, since an empty input has nothing to embed")

    sent = [query_with_instruction(task or DEFAULT_TASK, query) for query in queries] + documents
    return list(zip(sent, shown))


def _lines(stream, name: str) -> list[str]:
    try:
        with stream:
            return [line.rstrip("\r\n") for line in stream if line.strip()]
    except UnicodeDecodeError as error:
        raise UsageError(f"{name} is not UTF-8 text: {error.reason} at byte {error.start}") from None


def _render(data: dict) -> str:
    inputs = data["inputs"]
    if len(inputs) == 1:
        return " ".join(f"{value:.6f}" for value in inputs[0]["embedding"])

    labels = [f"#{i + 1}" for i in range(len(inputs))]
    rows = [[label] + [f"{value:.4f}" for value in row] for label, row in zip(labels, data["similarity"])]
    table = format_table([""] + labels, rows, align_right=set(range(1, len(labels) + 1)))
    legend = [f"{label}  {item['preview']}  ({item['tokens']} tokens)" for label, item in zip(labels, inputs)]
    return "cosine similarity\n" + table + "\n\n" + "\n".join(legend)


@click.command("embed")
@click.argument("texts", nargs=-1)
@click.option("--file", "file_path", type=click.Path(dir_okay=False, allow_dash=True), help="Read texts from this file, one a line ('-' for stdin); blank lines are skipped.")
@click.option("--url", default=None, help="Root URL of the llama-server, without the /v1 of OpenAI clients [default: from serve.host and serve.port, http://127.0.0.1:8080].")
@click.option("--api-key", envvar="QREG_API_KEY", default=None, help="API key the server was started with [env: QREG_API_KEY].")
@click.option("--query", "queries", multiple=True, help="A query to embed with the task instruction, before the TEXTS (repeatable).")
@click.option("--instruct", "task", default=None, help="Task of the instruction, sent as 'Instruct: TASK\\nQuery:TEXT'; applies to --query texts, or to all TEXTS without --query [default with --query: Qwen's web search task].")
@click.option("--dimensions", type=int, default=None, help="Keep the first N dimensions and re-normalize (32 to the model's 1024).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True, help="Seconds to wait for each request.")
@json_option
@quiet_option
def embed_command(
    texts: tuple[str, ...],
    file_path: str | None,
    queries: tuple[str, ...],
    url: str | None,
    api_key: str | None,
    task: str | None,
    dimensions: int | None,
    timeout: float,
    json_mode: bool,
    quiet: bool,
) -> None:
    """Embed TEXTS with a running server: one text prints its vector, two or more their cosine similarities.

    Qwen3-Embedding expects retrieval queries with a one-sentence task instruction and
    documents without one: pass queries with --query (and the task with --instruct).

    Each input is sent with exactly one <|endoftext|> at its end, which Qwen3-Embedding's
    last-token pooling needs; qreg queries the server's /tokenize to learn whether it appends one itself.
    Without TEXTS and --file, texts are read from stdin, one a line.

    \b
    Examples:
      qreg embed "first text" "second text"
      qreg embed --query "what is GGUF" "GGUF is a file format for models" "The cat sleeps"
      qreg embed --instruct "Given a question, retrieve passages that answer it" "what is GGUF"
      qreg embed --file texts.txt --json --dimensions 256
    """
    from registry.embed import EmbedClient, check_dimensions, cosine_matrix, preview

    output = make_output(json_mode, quiet)
    base_url = _base_url(url)
    _check_task(task)

    documents, source = _read_texts(texts, file_path, stdin_allowed=not queries)
    inputs = _with_instructions(queries, documents, task, source)

    with EmbedClient(base_url, api_key=api_key, timeout=timeout) as client:
        if dimensions is not None:
            check_dimensions(dimensions, _embedding_length(client))
        embeddings = client.embed([sent for sent, _shown in inputs], dimensions=dimensions)

    vectors = [item.vector for item in embeddings]
    data = {
        "url": base_url,
        "dimensions": len(vectors[0]),
        "inputs": [
            {"text": shown, "sent": item.sent, "preview": preview(shown), "tokens": item.tokens, "embedding": item.vector}
            for (_sent, shown), item in zip(inputs, embeddings)
        ],
        "similarity": cosine_matrix(vectors) if len(vectors) > 1 else None,
    }
    output.info(f"{len(vectors)} embedding(s) of {len(vectors[0])} dimensions from {base_url}")
    output.result(data, _render)


def _embedding_length(client) -> int:
    # One request with a short text gives the model's embedding length without a manifest.
    return len(client.embed(["a"])[0].vector)
