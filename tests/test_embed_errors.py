"""Bad input to `qreg embed`: each ends in one line and its exit code, never a traceback.

Most cases use a small fake llama-server on 127.0.0.1 that returns 200 with JSON of
the wrong shape. These are faults a real llama-server cannot be made to produce, so a
fake is the only way to test them. The 404 for a /v1 base URL comes from the real one.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from typing import Any, Callable

import pytest

from registry.embed import EOS_TEXT, truncate_and_normalize
from registry.errors import EmbedError, NotFoundError, UsageError
from server_helpers import llama_server

FAKE_LENGTH = 64  # the fake server's embedding length
FAKE_EOS_ID = 151643


def run(qreg_exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [qreg_exe, "embed", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def strict_json(text: str) -> Any:
    """Parse JSON as RFC 8259 defines it: NaN and Infinity are rejected, unlike json.loads's default."""

    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)


def assert_json_error(result: subprocess.CompletedProcess, kind: str) -> None:
    error = strict_json(result.stdout)["error"]
    assert error["type"] == kind
    assert error["exit_code"] == result.returncode


class _JSONHandler(http.server.BaseHTTPRequestHandler):
    """A quiet handler base that handles GET like POST and sends JSON bodies."""

    def do_GET(self):  # noqa: N802 - the http.server handler name
        self.do_POST()

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _NotLlamaServer(_JSONHandler):
    """A handler that replies to every request like a JSON API that is not llama-server: 404 with a string error."""

    def do_POST(self):  # noqa: N802 - the http.server handler name
        self.reply(404, json.dumps({"error": f"no route for {self.path}"}).encode())


def _serve(handler: type[http.server.BaseHTTPRequestHandler]):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def other_server():
    server = _serve(_NotLlamaServer)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- a fake llama-server ---------------------------------------------------------------


def fake_tokenize(request: dict) -> dict:
    """Tokenize like llama-server with a model that appends EOS: one id a word, then EOS."""
    content = request["content"]
    if content == EOS_TEXT:
        return {"tokens": [FAKE_EOS_ID]}
    words = [100 + i for i, _word in enumerate(content.split())]
    return {"tokens": words + ([FAKE_EOS_ID] if request.get("add_special") else [])}


def fake_embeddings(request: dict) -> dict:
    return {"data": [{"index": i, "embedding": fake_vector(i)} for i in range(len(request["input"]))]}


def fake_vector(index: int, length: int = FAKE_LENGTH) -> list[float]:
    return [float(index + 1)] + [0.5] * (length - 1)


FAKE_ROUTES: dict[str, Any] = {
    "/tokenize": fake_tokenize,
    "/props": {"default_generation_settings": {"n_ctx": 512}},
    "/v1/embeddings": fake_embeddings,
}


def _fake_handler(routes: dict[str, Any]) -> type[http.server.BaseHTTPRequestHandler]:
    """Build a handler that returns 200 on every route and 404 elsewhere.

    A route's value is the JSON body, bytes sent as they are, or a function of the
    request's JSON that returns the body.
    """

    class Handler(_JSONHandler):
        def do_POST(self):  # noqa: N802 - the http.server handler name
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"null")
            answer = routes.get(self.path)
            if callable(answer):
                answer = answer(request)
            body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.reply(200 if self.path in routes else 404, body)

    return Handler


@pytest.fixture
def fake_llama():
    """Start fake llama-servers: call the fixture with the routes to change from FAKE_ROUTES, and it returns the base URL."""
    servers = []

    def start(routes: dict[str, Any] | None = None) -> str:
        server = _serve(_fake_handler({**FAKE_ROUTES, **(routes or {})}))
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def embeddings_with(*vectors: Any) -> Callable[[dict], dict]:
    """Return a /v1/embeddings route that returns these vectors, one an input, in order."""
    return lambda request: {"data": [{"index": i, "embedding": vector} for i, vector in enumerate(vectors)]}


def embeddings_raw(text: str) -> bytes:
    """Return a raw /v1/embeddings body for one input whose embedding is `text`, which may be invalid JSON."""
    return ('{"data": [{"index": 0, "embedding": %s}]}' % text).encode()


# --- input and options ----------------------------------------------------------------


def test_missing_file(qreg_exe, tmp_path):
    result = run(qreg_exe, "--url", "http://127.0.0.1:9", "--file", str(tmp_path / "missing.txt"))
    assert_one_line(result, NotFoundError.exit_code, "missing.txt: no such file")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_named(qreg_exe, tmp_path, content):
    texts = tmp_path / "texts.txt"
    texts.write_text(content, encoding="utf-8")
    result = run(qreg_exe, "--url", "http://127.0.0.1:9", "--file", str(texts))
    assert_one_line(result, UsageError.exit_code, f"no text to embed: --file {texts} is empty or has only blank lines")
    assert texts.read_text(encoding="utf-8") == content


def test_empty_stdin_named(qreg_exe):
    result = run(qreg_exe, "--url", "http://127.0.0.1:9")
    assert_one_line(result, UsageError.exit_code, "no text to embed: stdin is empty")


def test_port_not_a_number(qreg_exe):
    result = run(qreg_exe, "--url", "http://127.0.0.1:abc", "hi")
    assert_one_line(result, UsageError.exit_code, "invalid --url", "http://127.0.0.1:8080")


def test_url_without_scheme_json(qreg_exe):
    result = run(qreg_exe, "--url", "notaurl", "--json", "hi")
    assert_one_line(result, UsageError.exit_code, "invalid --url 'notaurl'")
    assert json.loads(result.stdout)["error"]["type"] == "usage"


def test_url_empty(qreg_exe):
    result = run(qreg_exe, "--url", "", "--json", "hi")
    assert_one_line(result, UsageError.exit_code, "invalid --url '': the URL is empty", "leave out --url")
    assert_json_error(result, "usage")


@pytest.mark.parametrize("task", ["", "   "])
def test_instruct_empty(qreg_exe, fake_llama, task):
    result = run(qreg_exe, "--url", fake_llama(), "--instruct", task, "hi")
    assert_one_line(result, UsageError.exit_code, f"invalid --instruct '{task}': the task is empty")


# --- servers that are not llama-server ------------------------------------------------


def test_server_that_is_not_llama(qreg_exe, other_server):
    result = run(qreg_exe, "--url", other_server, "hi")
    assert_one_line(result, EmbedError.exit_code, "returned 404: no route for /tokenize", "llama-server")


@pytest.fixture
def real_server_url(llama_server_bin, fixture_ggufs):
    with llama_server(llama_server_bin, fixture_ggufs.files["Q8_0"], "--pooling", "last") as url:
        yield url


def test_url_with_v1(qreg_exe, real_server_url):
    result = run(qreg_exe, "--url", real_server_url + "/v1/", "hi")
    assert_one_line(
        result,
        EmbedError.exit_code,
        f"POST {real_server_url}/v1/tokenize returned 404",
        f"drop /v1 from --url, because qreg embed wants the server root ({real_server_url})",
    )


def test_fake_llama_baseline(qreg_exe, fake_llama):
    # The fake returns well-formed responses unless a test changes a route, so each failure below has one cause.
    result = run(qreg_exe, "--url", fake_llama(), "--json", "a b", "c")
    assert result.returncode == 0, result.stderr
    data = strict_json(result.stdout)
    assert data["dimensions"] == FAKE_LENGTH
    assert [item["tokens"] for item in data["inputs"]] == [3, 2]


def test_body_array_everywhere(qreg_exe, fake_llama):
    url = fake_llama({path: [] for path in FAKE_ROUTES})
    result = run(qreg_exe, "--url", url, "--json", "a", "b")
    assert_one_line(
        result, EmbedError.exit_code, f"POST {url}/tokenize returned a JSON array where an object was expected", "llama-server"
    )
    assert_json_error(result, "embed")


def test_body_not_json(qreg_exe, fake_llama):
    url = fake_llama({"/tokenize": b"<html>hello</html>"})
    result = run(qreg_exe, "--url", url, "a")
    assert_one_line(result, EmbedError.exit_code, "returned a body that is not JSON", "check that --url points at a llama-server")


# --- /tokenize --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, shown",
    [(["a", "b"], '"a"'), ([{"piece": "a"}], '{"piece": "a"}'), ([True], "true"), ([-1], "-1")],
)
def test_token_ids_invalid(qreg_exe, fake_llama, tokens, shown):
    result = run(qreg_exe, "--url", fake_llama({"/tokenize": {"tokens": tokens}}), "--json", "a")
    assert_one_line(result, EmbedError.exit_code, f"returned an invalid token {shown} where an id was expected")
    assert_json_error(result, "embed")


def test_token_ids_as_objects(qreg_exe, fake_llama):
    # llama-server's with_pieces form: objects with an id are valid.
    def tokenize_with_pieces(request: dict) -> dict:
        return {"tokens": [{"id": token, "piece": "?"} for token in fake_tokenize(request)["tokens"]]}

    result = run(qreg_exe, "--url", fake_llama({"/tokenize": tokenize_with_pieces}), "a")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("body", [{}, {"tokens": None}, {"tokens": "a b"}])
def test_no_token_list(qreg_exe, fake_llama, body):
    url = fake_llama({"/tokenize": body})
    result = run(qreg_exe, "--url", url, "a")
    assert_one_line(
        result, EmbedError.exit_code, f"POST {url}/tokenize returned no token list", "check that --url points at a llama-server"
    )


# --- /props -------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, kind", [("weird", "string"), ([512], "array"), (512, "number")])
def test_props_settings_not_object(qreg_exe, fake_llama, settings, kind):
    url = fake_llama({"/props": {"default_generation_settings": settings}})
    result = run(qreg_exe, "--url", url, "--json", "a")
    assert_one_line(
        result, EmbedError.exit_code, f"GET {url}/props returned default_generation_settings as a JSON {kind}, not an object"
    )
    assert_json_error(result, "embed")


@pytest.mark.parametrize("n_ctx, shown", [("512", '"512"'), (0, "0"), (512.5, "512.5"), (False, "false")])
def test_props_n_ctx_invalid(qreg_exe, fake_llama, n_ctx, shown):
    url = fake_llama({"/props": {"default_generation_settings": {"n_ctx": n_ctx}}})
    result = run(qreg_exe, "--url", url, "a")
    assert_one_line(result, EmbedError.exit_code, f"returned an invalid n_ctx {shown} where a positive integer was expected")


def test_props_without_n_ctx(qreg_exe, fake_llama):
    # A server that does not report its context skips the length check.
    result = run(qreg_exe, "--url", fake_llama({"/props": {}}), "a")
    assert result.returncode == 0, result.stderr


# --- /v1/embeddings: the data list ----------------------------------------------------------


@pytest.mark.parametrize("body, message", [({}, "no data list"), ({"data": {"0": []}}, "no data list")])
def test_data_missing(qreg_exe, fake_llama, body, message):
    url = fake_llama({"/v1/embeddings": body})
    result = run(qreg_exe, "--url", url, "a")
    assert_one_line(result, EmbedError.exit_code, f"POST {url}/v1/embeddings returned {message}", "llama-server")


def test_data_count_wrong(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_with(fake_vector(0))})
    result = run(qreg_exe, "--url", url, "a", "b")
    assert_one_line(result, EmbedError.exit_code, "returned 1 vectors for 2 inputs", "llama-server")


def test_data_items_strings(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": {"data": ["x", "y"]}})
    result = run(qreg_exe, "--url", url, "--json", "a", "b")
    assert_one_line(result, EmbedError.exit_code, "returned a data item that is a JSON string, not an object")
    assert_json_error(result, "embed")


@pytest.mark.parametrize("indices", [[0, 0], [1, 2], ["0", 1], [None, 1]])
def test_data_indices_invalid(qreg_exe, fake_llama, indices):
    body = {"data": [{"index": index, "embedding": fake_vector(0)} for index in indices]}
    result = run(qreg_exe, "--url", fake_llama({"/v1/embeddings": body}), "a", "b")
    assert_one_line(result, EmbedError.exit_code, "returned data indices", "where 0 to 1, once each, were expected")


def test_data_reordered_by_index(qreg_exe, fake_llama):
    body = {"data": [{"index": 1, "embedding": [0.0, 1.0] * 32}, {"index": 0, "embedding": [1.0, 0.0] * 32}]}
    result = run(qreg_exe, "--url", fake_llama({"/v1/embeddings": body}), "--json", "a", "b")
    assert result.returncode == 0, result.stderr
    inputs = strict_json(result.stdout)["inputs"]
    assert inputs[0]["embedding"][0] > 0.0
    assert inputs[1]["embedding"][0] == 0.0


# --- /v1/embeddings: the vectors --------------------------------------------------------------


def test_vector_string_value(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_with([0.1, "x"] + [0.5] * 62)})
    result = run(qreg_exe, "--url", url, "--json", "alpha")
    assert_one_line(
        result,
        EmbedError.exit_code,
        "returned \"x\", which is not a number, at position 2 of the vector for input 1 ('alpha')",
        "llama-server",
    )
    assert_json_error(result, "embed")


@pytest.mark.parametrize("vector", [None, [], "0.1 0.2", [True] + [0.5] * 63])
def test_vector_not_numbers(qreg_exe, fake_llama, vector):
    result = run(qreg_exe, "--url", fake_llama({"/v1/embeddings": embeddings_with(vector)}), "alpha")
    assert_one_line(result, EmbedError.exit_code, "/v1/embeddings returned", "input 1 ('alpha')", "llama-server")


def test_vector_per_token(qreg_exe, fake_llama):
    # What llama-server returns with --pooling none: one vector per token.
    url = fake_llama({"/v1/embeddings": embeddings_with([fake_vector(0), fake_vector(1)])})
    result = run(qreg_exe, "--url", url, "alpha")
    assert_one_line(result, EmbedError.exit_code, "no pooled vector for 'alpha'", "--pooling last")


@pytest.mark.parametrize(
    "value, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"), ("1e400", "inf"), ("1" + "0" * 400, "inf")]
)
def test_vector_non_finite(qreg_exe, fake_llama, value, shown):
    url = fake_llama({"/v1/embeddings": embeddings_raw(f"[0.1, 0.2, {value}" + ", 0.5" * 61 + "]")})
    result = run(qreg_exe, "--url", url, "--json", "alpha")
    assert_one_line(
        result,
        EmbedError.exit_code,
        f"returned the non-finite value {shown} at position 3 of the vector for input 1 ('alpha')",
        "qreg verify",
    )
    assert_json_error(result, "embed")


def test_vector_non_finite_human(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_raw("[NaN" + ", 0.5" * 63 + "]")})
    result = run(qreg_exe, "--url", url, "alpha")
    assert_one_line(result, EmbedError.exit_code, "non-finite value nan")
    assert result.stdout == ""


def test_vectors_different_lengths(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_with(fake_vector(0, 256), fake_vector(1, 266))})
    result = run(qreg_exe, "--url", url, "--json", "a", "b")
    assert_one_line(
        result,
        EmbedError.exit_code,
        "returned vectors of different lengths: 256 values for input 1, 266 for input 2",
        "one llama-server that serves one model",
    )
    assert_json_error(result, "embed")


def test_vectors_different_lengths_across_batches(qreg_exe, fake_llama):
    # 33 inputs take two requests, and the second request's vector is longer.
    def embeddings(request: dict) -> dict:
        length = FAKE_LENGTH if len(request["input"]) > 1 else FAKE_LENGTH + 1
        return {"data": [{"index": i, "embedding": fake_vector(i, length)} for i in range(len(request["input"]))]}

    texts = [f"text {i}" for i in range(33)]
    result = run(qreg_exe, "--url", fake_llama({"/v1/embeddings": embeddings}), *texts)
    assert_one_line(result, EmbedError.exit_code, "64 values for input 1, 65 for input 33")


def test_vector_all_zero(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_with(fake_vector(0), [0.0] * FAKE_LENGTH)})
    result = run(qreg_exe, "--url", url, "--json", "a", "b")
    assert_one_line(
        result,
        EmbedError.exit_code,
        "all 64 values of the vector for input 2 ('b') are zero, so it has no direction to normalize or compare",
        "qreg verify",
    )
    assert_json_error(result, "embed")


def test_vector_zero_after_truncation(qreg_exe, fake_llama):
    url = fake_llama({"/v1/embeddings": embeddings_with([0.0] * 32 + [0.5] * 32)})
    result = run(qreg_exe, "--url", url, "--dimensions", "32", "a")
    assert_one_line(result, EmbedError.exit_code, "the first 32 values of the vector for input 1 ('a') are zero")


# --- normalization of extreme values ---------------------------------------------------------


def test_normalize_huge_values():
    # A plain sum of squares overflows to inf here and would turn the vector into zeros.
    assert truncate_and_normalize([1e308] * 4, None) == pytest.approx([0.5] * 4)


def test_normalize_tiny_values():
    # A plain sum of squares underflows to 0 here and would leave the vector unscaled.
    assert truncate_and_normalize([3e-300, 4e-300], None) == pytest.approx([0.6, 0.8])
