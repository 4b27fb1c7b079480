"""Tests of llama-server's argument list, binary discovery, flag checks and `qreg serve --dry-run`."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from registry import config
from registry.cli.main import cli
from registry.errors import NotFoundError, ServerBinaryError, UsageError
from registry.server import (
    ADD_EOS_OVERRIDE,
    LaunchSpec,
    ServerBinary,
    build_server_args,
    check_flags,
    find_server_binary,
    format_command,
    parse_help_options,
    probe_server_binary,
    server_env,
)
from registry.serving import ServeSettings
from server_helpers import set_add_eos

MODEL = Path("/models/m.gguf")


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- the pure argument builder ------------------------------------------------------


def test_args_defaults():
    args = build_server_args(LaunchSpec(model_path=MODEL))
    assert args == [
        "-m", "/models/m.gguf",
        "--embedding",
        "--pooling", "last",
        "-c", "8192",
        "-np", "1",
        "-b", "512",
        "-ub", "512",
        "--override-kv", ADD_EOS_OVERRIDE,
        "-ngl", "0",
        "--host", "127.0.0.1",
        "--port", "8080",
    ]


@pytest.mark.parametrize(
    "ctx,parallel,total,batch",
    [(8192, 1, 8192, 512), (2048, 4, 8192, 512), (512, 8, 4096, 512), (256, 2, 512, 256), (32768, 2, 65536, 512), (1, 1, 1, 1)],
)
def test_args_slot_arithmetic(ctx, parallel, total, batch):
    args = build_server_args(LaunchSpec(model_path=MODEL, settings=ServeSettings(ctx=ctx, parallel=parallel)))
    assert flag_value(args, "-c") == str(total)
    assert flag_value(args, "-np") == str(parallel)
    assert flag_value(args, "-b") == str(batch)
    assert flag_value(args, "-ub") == str(batch)


@pytest.mark.parametrize("ctx,ubatch,expected", [(8192, 2048, 2048), (8192, 8192, 8192), (1024, 4096, 1024), (8192, 1, 1)])
def test_args_ubatch_capped_at_ctx(ctx, ubatch, expected):
    args = build_server_args(LaunchSpec(model_path=MODEL, settings=ServeSettings(ctx=ctx, ubatch_size=ubatch)))
    assert flag_value(args, "-b") == str(expected)
    assert flag_value(args, "-ub") == str(expected)


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_args_quantized_cache(cache_type):
    args = build_server_args(LaunchSpec(model_path=MODEL, settings=ServeSettings(cache_type=cache_type)))
    assert flag_value(args, "-ctk") == cache_type
    assert flag_value(args, "-ctv") == cache_type
    assert flag_value(args, "-fa") == "on"


def test_args_f16_cache_has_no_cache_flags():
    args = build_server_args(LaunchSpec(model_path=MODEL))
    for flag in ("-ctk", "-ctv", "-fa"):
        assert flag not in args


def test_args_without_eos_override():
    args = build_server_args(LaunchSpec(model_path=MODEL, add_eos_override=False))
    assert "--override-kv" not in args


@pytest.mark.parametrize("backend,layers", [("cpu", "0"), ("cuda", "999"), ("metal", "999"), ("vulkan", "999")])
def test_args_gpu_layers(backend, layers):
    args = build_server_args(LaunchSpec(model_path=MODEL, settings=ServeSettings(backend=backend)))
    assert flag_value(args, "-ngl") == layers


def test_args_threads_host_port():
    args = build_server_args(LaunchSpec(model_path=MODEL, host="::1", port=9001, threads=3))
    assert flag_value(args, "-t") == "3"
    assert flag_value(args, "--host") == "::1"
    assert flag_value(args, "--port") == "9001"


def test_args_passthrough_last():
    args = build_server_args(LaunchSpec(model_path=MODEL, extra_args=("--threads-http", "2")))
    assert args[-2:] == ["--threads-http", "2"]


def test_args_pure():
    spec = LaunchSpec(model_path=Path("/does/not/exist.gguf"), settings=ServeSettings(ctx=1024, parallel=2))
    assert build_server_args(spec) == build_server_args(spec)


def test_args_never_carry_api_key():
    args = build_server_args(LaunchSpec(model_path=MODEL))
    assert "--api-key" not in args


# --- environment and masking --------------------------------------------------------


def test_server_env_key(monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_API_KEY", "stale")
    env = server_env("s3cret", "LLAMA_API_KEY")
    assert env["LLAMA_API_KEY"] == "s3cret"
    assert "LLAMA_ARG_API_KEY" not in env


def test_server_env_without_key(monkeypatch):
    monkeypatch.setenv("LLAMA_API_KEY", "inherited")
    env = server_env(None, "LLAMA_API_KEY")
    assert "LLAMA_API_KEY" not in env


def test_format_command_masks_key():
    line = format_command("/bin/llama-server", ["-m", "a b.gguf"], api_key="s3cret", api_key_env="LLAMA_API_KEY")
    assert line == "LLAMA_API_KEY=*** /bin/llama-server -m 'a b.gguf'"
    assert "s3cret" not in line


# --- the binary's help and flag checks ---------------------------------------------


def test_real_binary_accepts_every_flag(llama_server_bin):
    binary = probe_server_binary(llama_server_bin)
    spec = LaunchSpec(model_path=MODEL, settings=ServeSettings(cache_type="q8_0", backend="cuda"), threads=2)
    check_flags(binary, build_server_args(spec))
    assert binary.api_key_env == "LLAMA_API_KEY"
    assert "build" in binary.version


def test_help_parser_entries():
    help_text = (
        "----- common params -----\n"
        "\n"
        "-c,    --ctx-size N                     size of the prompt context\n"
        "                                        (env: LLAMA_ARG_CTX_SIZE)\n"
        "-fa,   --flash-attn [on|off|auto]       set Flash Attention use\n"
        "--pooling {none,mean,cls,last,rank}     pooling type for embeddings\n"
        "--api-key KEY                           API key to use\n"
        "                                        (env: LLAMA_API_KEY)\n"
    )
    options = parse_help_options(help_text)
    assert set(options) == {"-c", "--ctx-size", "-fa", "--flash-attn", "--pooling", "--api-key"}
    assert "LLAMA_ARG_CTX_SIZE" in options["-c"]
    assert "on|off" in options["-fa"]


def _binary(help_text: str) -> ServerBinary:
    return ServerBinary(path=Path("/opt/old/llama-server"), version="b1000", options=parse_help_options(help_text))


def test_check_flags_names_missing_flag():
    binary = _binary("-m, --model FNAME  model path\n--embedding  embeddings only\n")
    with pytest.raises(ServerBinaryError) as caught:
        check_flags(binary, ["-m", "x.gguf", "--embedding", "--pooling", "last"])
    assert "'--pooling'" in caught.value.message
    assert caught.value.exit_code == 12


def test_check_flags_fa_without_value():
    # A build whose -fa takes no value would read "on" as a stray argument.
    binary = _binary("-fa, --flash-attn   enable Flash Attention (default: disabled)\n")
    with pytest.raises(ServerBinaryError) as caught:
        check_flags(binary, ["-fa", "on"])
    assert "'-fa on'" in caught.value.message


def test_check_flags_skips_passthrough():
    binary = _binary("-m, --model FNAME  model path\n")
    check_flags(binary, ["-m", "x.gguf", "--made-up-flag", "1"], passthrough=2)


def test_check_flags_ignores_negative_numbers():
    binary = _binary("-t, --threads N  threads\n")
    check_flags(binary, ["-t", "-1"])


# --- finding the binary -------------------------------------------------------------


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_find_binary_precedence(tmp_path, monkeypatch):
    on_path = _executable(tmp_path / "path" / "llama-server")
    from_config = _executable(tmp_path / "config" / "llama-server")
    from_env = _executable(tmp_path / "env" / "llama-server")
    from_option = _executable(tmp_path / "option" / "llama-server")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_server_binary() == (on_path, "PATH")

    config.write_setting("server.bin", str(from_config))
    assert find_server_binary() == (from_config, "config")

    monkeypatch.setenv("QREG_LLAMA_SERVER", str(from_env))
    assert find_server_binary() == (from_env, "env")
    assert find_server_binary(str(from_option)) == (from_option, "option")


def test_find_binary_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerBinaryError) as caught:
        find_server_binary()
    line = caught.value.one_line()
    assert "llama-server not found on PATH" in line
    assert "--server-bin" in line
    assert "brew install llama.cpp" in line


def test_find_binary_not_executable(tmp_path):
    path = tmp_path / "llama-server"
    path.write_text("not a program")
    with pytest.raises(ServerBinaryError) as caught:
        find_server_binary(str(path))
    assert "is not executable" in caught.value.message


def test_probe_rejects_other_program():
    with pytest.raises(ServerBinaryError) as caught:
        probe_server_binary(Path("/bin/true"))
    assert "does not look like llama-server" in caught.value.message


# --- qreg serve --dry-run -------------------------------------------------------------


@pytest.fixture
def tiny_q4(fixture_ggufs) -> Path:
    return fixture_ggufs.files["Q4_K_M"]


def dry_run(llama_server_bin: Path, *args: str, env: dict | None = None):
    result = CliRunner().invoke(
        cli, ["serve", "--server-bin", str(llama_server_bin), "--dry-run", *args], env=env
    )
    return result


def test_dry_run_default_command(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4))
    assert result.exit_code == 0, result.stderr
    expected = [
        str(llama_server_bin), "-m", str(tiny_q4.resolve()), "--embedding", "--pooling", "last",
        "-c", "8192", "-np", "1", "-b", "512", "-ub", "512",
        "--override-kv", ADD_EOS_OVERRIDE, "-ngl", "0", "--host", "127.0.0.1", "--port", "8080",
    ]
    assert shlex.split(result.stdout) == expected
    assert "per-slot limit: 8191 tokens per input (-c 8192 = 8192 x 1 slot; -b/-ub 512)" in result.stderr


@pytest.mark.parametrize(
    "options,expected,note",
    [
        (["--ctx", "2048", "--parallel", "4"], {"-c": "8192", "-np": "4", "-b": "512", "-ub": "512"},
         "per-slot limit: 2047 tokens per input (-c 8192 = 2048 x 4 slots; -b/-ub 512)"),
        (["--ctx", "256", "--parallel", "8"], {"-c": "2048", "-np": "8", "-b": "256", "-ub": "256"},
         "per-slot limit: 255 tokens per input (-c 2048 = 256 x 8 slots; -b/-ub 256)"),
        (["--ubatch", "2048"], {"-c": "8192", "-b": "2048", "-ub": "2048"},
         "per-slot limit: 8191 tokens per input (-c 8192 = 8192 x 1 slot; -b/-ub 2048)"),
        (["--ctx", "1024", "--ubatch", "4096"], {"-c": "1024", "-b": "1024", "-ub": "1024"},
         "per-slot limit: 1023 tokens per input (-c 1024 = 1024 x 1 slot; -b/-ub 1024)"),
        (["--cache-type", "q4_0"], {"-ctk": "q4_0", "-ctv": "q4_0", "-fa": "on"}, "per-slot limit: 8191"),
        (["--port", "9123", "--threads", "2"], {"--port": "9123", "-t": "2"}, "per-slot limit: 8191"),
    ],
)
def test_dry_run_option_sets(llama_server_bin, tiny_q4, options, expected, note):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), *options)
    assert result.exit_code == 0, result.stderr
    args = shlex.split(result.stdout)
    for flag, value in expected.items():
        assert flag_value(args, flag) == value
    assert note in result.stderr


def test_dry_run_settings_from_env_and_config(llama_server_bin, tiny_q4, monkeypatch):
    config.write_setting("serve.ctx", "1024")
    config.write_setting("serve.ubatch", "2048")
    monkeypatch.setenv("QREG_PARALLEL", "3")
    result = dry_run(llama_server_bin, "--model", str(tiny_q4))
    args = shlex.split(result.stdout)
    assert flag_value(args, "-c") == "3072"
    assert flag_value(args, "-ub") == "1024"


def test_dry_run_ubatch_from_env(llama_server_bin, tiny_q4, monkeypatch):
    monkeypatch.setenv("QREG_UBATCH", "256")
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--json")
    data = json.loads(result.stdout)
    assert flag_value(data["args"], "-ub") == "256"
    assert flag_value(data["args"], "-b") == "256"
    assert data["settings"]["ubatch"] == 256
    assert data["settings"]["sources"]["ubatch"] == "env"


def test_dry_run_masks_api_key(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), env={"QREG_API_KEY": "s3cret-key"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("LLAMA_API_KEY=*** ")
    assert "s3cret-key" not in result.stdout
    assert "s3cret-key" not in result.stderr


def test_dry_run_api_key_option_masked_in_json(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--api-key", "s3cret-key", "--json")
    data = json.loads(result.stdout)
    assert data["api_key_env"] == "LLAMA_API_KEY"
    assert "s3cret-key" not in result.stdout


def test_dry_run_passthrough(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--", "--threads-http", "2", "--made-up")
    assert result.exit_code == 0, result.stderr
    assert shlex.split(result.stdout)[-3:] == ["--threads-http", "2", "--made-up"]


def test_dry_run_json(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--ctx", "4096", "--json")
    data = json.loads(result.stdout)
    assert data["slot_token_limit"] == 4095
    assert data["variant"] == "Q4_K_M" or data["variant"] is None
    assert data["url"] == "http://127.0.0.1:8080"
    assert data["add_eos_override"] is True
    assert data["args"][data["args"].index("-c") + 1] == "4096"


def test_dry_run_file_with_eos_has_no_override(llama_server_bin, tiny_q4, tmp_path):
    patched = tmp_path / "adds-eos.gguf"
    set_add_eos(tiny_q4, patched)
    result = dry_run(llama_server_bin, "--model", str(patched))
    assert result.exit_code == 0, result.stderr
    assert "--override-kv" not in result.stdout


def test_dry_run_network_host_warns(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--host", "0.0.0.0")
    assert "reachable from the network" in result.stderr
    assert "unauthenticated" in result.stderr


def test_dry_run_network_host_with_key(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--host", "0.0.0.0", env={"QREG_API_KEY": "k"})
    assert "reachable from the network" in result.stderr
    assert "unauthenticated" not in result.stderr


def test_dry_run_loopback_no_warning(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--host", "::1")
    assert "reachable from the network" not in result.stderr


@pytest.mark.parametrize(
    "options,text",
    [
        (["--ctx", "0"], "--ctx"),
        (["--ctx", "40000"], "--ctx"),
        (["--parallel", "0"], "--parallel"),
        (["--ubatch", "0"], "invalid --ubatch 0: the micro-batch size must be 1 or more tokens"),
        (["--ubatch", "-8"], "invalid --ubatch -8"),
        (["--ubatch", "many"], "'many' is not a valid integer"),
        (["--cache-type", "q5_1"], "--cache-type"),
        (["--port", "70000"], "--port"),
        (["Q4_K_M"], "not both"),
    ],
)
def test_dry_run_invalid_options(llama_server_bin, tiny_q4, options, text):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), *options)
    assert result.exit_code == UsageError.exit_code
    assert text in result.stderr


def test_dry_run_invalid_env_setting(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), env={"QREG_CTX": "lots"})
    assert result.exit_code == UsageError.exit_code
    assert "QREG_CTX" in result.stderr


@pytest.mark.parametrize("text", ["0", "-1", "half"])
def test_dry_run_invalid_env_ubatch(llama_server_bin, tiny_q4, text):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), env={"QREG_UBATCH": text})
    assert result.exit_code == UsageError.exit_code
    assert f"invalid value '{text}' for serve.ubatch from QREG_UBATCH" in result.stderr
    assert result.stdout == ""


def test_dry_run_invalid_config_ubatch_keeps_file(llama_server_bin, tiny_q4, isolated_user_dirs):
    path = config.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[serve]\nubatch = 0\n")
    result = dry_run(llama_server_bin, "--model", str(tiny_q4))
    assert result.exit_code == UsageError.exit_code
    assert "invalid value '0' for serve.ubatch" in result.stderr
    assert path.read_text() == "[serve]\nubatch = 0\n"


def test_dry_run_missing_model_file(llama_server_bin, tmp_path):
    result = dry_run(llama_server_bin, "--model", str(tmp_path / "absent.gguf"))
    assert result.exit_code == NotFoundError.exit_code
    assert "absent.gguf" in result.stderr


def test_dry_run_missing_binary(tiny_q4, tmp_path):
    result = CliRunner().invoke(
        cli, ["serve", "--model", str(tiny_q4), "--dry-run"], env={"PATH": str(tmp_path)}
    )
    assert result.exit_code == ServerBinaryError.exit_code
    assert "llama-server not found on PATH" in result.stderr
    assert "--server-bin" in result.stderr


def test_dry_run_leaves_model_untouched(llama_server_bin, tiny_q4):
    before = (tiny_q4.stat().st_size, tiny_q4.stat().st_mtime_ns)
    dry_run(llama_server_bin, "--model", str(tiny_q4))
    assert (tiny_q4.stat().st_size, tiny_q4.stat().st_mtime_ns) == before


def test_dry_run_warns_when_estimate_exceeds_memory(llama_server_bin, fixture_ggufs):
    model = fixture_ggufs.files["Q4_K_M"]
    result = dry_run(
        llama_server_bin, "--model", str(model), "--manifest", str(fixture_ggufs.manifest_path),
        "--ctx", "32768", "--parallel", "4096",
    )
    assert result.exit_code == 0, result.stderr
    assert "Q4_K_M with --ctx 32768 x --parallel 4096 needs about" in result.stderr
    assert "available; lower --ctx, --parallel or --ubatch" in result.stderr


def test_dry_run_no_memory_warning_when_it_fits(llama_server_bin, fixture_ggufs):
    model = fixture_ggufs.files["Q4_K_M"]
    result = dry_run(llama_server_bin, "--model", str(model), "--manifest", str(fixture_ggufs.manifest_path), "--ctx", "512")
    assert result.exit_code == 0, result.stderr
    assert "needs about" not in result.stderr


def test_dry_run_nothing_pulled(llama_server_bin, fixture_ggufs):
    result = dry_run(llama_server_bin, "--manifest", str(fixture_ggufs.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert "no variant is pulled" in result.stderr
    assert "qreg pull VARIANT" in result.stderr


def test_dry_run_unknown_variant(llama_server_bin, fixture_ggufs):
    result = dry_run(llama_server_bin, "Q9_K", "--manifest", str(fixture_ggufs.manifest_path))
    assert result.exit_code == NotFoundError.exit_code
    assert "unknown variant 'Q9_K'" in result.stderr


# --- invalid host, ctx, model file and binary ------------------------------------------------------


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "bad host name", "-lead.example", "::zz"])
def test_dry_run_invalid_host(llama_server_bin, tiny_q4, host):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--host", host)
    assert result.exit_code == UsageError.exit_code
    assert f"invalid --host '{host}'" in result.stderr
    assert "reachable from the network" not in result.stderr
    assert result.stdout == ""


def test_dry_run_invalid_host_from_env(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), env={"QREG_HOST": "999.1.1.1"})
    assert result.exit_code == UsageError.exit_code
    assert "invalid setting serve.host (from env) '999.1.1.1': not a valid IP address" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "0.0.0.0"])
def test_dry_run_valid_host(llama_server_bin, tiny_q4, host):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--host", host)
    assert result.exit_code == 0, result.stderr
    assert f"--host {host}" in result.stdout


@pytest.mark.parametrize("ctx", ["1", "2"])
def test_dry_run_ctx_below_minimum(llama_server_bin, tiny_q4, ctx):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--ctx", ctx)
    assert result.exit_code == UsageError.exit_code
    assert f"invalid --ctx {ctx}: the per-slot context must be 3 to 32768 tokens" in result.stderr


def test_dry_run_ctx_minimum(llama_server_bin, tiny_q4):
    result = dry_run(llama_server_bin, "--model", str(tiny_q4), "--ctx", "3")
    assert result.exit_code == 0, result.stderr
    assert "per-slot limit: 2 tokens per input" in result.stderr


def test_dry_run_model_under_file(llama_server_bin, tmp_path):
    # A path whose parent is a regular file fails to stat with ENOTDIR, even as root.
    parent = tmp_path / "plain"
    parent.write_text("x")
    result = dry_run(llama_server_bin, "--model", str(parent / "m.gguf"))
    assert result.exit_code == NotFoundError.exit_code
    assert f"model file {parent / 'm.gguf'} not found" in result.stderr
    assert "Traceback" not in result.output
    assert parent.read_text() == "x"


def test_dry_run_model_symlink_loop(llama_server_bin, tmp_path):
    # Root ignores permissions, so a symlink loop is the path that cannot be examined here.
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    result = dry_run(llama_server_bin, "--model", str(loop))
    assert result.exit_code == 1
    assert f"model file {loop}: cannot read: Too many levels of symbolic links" in result.stderr
    assert loop.is_symlink()


def test_dry_run_model_fifo(llama_server_bin, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result = dry_run(llama_server_bin, "--model", str(fifo))
    assert result.exit_code == UsageError.exit_code
    assert f"model file {fifo} is not a regular file" in result.stderr


def test_find_binary_directory(tmp_path):
    with pytest.raises(ServerBinaryError) as caught:
        find_server_binary(str(tmp_path))
    assert caught.value.exit_code == 12
    assert f"llama-server {tmp_path} (from option) is a directory, not an executable" in caught.value.message
    assert str(tmp_path / "llama-server") in caught.value.hint


def test_probe_silent_failing_binary(tmp_path):
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexit 3\n")
    silent.chmod(0o755)
    with pytest.raises(ServerBinaryError) as caught:
        probe_server_binary(silent)
    line = caught.value.one_line()
    assert f"'{silent} --version' printed nothing and failed with exit code 3" in line
    assert "llama.cpp's llama-server" in line
    assert not line.endswith(": ;")
