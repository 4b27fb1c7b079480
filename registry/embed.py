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
EMBEDDINGS_PATH = "/v1/embeddings"
URL_EXAMPLE = "http://127.0.0.1:8080"
NOT_LLAMA_HINT = "check that --url points at a llama-server, such as one started with 'qreg serve'"
FAULTY_MODEL_HINT = "check the served file with 'qreg verify' or 'qreg inspect', or serve another variant"


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
    """Keep the first `dimensions` values (all when None) and scale them to unit length.

    An all-zero vector has no direction and is returned unscaled, so callers that need
    a unit vector must reject it first (EmbedClient.embed does).
    """
    kept = list(vector[:dimensions] if dimensions else vector)
    largest = max((abs(value) for value in kept), default=0.0)
    if largest == 0.0:
        return kept

    # Dividing by the largest magnitude first keeps the norm from overflowing to inf
    # (or underflowing to 0) for any finite values.
    scaled = [value / largest for value in kept]
    norm = math.hypot(*scaled)
    return [value / norm for value in scaled]


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
    """An httpx client for one llama-server, with EOS handling and per-slot length checks.

    Every response is checked against the shape llama-server returns, so a server of
    another kind ends in an EmbedError naming the endpoint, never in a wrong vector.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        import httpx

        check_url(url)
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)
        except httpx.InvalidURL as error:
            raise UsageError(f"invalid --url '{url}': {error}", hint=f"pass a URL like {URL_EXAMPLE}") from None
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
        """Send one request and return its JSON object.

        Raises EmbedError when the request fails or the body is not a JSON object, and
        UsageError when httpx rejects the URL.
        """
        response = self._send(method, path, **kwargs)

        if response.status_code == 401:
            raise EmbedError(
                f"the server at {self.url} rejected the request as unauthorized (401)",
                hint="pass --api-key or set QREG_API_KEY to the key the server was started with",
            )
        if response.status_code >= 400:
            raise EmbedError(
                f"{method} {self.url}{path} returned {response.status_code}: {_error_text(response)}",
                hint=self._status_hint(response.status_code),
            )

        try:
            body = response.json()
        except (ValueError, RecursionError):
            raise self._unexpected(method, path, "a body that is not JSON") from None
        if not isinstance(body, dict):
            raise self._unexpected(method, path, f"a JSON {_json_type(body)} where an object was expected")
        return body

    def _send(self, method: str, path: str, **kwargs):
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise EmbedError(
                f"no server responds at {self.url}", hint="start one with 'qreg serve', or pass --url"
            ) from None
        except httpx.TimeoutException:
            raise EmbedError(f"{method} {self.url}{path} timed out", hint="retry, or send fewer or shorter texts") from None
        except httpx.InvalidURL as error:
            raise UsageError(f"invalid --url '{self.url}': {error}", hint=f"pass a URL like {URL_EXAMPLE}") from None
        except httpx.HTTPError as error:
            raise EmbedError(
                f"{method} {self.url}{path} failed: {error}", hint="check that --url points at a running llama-server"
            ) from None

    def _status_hint(self, status: int) -> str:
        from urllib.parse import urlsplit

        # OpenAI clients take the URL with /v1 as their base, but llama-server's
        # /tokenize and /props live at the root, so a /v1 base URL gets 404 here.
        if status == 404 and urlsplit(self.url).path.endswith("/v1"):
            root = self.url[: -len("/v1")]
            return f"drop /v1 from --url, because qreg embed wants the server root ({root})"
        return "check that --url points at a llama-server started with --embedding"

    def _unexpected(self, method: str, path: str, returned: str, hint: str = NOT_LLAMA_HINT) -> EmbedError:
        return EmbedError(f"{method} {self.url}{path} returned {returned}", hint=hint)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Return the token ids the server gives a text (special token texts are parsed)."""
        tokens = self._post("/tokenize", {"content": text, "add_special": add_special}).get("tokens")
        if not isinstance(tokens, list):
            raise self._unexpected("POST", "/tokenize", "no token list")

        ids = []
        for token in tokens:
            # With "with_pieces", llama-server returns {"id": ..., "piece": ...} per token.
            token_id = token.get("id") if isinstance(token, dict) else token
            if not _is_int(token_id) or token_id < 0:
                raise self._unexpected("POST", "/tokenize", f"an invalid token {_shorten(token)} where an id was expected")
            ids.append(token_id)
        return ids

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
        """Return the server's per-slot context (n_ctx) from /props, or None if /props does not report it."""
        settings = self._request("GET", "/props").get("default_generation_settings")
        if settings is None:
            return None
        if not isinstance(settings, dict):
            raise self._unexpected("GET", "/props", f"default_generation_settings as a JSON {_json_type(settings)}, not an object")

        n_ctx = settings.get("n_ctx")
        if n_ctx is None:
            return None
        if not _is_int(n_ctx) or n_ctx <= 0:
            raise self._unexpected("GET", "/props", f"an invalid n_ctx {_shorten(n_ctx)} where a positive integer was expected")
        return n_ctx

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
        embedding request is sent. Raises EmbedError too when the server returns vectors
        of different lengths, a value that is not a finite number, or a vector whose
        kept values are all zero, since such a vector has no direction to compare.
        """
        prepared = [self.prepare(text) for text in texts]
        counts = [self.count_tokens(sent) for sent in prepared]
        self._check_lengths(texts, counts)

        vectors: list[list[float]] = []
        for start in range(0, len(prepared), REQUEST_BATCH):
            vectors += self._embed_batch(prepared[start : start + REQUEST_BATCH], texts, start)
        self._check_same_size(vectors)

        embeddings = []
        for index, (text, sent, count, vector) in enumerate(zip(texts, prepared, counts, vectors)):
            _check_not_zero(vector, dimensions, index, text)
            unit = truncate_and_normalize(vector, dimensions)
            embeddings.append(Embedding(text=text, sent=sent, tokens=count, vector=unit))
        return embeddings

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

    def _check_same_size(self, vectors: list[list[float]]) -> None:
        for index, vector in enumerate(vectors):
            if len(vector) != len(vectors[0]):
                raise self._unexpected(
                    "POST",
                    EMBEDDINGS_PATH,
                    f"vectors of different lengths: {len(vectors[0])} values for input 1, {len(vector)} for input {index + 1}",
                    hint="check that --url points at one llama-server that serves one model",
                )

    def _embed_batch(self, batch: list[str], texts: Sequence[str], offset: int) -> list[list[float]]:
        try:
            body = self._post(EMBEDDINGS_PATH, {"input": batch, "encoding_format": "float"})
        except EmbedError as error:
            if "exceed" in error.message:
                raise EmbedError(
                    f"an input among texts {offset + 1}-{offset + len(batch)} is longer than the server's per-slot context: "
                    f"{error.message}",
                    hint="split the text, or restart the server with a larger --ctx",
                ) from None
            raise

        data = body.get("data")
        if not isinstance(data, list):
            raise self._unexpected("POST", EMBEDDINGS_PATH, "no data list")
        if len(data) != len(batch):
            raise self._unexpected("POST", EMBEDDINGS_PATH, f"{len(data)} vectors for {len(batch)} inputs")

        ordered = self._in_input_order(data)
        return [self._vector(item, offset + i, texts[offset + i]) for i, item in enumerate(ordered)]

    def _in_input_order(self, data: list) -> list[dict]:
        """Return the data items sorted by their index, which must number the inputs 0 to n-1."""
        for item in data:
            if not isinstance(item, dict):
                raise self._unexpected("POST", EMBEDDINGS_PATH, f"a data item that is a JSON {_json_type(item)}, not an object")

        # An item without an index counts at its position in the list.
        indices = [item.get("index", position) for position, item in enumerate(data)]
        if not all(_is_int(index) for index in indices) or sorted(indices) != list(range(len(data))):
            raise self._unexpected(
                "POST", EMBEDDINGS_PATH, f"data indices {_shorten(indices)} where 0 to {len(data) - 1}, once each, were expected"
            )
        by_index = dict(zip(indices, data))
        return [by_index[index] for index in range(len(data))]

    def _vector(self, item: dict, index: int, text: str) -> list[float]:
        vector = item.get("embedding")
        # Without pooling, llama-server returns one vector per token: a list of lists.
        if isinstance(vector, list) and vector and isinstance(vector[0], list):
            raise EmbedError(
                f"the server returned no pooled vector for '{preview(text)}'",
                hint="serve the model with --pooling last ('qreg serve' does)",
            )
        if not isinstance(vector, list) or not vector:
            raise self._unexpected("POST", EMBEDDINGS_PATH, f"no vector for input {index + 1} ('{preview(text)}')")

        values = []
        for position, value in enumerate(vector):
            number = _as_float(value)
            where = f"at position {position + 1} of the vector for input {index + 1} ('{preview(text)}')"
            if number is None:
                raise self._unexpected("POST", EMBEDDINGS_PATH, f"{_shorten(value)}, which is not a number, {where}")
            if not math.isfinite(number):
                raise self._unexpected("POST", EMBEDDINGS_PATH, f"the non-finite value {number} {where}", hint=FAULTY_MODEL_HINT)
            values.append(number)
        return values


def _check_not_zero(vector: list[float], dimensions: int | None, index: int, text: str) -> None:
    """Raise EmbedError for a vector whose kept values are all zero, since it cannot be scaled to unit length."""
    truncated = vector[:dimensions] if dimensions else vector
    if any(truncated):
        return
    values = f"the first {dimensions} values" if dimensions and dimensions < len(vector) else f"all {len(vector)} values"
    raise EmbedError(
        f"{values} of the vector for input {index + 1} ('{preview(text)}') are zero, so it has no direction to normalize or compare",
        hint=FAULTY_MODEL_HINT,
    )


def check_url(url: str) -> None:
    """Raise UsageError unless the URL is http(s) with a host, as --url must be."""
    from urllib.parse import urlsplit

    if not url:
        raise UsageError(
            "invalid --url '': the URL is empty",
            hint=f"pass a URL like {URL_EXAMPLE}, or leave out --url to use serve.host and serve.port",
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        raise UsageError(f"invalid --url '{url}': {error}", hint=f"pass a URL like {URL_EXAMPLE}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"invalid --url '{url}': it needs http:// or https:// and a host", hint=f"pass a URL like {URL_EXAMPLE}")


def _error_text(response) -> str:
    """Return the server's error message, or the start of its body on one line."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    return preview(response.text) or "(empty body)"


def _is_int(value: object) -> bool:
    # JSON true and false arrive as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """Return a JSON number as a float (inf when an integer is too large for one), or None for any other value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _json_type(value: object) -> str:
    """Return the JSON name of a parsed JSON value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _shorten(value: object) -> str:
    """Return a parsed JSON value as JSON on one line, shortened for a message."""
    import json

    return preview(json.dumps(value))
