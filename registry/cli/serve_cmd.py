"""`qreg serve`, `qreg ps` and `qreg stop`: run llama-server for a variant and track detached servers."""

from __future__ import annotations

import shlex
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import click

from registry.cli.options import json_option, make_output, manifest_option, quiet_option
from registry.cli.output import Output, format_table
from registry.cli.recommend_cmd import serving_options
from registry.errors import EXIT_INTERRUPTED, NotFoundError, NothingFitsError, QregError, UsageError
from registry.manifest import Variant

PASSTHROUGH_META_KEY = "qreg.serve.passthrough"
CURL_SAMPLE_INPUT = "hello world"


class PassthroughCommand(click.Command):
    """A command whose arguments after `--` are kept for llama-server instead of parsed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            split = args.index("--")
            ctx.meta[PASSTHROUGH_META_KEY] = tuple(args[split + 1 :])
            args = args[:split]
        return super().parse_args(ctx, args)


@dataclass(frozen=True)
class ModelChoice:
    """The file to serve and, when the manifest lists it, its variant."""

    path: Path
    variant: Variant | None
    reason: str

    @property
    def label(self) -> str:
        return self.variant.name if self.variant is not None else self.path.name


# --- choosing the file --------------------------------------------------------------


def choose_model(
    manifest, variant_name: str | None, model_file: str | None, *, pull: bool, settings, device, output: Output,
    dry_run: bool = False,
) -> ModelChoice:
    """Find the file to serve: --model FILE, the named variant, or the pulled variant recommend picks.

    With dry_run nothing is downloaded, even with --pull.
    """
    if model_file is not None:
        if variant_name is not None:
            raise UsageError(f"pass either VARIANT ({variant_name}) or --model ({model_file}), not both")
        path = Path(model_file).expanduser()
        check_model_file(path)
        return ModelChoice(path=path.resolve(), variant=manifest.by_file(path.name), reason="--model")

    from registry import store

    if variant_name is not None:
        variant = manifest.resolve(variant_name)
        path = store.pulled_path(manifest, variant)
        if path is None:
            path = _pull_or_fail(manifest, variant, pull and not dry_run, output, dry_run=dry_run)
        return ModelChoice(path=path, variant=variant, reason="named")

    return _recommended_pulled(manifest, settings, device)


def check_model_file(path: Path) -> None:
    """Check that --model names a regular file, with the exit codes 'qreg inspect' uses for the same path.

    A missing file is NotFoundError (3), a FIFO or device UsageError (2), and a path
    that cannot be examined (permission denied, a symlink loop) QregError (1).
    """
    # stat, not open: opening a FIFO for reading would block until a writer appears.
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"model file {path} not found", hint="check the path given to --model") from None
    except OSError as error:
        raise QregError(f"model file {path}: cannot read: {error.strerror}", hint="check the path given to --model") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"model file {path} is not a regular file", hint="pass the path of a .gguf file to --model")


def _pull_or_fail(manifest, variant, pull: bool, output: Output, *, dry_run: bool = False) -> Path:
    from registry.store import not_pulled_error

    if dry_run:
        error = not_pulled_error(manifest, variant)
        raise NotFoundError(f"{error.message}, and --dry-run downloads nothing", hint=f"run 'qreg pull {variant.name}' first")
    if not pull:
        error = not_pulled_error(manifest, variant)
        raise NotFoundError(error.message, hint=f"{error.hint}, or pass --pull")
    from registry.hub import pull as pull_variant

    output.info(f"pulling {variant.name} ({variant.file})")
    result = pull_variant(manifest, variant, output=output)
    return Path(result.path)


def _recommended_pulled(manifest, settings, device) -> ModelChoice:
    from registry import store
    from registry.recommend import recommend

    pulled = {item.variant for item in store.list_pulled(manifest) if item.state == "verified"}
    if not pulled:
        raise NotFoundError(
            "no variant is pulled, so there is nothing to serve",
            hint="run 'qreg recommend', then 'qreg pull VARIANT', or name a variant with --pull",
        )
    recommendation = recommend(manifest, device, settings, only=pulled)
    variant = recommendation.pick
    if variant is None:
        raise NothingFitsError(
            f"none of the pulled variants ({', '.join(sorted(pulled))}) is eligible and fits: {recommendation.reason}",
            hint="name the variant to serve it anyway, or lower --ctx, --parallel or --ubatch",
        )
    path = store.pulled_path(manifest, variant)
    if path is None:
        raise store.not_pulled_error(manifest, variant)
    return ModelChoice(path=path, variant=variant, reason="recommended among the pulled variants")


# --- checks before launch -------------------------------------------------------------


def read_file_facts(path: Path, manifest, output: Output) -> dict:
    """Read what serving needs from a file's header and print the warnings qreg cannot fix.

    Returns {"add_eos": bool | None, "variant": name | None}. The facts are cached by
    path, size and mtime, because reading a header imports gguf and numpy, which
    adds about 0.2 s to every start.
    """
    from registry.server import cached_by_file

    facts = cached_by_file("gguf-facts", path, lambda: _file_facts(path, manifest), context=str(manifest.path))
    for warning in facts["warnings"]:
        output.warn(warning)
    return facts


def _file_facts(path: Path, manifest) -> dict:
    from registry.inspect import inspect_file, serving_warnings

    report = inspect_file(path, manifest)
    # qreg fixes the EOS and pooling findings itself, with the override and --pooling last.
    fixed_by_qreg = ("add-eos-off", "pooling-missing", "pooling-not-last")
    warnings = [w.one_line() for w in serving_warnings(report, manifest.model) if w.code not in fixed_by_qreg]
    match = report.variant_match
    variant = match.variant if match.confidence in ("exact", "high") else None
    return {"add_eos": report.add_eos, "variant": variant, "warnings": warnings}


def warn_if_too_big(choice: ModelChoice, manifest, settings, device, output: Output) -> None:
    """Warn when the memory estimate for these settings exceeds the memory available."""
    if choice.variant is None:
        return
    from registry.estimate import estimate_memory
    from registry.units import format_size

    estimate = estimate_memory(manifest.model, choice.variant, settings, file_size=choice.path.stat().st_size)
    checks = [(estimate.ram_bytes, device.ram_available_bytes, "RAM"), (estimate.vram_bytes, device.vram_free_bytes, "free VRAM")]
    for needed, available, pool in checks:
        if needed and available is not None and needed > available:
            output.warn(
                f"{choice.label} with --ctx {settings.ctx} x --parallel {settings.parallel} needs about "
                f"{format_size(needed)} of {pool}, more than the {format_size(available)} available; "
                "lower --ctx, --parallel or --ubatch, or pick a smaller variant ('qreg recommend')"
            )


def warn_if_exposed(host: str, api_key: str | None, output: Output) -> None:
    from registry.server import is_loopback

    if is_loopback(host):
        return
    output.warn(f"llama-server listens on {host}, so the endpoint is reachable from the network")
    if not api_key:
        output.warn("no --api-key or QREG_API_KEY is set, so anyone who reaches it can use it unauthenticated")


def curl_example(url: str, api_key: str | None) -> str:
    """Return a ready-to-paste curl for /v1/embeddings (the key as $QREG_API_KEY, never its value)."""
    auth = ' -H "Authorization: Bearer $QREG_API_KEY"' if api_key else ""
    body = shlex.quote('{"input": ["' + CURL_SAMPLE_INPUT + '"]}')
    return f"curl -s {url}/v1/embeddings -H 'Content-Type: application/json'{auth} -d {body}"


# --- the commands -------------------------------------------------------------------


@click.command("serve", cls=PassthroughCommand)
@click.argument("variant_name", metavar="[VARIANT]", required=False)
@click.option("--model", "model_file", type=click.Path(dir_okay=False), default=None, help="Serve this GGUF file instead of a pulled variant.")
@click.option("--pull", is_flag=True, help="Pull (and verify) the variant first when it is not pulled yet.")
@serving_options
@click.option("--backend", metavar="NAME", default=None, help="cpu, cuda, metal or vulkan: cpu passes -ngl 0, the others -ngl 999 [default: detected, as in 'qreg recommend'].")
@click.option("--host", default=None, help="Address to listen on: an IP address or a host name that resolves [env: QREG_HOST; default 127.0.0.1].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port to listen on [env: QREG_PORT; default 8080].")
@click.option("--api-key", envvar="QREG_API_KEY", default=None, help="Require this API key; llama-server gets it through its environment, never its command line [env: QREG_API_KEY].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for llama-server (-t) [default: llama-server's choice].")
@click.option("--server-bin", default=None, help="Path of llama-server [env: QREG_LLAMA_SERVER; config server.bin; default: search PATH].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True, help="Seconds to wait for llama-server to become healthy.")
@click.option("--detach", is_flag=True, help="Leave llama-server running in the background once healthy; see 'qreg ps' and 'qreg stop'.")
@click.option("--dry-run", is_flag=True, help="Print the llama-server command (API key masked) and exit.")
@manifest_option
@json_option
@quiet_option
@click.pass_context
def serve_command(
    click_ctx: click.Context,
    variant_name: str | None,
    model_file: str | None,
    pull: bool,
    ctx: int | None,
    parallel: int | None,
    cache_type: str | None,
    ubatch: int | None,
    backend: str | None,
    host: str | None,
    port: int | None,
    api_key: str | None,
    threads: int | None,
    server_bin: str | None,
    timeout: float,
    detach: bool,
    dry_run: bool,
    manifest_path: str | None,
    json_mode: bool,
    quiet: bool,
) -> None:
    """Run llama-server for VARIANT and wait until it is healthy; Ctrl-C stops it.

    Without VARIANT, qreg serves the pulled variant that 'qreg recommend' would pick.
    Arguments after -- go to llama-server unchanged, after qreg's own.

    \b
    Examples:
      qreg serve Q4_K_M
      qreg serve Q4_K_M --pull --ctx 2048 --parallel 4
      qreg serve --model ./model.gguf --port 9000 --dry-run
      qreg serve Q8_0 --detach && qreg embed "hello" && qreg stop
      qreg serve Q4_K_M -- --threads-http 4
    """
    from registry.config import resolve
    from registry.device import detect_device
    from registry.manifest import load_manifest
    from registry.server import LaunchSpec, validate_host
    from registry.serving import ServeSettings

    output = make_output(json_mode, quiet)
    manifest = load_manifest(manifest_path)
    device = detect_device()
    settings = ServeSettings.from_options(
        ctx=ctx, parallel=parallel, cache_type=cache_type, ubatch=ubatch, backend=backend or device.backend,
        model_context=manifest.model.context_length,
    )
    host_value, host_source = resolve("serve.host", host)
    validate_host(host_value, host_source)
    port_value, _ = resolve("serve.port", port)

    choice = choose_model(
        manifest, variant_name, model_file, pull=pull, settings=settings, device=device, output=output, dry_run=dry_run,
    )
    facts = read_file_facts(choice.path, manifest, output)
    if choice.variant is None and facts["variant"] is not None:
        choice = ModelChoice(path=choice.path, variant=manifest.resolve(facts["variant"]), reason=choice.reason)
    spec = LaunchSpec(
        model_path=choice.path,
        settings=settings,
        host=host_value,
        port=port_value,
        add_eos_override=facts["add_eos"] is not True,
        threads=threads,
        extra_args=tuple(click_ctx.meta.get(PASSTHROUGH_META_KEY, ())),
    )
    from registry.server import prepare_launch

    prepared = prepare_launch(spec, server_bin=server_bin, api_key=api_key)
    warn_if_exposed(host_value, api_key, output)
    output.info(slot_note(settings))
    warn_if_too_big(choice, manifest, settings, device, output)
    if dry_run:
        output.result(describe_launch(prepared, choice), _render_dry_run)
        return

    run = run_detached if detach else run_foreground
    exit_code = run(prepared, choice, output, timeout)
    if exit_code:
        click_ctx.exit(exit_code)


def slot_note(settings) -> str:
    """Describe the per-slot token limit and the -c arithmetic behind it."""
    slots = "slot" if settings.parallel == 1 else "slots"
    return (
        f"per-slot limit: {settings.ctx - 1} tokens per input "
        f"(-c {settings.total_context} = {settings.ctx} x {settings.parallel} {slots}; "
        f"-b/-ub {settings.batch})"
    )


def describe_launch(prepared, choice: ModelChoice) -> dict:
    """Return what a launch would run, for --dry-run and the ready message; the API key is masked."""
    spec = prepared.spec
    return {
        "command": prepared.command,
        "binary": str(prepared.binary.path),
        "binary_source": prepared.binary_source,
        "server_version": prepared.binary.version,
        "args": prepared.args,
        "api_key_env": prepared.binary.api_key_env if prepared.api_key else None,
        "model": str(choice.path),
        "variant": choice.variant.name if choice.variant is not None else None,
        "url": prepared.url,
        "slot_token_limit": spec.slot_token_limit,
        "settings": spec.settings.to_dict(),
        "add_eos_override": spec.add_eos_override,
    }


def _render_dry_run(data: dict) -> str:
    return data["command"]


def _render_ready(data: dict) -> str:
    lines = [
        f"serving {data['variant'] or data['model']} at {data['url']} (llama-server pid {data['pid']}, "
        f"ready in {data['ready_seconds']:.2f} s)",
        f"  model: {data['model']}",
        f"  per-slot limit: {data['slot_token_limit']} tokens",
        f"  log: {data['log']}",
        "try:",
        f"  {data['curl']}",
    ]
    return "\n".join(lines)


def _launch(prepared, output: Output, *, detach: bool):
    from registry.server import ServerProcess, check_port_free, log_path_for

    spec = prepared.spec
    check_port_free(spec.host, spec.port)
    output.info(f"starting {prepared.command}")
    return ServerProcess.start(
        prepared.binary.path, prepared.args, env=prepared.env(), url=prepared.url,
        log_path=log_path_for(spec.port), detach=detach,
    )


def _start(prepared, output: Output, timeout: float):
    process = _launch(prepared, output, detach=False)
    try:
        ready_seconds = process.wait_until_healthy(timeout)
    except BaseException:
        process.stop()
        raise
    return process, ready_seconds


def _ready_data(prepared, choice: ModelChoice, process, ready_seconds: float) -> dict:
    data = describe_launch(prepared, choice)
    data.update(
        pid=process.pid,
        log=str(process.log_path),
        ready_seconds=round(ready_seconds, 3),
        curl=curl_example(prepared.url, prepared.api_key),
    )
    return data


def run_foreground(prepared, choice: ModelChoice, output: Output, timeout: float) -> int:
    """Start llama-server, wait until healthy, serve until a signal or its exit; return qreg's exit code.

    Ctrl-C, SIGTERM and SIGHUP stop llama-server and return 128 + the signal number
    (130, 143, 129).
    """
    from registry.server import ServerStartError, StopSignal, stop_signals_raise

    process = None
    with stop_signals_raise():
        try:
            process, ready_seconds = _start(prepared, output, timeout)
            output.result(_ready_data(prepared, choice, process, ready_seconds), _render_ready)
            output.info("press Ctrl-C to stop")
            raise process.exited_error(process.wait())
        except StopSignal as stop:
            output.info(f"stopping llama-server on {signal.Signals(stop.signum).name}")
            return stop.exit_code
        except KeyboardInterrupt:
            # Ctrl-C is how a foreground server is meant to stop, so it is no error.
            output.info("stopping llama-server on SIGINT")
            return EXIT_INTERRUPTED
        except ServerStartError as error:
            _show_log_tail(error)
            raise
        finally:
            if process is not None:
                process.stop()


def run_detached(prepared, choice: ModelChoice, output: Output, timeout: float) -> int:
    """Start llama-server in a session of its own, record it and wait until it is healthy.

    The record is written before the wait, so a server stays visible to 'qreg ps' and
    'qreg stop' even when qreg is killed while waiting. Until the server is healthy,
    any failure, Ctrl-C, SIGTERM or SIGHUP stops it and deletes the record. Returns
    qreg's exit code: 0 once healthy, or 128 + the signal number (130, 143, 129)
    after a one-line error.
    """
    from registry.server import ServerStartError, StopSignal, stop_signals_raise

    process = None
    with stop_signals_raise() as signals:
        try:
            with signals.deferred():
                process = _launch(prepared, output, detach=True)
            _record(prepared, choice, process)
            ready_seconds = process.wait_until_healthy(timeout)
        except (StopSignal, KeyboardInterrupt) as stop:
            signum = stop.signum if isinstance(stop, StopSignal) else signal.SIGINT
            _stop_unready(process)
            _report_stop_signal(signum, prepared, output)
            return 128 + signum
        except ServerStartError as error:
            _stop_unready(process)
            _show_log_tail(error)
            raise
        except BaseException:
            _stop_unready(process)
            raise

    output.result(_ready_data(prepared, choice, process, ready_seconds), _render_ready)
    output.info(f"llama-server keeps running in the background; stop it with 'qreg stop {prepared.spec.port}'")
    return 0


def _record(prepared, choice: ModelChoice, process) -> None:
    from registry.server import DetachedServer, record_detached

    record_detached(
        DetachedServer(
            pid=process.pid, port=prepared.spec.port, host=prepared.spec.host, url=prepared.url,
            model=str(choice.path), variant=choice.variant.name if choice.variant is not None else None,
            log=str(process.log_path), started=time.time(), binary=str(prepared.binary.path),
        )
    )


def _stop_unready(process) -> None:
    from registry.server import forget_detached

    if process is None:
        return
    process.stop()
    forget_detached(process.pid)


def _report_stop_signal(signum: int, prepared, output: Output) -> None:
    from registry.cli.output import print_error

    name = signal.Signals(signum).name
    message = f"{name} arrived before llama-server on port {prepared.spec.port} was healthy, so qreg stopped it"
    print_error(message, kind="interrupted", exit_code=128 + signum, json_mode=output.json_mode)


def _show_log_tail(error) -> None:
    # The tail goes to stderr in every output mode, since it explains the failure.
    if not error.log_tail:
        return
    click.echo(f"last {len(error.log_tail)} lines of {error.log_path}:", err=True)
    for line in error.log_tail:
        click.echo(f"  {line}", err=True)


@click.command("ps")
@json_option
def ps_command(json_mode: bool) -> None:
    """List the llama-server processes started with 'qreg serve --detach' that still run.

    \b
    Examples:
      qreg ps
      qreg ps --json
    """
    from registry.server import list_detached

    servers = list_detached()
    make_output(json_mode).result({"servers": [server.to_dict() for server in servers]}, _render_ps)


def _render_ps(data: dict) -> str:
    servers = data["servers"]
    if not servers:
        return "no detached servers are running"
    rows = [
        [str(s["pid"]), str(s["port"]), s["url"], s["variant"] or Path(s["model"]).name, _uptime(s["started"]), s["log"]]
        for s in servers
    ]
    return format_table(["PID", "PORT", "URL", "MODEL", "UP", "LOG"], rows, align_right={0, 1})


def _uptime(started: float) -> str:
    seconds = max(0, int(time.time() - started))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


@click.command("stop")
@click.argument("server", metavar="[PORT|PID]", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every server started with 'qreg serve --detach'.")
@json_option
def stop_command(server: str | None, stop_all: bool, json_mode: bool) -> None:
    """Stop a llama-server started with 'qreg serve --detach' (SIGTERM, then SIGKILL after 5 s).

    Without PORT|PID, stops the only one running.

    \b
    Examples:
      qreg stop
      qreg stop 8080
      qreg stop --all
    """
    from registry.server import list_detached, select_detached, stop_detached

    output = make_output(json_mode)
    servers = list_detached()
    if stop_all:
        chosen = servers
    elif not servers:
        raise NotFoundError("no server started with 'qreg serve --detach' is running", hint="run 'qreg ps'")
    else:
        chosen = [select_detached(servers, server)]

    stopped = []
    for item in chosen:
        killed = stop_detached(item)
        stopped.append({"pid": item.pid, "port": item.port, "killed": killed})
    output.result({"stopped": stopped}, _render_stopped)


def _render_stopped(data: dict) -> str:
    if not data["stopped"]:
        return "no detached servers were running"
    return "\n".join(
        f"stopped llama-server pid {item['pid']} on port {item['port']}" + (" (killed)" if item["killed"] else "")
        for item in data["stopped"]
    )
