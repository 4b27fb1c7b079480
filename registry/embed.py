"""A client for llama-server's /v1/embeddings, /tokenize and /props, tuned for Qwen3-Embedding.

Qwen3-Embedding pools the hidden state of the last token, and it was trained with
<|endoftext|> as that token. The client makes sure every input ends with exactly
one: it queries /tokenize to learn whether the server appends EOS itself (a file with
add_eos_token true, or `qreg serve`'s --override-kv) and appends the EOS text only
when it does not. A second EOS would change the vector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from registry.errors import EmbedError, UsageError

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"
# The task Qwen3-Embedding's reference code uses when a query comes without one.
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
MIN_DIMENSIONS = 32  # the smallest Matryoshka dimension Qwen3-Embedding was trained for
REQUEST_BATCH = 32  # inputs per /v1/embeddings request
DEFAULT_TIMEOUT = 300.0
PREVIEW_CHARS = 40


def query_with_instruction(task: str, query: str) -> str:
    """Format a query the way Qwen3-Embedding's reference code does (no space after 'Query:')."""
    return f"Instruct: {task}\nQuery:{query}"


def strip_eos(text: str) -> str:
    """Remove every EOS text from the end of an input."""
    while text.endswith(EOS_TEXT):
        text = text[: -len(EOS_TEXT)]
    return text


def preview(text: str) -> str:
    """Shorten a text to one line for an error message."""
    line = " ".join(text.split())
    return line if len(line) <= PREVIEW_CHARS else line[: PREVIEW_CHARS - 3] + "..."


def truncate_and_normalize(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """Keep the first `dimensions` values (all when None) and scale them to unit length."""
    kept = list(vector[:dimensions] if dimensions else vector)
    norm = math.sqrt(sum(value * value for value in kept))
    if norm == 0.0:
        return kept
    return [value / norm for value in kept]


def cosine_matrix(vectors: Sequence[Sequence[float]]) -> list[list[float]]:
    """Return the cosine similarity of every pair of vectors."""
    norms = [math.sqrt(sum(v * v for v in vector)) or 1.0 for vector in vectors]
    matrix = []
    for i, left in enumerate(vectors):
        row = []
        for j, right in enumerate(vectors):
            dot = sum(a * b for a, b in zip(left, right))
            row.append(dot / (norms[i] * norms[j]))
        matrix.append(row)
    return matrix


def check_dimensions(dimensions: int | None, embedding_length: int) -> None:
    """Raise UsageError when --dimensions is outside 32 to the model's embedding length."""
    if dimensions is None:
        return
    if not MIN_DIMENSIONS <= dimensions <= embedding_length:
        raise UsageError(
            f"invalid --dimensions {dimensions}: this model's embeddings have {embedding_length} dimensions",
            hint=f"use {MIN_DIMENSIONS} to {embedding_length} (Qwen3-Embedding is trained for Matryoshka sizes in that range)",
        )


@dataclass(frozen=True)
class Embedding:
    """One input as sent, its token count and its vector."""

    text: str
    sent: str
    tokens: int
    vector: list[float]


class EmbedClient:
    """An httpx client for one llama-server, with EOS handling and per-slot length checks."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        import httpx

        self.url = url.rstrip("/")
        check_url(self.url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)
        except httpx.InvalidURL as error:
            raise UsageError(f"invalid --url '{url}': {error}", hint="pass a URL like http://127.0.0.1:8080") from None
        self._eos_id: int | None = None
        self._server_adds_eos: bool | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EmbedClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _post(self, path: str, payload: dict) -> dict:
        return self._request("POST", path, json=payload)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise EmbedError(
                f"no server responds at {self.url}", hint="start one with 'qreg serve', or pass --url"
            ) from None
        except httpx.TimeoutException:
            raise EmbedError(f"{method} {self.url}{path} timed out", hint="retry, or send fewer or shorter texts") from None
        except httpx.InvalidURL as error:
            raise UsageError(f"invalid --url '{self.url}': {error}", hint="pass a URL like http://127.0.0.1:8080") from None
        except httpx.HTTPError as error:
            raise EmbedError(
                f"{method} {self.url}{path} failed: {error}", hint="check that --url points at a running llama-server"
            ) from None

        if response.status_code == 401:
            raise EmbedError(
                f"the server at {self.url} rejected the request as unauthorized (401)",
                hint="pass --api-key or set QREG_API_KEY to the key the server was started with",
            )
        if response.status_code >= 400:
            raise EmbedError(
                f"{method} {self.url}{path} returned {response.status_code}: {_error_text(response)}",
                hint="check that --url points at a llama-server started with --embedding",
            )
        try:
            return response.json()
        except ValueError:
            raise EmbedError(f"{method} {self.url}{path} returned a body that is not JSON") from None

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Return the token ids the server gives a text (special token texts are parsed)."""
        tokens = self._post("/tokenize", {"content": text, "add_special": add_special}).get("tokens")
        if not isinstance(tokens, list):
            raise EmbedError(f"POST {self.url}/tokenize returned no token list")
        return [token if isinstance(token, int) else token["id"] for token in tokens]

    def eos_id(self) -> int:
        """Return the id of <|endoftext|> in the served model's vocabulary."""
        if self._eos_id is None:
            tokens = self.tokenize(EOS_TEXT, add_special=False)
            if len(tokens) != 1:
                raise EmbedError(
                    f"the model at {self.url} has no {EOS_TEXT} token (it tokenizes to {tokens})",
                    hint="serve a Qwen3-Embedding file",
                )
            self._eos_id = tokens[0]
        return self._eos_id

    def server_adds_eos(self) -> bool:
        """Tell whether the server appends EOS to every input by itself."""
        if self._server_adds_eos is None:
            tokens = self.tokenize("a", add_special=True)
            self._server_adds_eos = bool(tokens) and tokens[-1] == self.eos_id()
            log.info("server at %s appends EOS: %s", self.url, self._server_adds_eos)
        return self._server_adds_eos

    def slot_context(self) -> int | None:
        """Return the server's per-slot context (n_ctx) from /props, or None if it is not reported."""
        props = self._request("GET", "/props")
        n_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None

    def prepare(self, text: str) -> str:
        """Return the text to send so that the model gets exactly one EOS at the end of the input."""
        bare = strip_eos(text)
        return bare if self.server_adds_eos() else bare + EOS_TEXT

    def count_tokens(self, sent: str) -> int:
        """Return how many tokens the server will embed for a prepared input."""
        return len(self.tokenize(sent, add_special=True))

    def embed(self, texts: Sequence[str], *, dimensions: int | None = None) -> list[Embedding]:
        """Embed texts; each vector has unit length, truncated first when dimensions is given.

        Raises EmbedError naming the first input over the per-slot limit before any
        embedding request is sent.
        """
        prepared = [self.prepare(text) for text in texts]
        counts = [self.count_tokens(sent) for sent in prepared]
        self._check_lengths(texts, counts)

        vectors: list[list[float]] = []
        for start in range(0, len(prepared), REQUEST_BATCH):
            vectors += self._embed_batch(prepared[start : start + REQUEST_BATCH], texts, start)

        return [
            Embedding(text=text, sent=sent, tokens=count, vector=truncate_and_normalize(vector, dimensions))
            for text, sent, count, vector in zip(texts, prepared, counts, vectors)
        ]

    def _check_lengths(self, texts: Sequence[str], counts: list[int]) -> None:
        n_ctx = self.slot_context()
        if n_ctx is None:
            return
        # llama-server rejects an input of n_ctx tokens or more ("exceeds the available context size").
        for index, (text, count) in enumerate(zip(texts, counts)):
            if count >= n_ctx:
                raise EmbedError(
                    f"input {index + 1} ('{preview(text)}') has {count} tokens, over the server's "
                    f"per-slot limit of {n_ctx - 1}",
                    hint="split the text, or restart the server with a larger --ctx",
                )

    def _embed_batch(self, batch: list[str], texts: Sequence[str], offset: int) -> list[list[float]]:
        try:
            body = self._post("/v1/embeddings", {"input": batch, "encoding_format": "float"})
        except EmbedError as error:
            if "exceed" in error.message:
                raise EmbedError(
                    f"an input among texts {offset + 1}-{offset + len(batch)} is longer than the server's per-slot context: "
                    f"{error.message}",
                    hint="split the text, or restart the server with a larger --ctx",
                ) from None
            raise

        data = sorted(body.get("data", []), key=lambda item: item.get("index", 0))
        if len(data) != len(batch):
            raise EmbedError(f"POST {self.url}/v1/embeddings returned {len(data)} vectors for {len(batch)} inputs")
        return [_vector(item, texts[offset + i]) for i, item in enumerate(data)]


def _vector(item: dict, text: str) -> list[float]:
    vector = item.get("embedding")
    # Without pooling, llama-server returns one vector per token: a list of lists.
    if not isinstance(vector, list) or not vector or not isinstance(vector[0], (int, float)):
        raise EmbedError(
            f"the server returned no pooled vector for '{preview(text)}'",
            hint="serve the model with --pooling last ('qreg serve' does)",
        )
    return [float(value) for value in vector]


def check_url(url: str) -> None:
    """Raise UsageError unless the URL is http(s) with a host, as --url must be."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        raise UsageError(f"invalid --url '{url}': {error}", hint="pass a URL like http://127.0.0.1:8080") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"invalid --url '{url}': it needs http:// or https:// and a host", hint="pass a URL like http://127.0.0.1:8080")


def _error_text(response) -> str:
    """Return the server's error message, or the start of its body on one line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    return preview(response.text) or "(empty body)"
