"""Tests of settings precedence and `qreg config`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from registry import config
from registry.cli.main import cli
from registry.errors import UsageError


def test_resolve_default():
    assert config.resolve("serve.port") == (8080, "default")


def test_resolve_config_beats_default():
    config.write_setting("serve.port", "9000")
    assert config.resolve("serve.port") == (9000, "config")


def test_resolve_env_beats_config(monkeypatch):
    config.write_setting("serve.port", "9000")
    monkeypatch.setenv("QREG_PORT", "9100")
    assert config.resolve("serve.port") == (9100, "env")


def test_resolve_option_beats_env(monkeypatch):
    monkeypatch.setenv("QREG_PORT", "9100")
    assert config.resolve("serve.port", 9200) == (9200, "option")


def test_invalid_env_value_is_usage_error(monkeypatch):
    monkeypatch.setenv("QREG_PORT", "banana")
    result = CliRunner().invoke(cli, ["config", "get", "serve.port"])
    assert result.exit_code == UsageError.exit_code
    assert "QREG_PORT" in result.output


def test_cli_set_get_roundtrip():
    runner = CliRunner()
    assert runner.invoke(cli, ["config", "set", "serve.ctx", "4096"]).exit_code == 0
    result = runner.invoke(cli, ["config", "get", "serve.ctx", "--json"])
    assert json.loads(result.output) == {"key": "serve.ctx", "value": 4096, "source": "config"}


def test_cli_set_invalid_value_keeps_file():
    runner = CliRunner()
    runner.invoke(cli, ["config", "set", "serve.ctx", "4096"])
    before = config.config_path().read_bytes()
    result = runner.invoke(cli, ["config", "set", "serve.ctx", "--", "-5"])
    assert result.exit_code == UsageError.exit_code
    assert "serve.ctx" in result.output
    assert config.config_path().read_bytes() == before


def test_cli_unknown_key():
    result = CliRunner().invoke(cli, ["config", "set", "no.such", "1"])
    assert result.exit_code == UsageError.exit_code
    assert "known settings" in result.output


def test_cli_unset_restores_default():
    runner = CliRunner()
    runner.invoke(cli, ["config", "set", "serve.port", "9000"])
    runner.invoke(cli, ["config", "unset", "serve.port"])
    assert config.resolve("serve.port") == (8080, "default")


def test_corrupt_config_file_one_line():
    path = config.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("serve = = 1\n")
    result = CliRunner().invoke(cli, ["config", "get", "serve.port"])
    assert result.exit_code == 1
    assert str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_manifest_setting_from_config(tmp_path):
    from registry.manifest import load_manifest, shipped_manifest_path

    copy = tmp_path / "copy.toml"
    copy.write_bytes(shipped_manifest_path().read_bytes())
    config.write_setting("manifest", str(copy))
    assert load_manifest().path == copy


def test_debug_shows_traceback(monkeypatch):
    monkeypatch.setenv("QREG_DEBUG", "1")
    result = CliRunner().invoke(cli, ["info", "Q9_K"])
    assert result.exit_code != 0
    assert result.exception is not None


def test_cli_set_non_integer_message():
    result = CliRunner().invoke(cli, ["config", "set", "serve.port", "banana"])
    assert result.exit_code == UsageError.exit_code
    assert "must be a whole number" in result.output
    assert "invalid literal" not in result.output


def test_cli_unset_missing_key():
    result = CliRunner().invoke(cli, ["config", "unset", "serve.ctx"])
    assert result.exit_code == UsageError.exit_code
    assert "serve.ctx is not set" in result.output
    assert not config.config_path().exists()


def test_hand_edited_value_clash_one_line():
    path = config.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("serve = 5\n")

    result = CliRunner().invoke(cli, ["config", "set", "serve.ctx", "2048"])

    assert result.exit_code == 1
    assert "sets serve to a value, but serve.ctx needs it to be a table" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert path.read_text() == "serve = 5\n"


def test_cli_set_ctx_below_minimum():
    result = CliRunner().invoke(cli, ["config", "set", "serve.ctx", "2"])
    assert result.exit_code == UsageError.exit_code
    assert "must be at least 3 tokens, got 2" in result.output
    assert not config.config_path().exists()
