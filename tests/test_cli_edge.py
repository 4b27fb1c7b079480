"""Tests of the CLI edge: usage errors as one line, and as JSON with --json."""

from __future__ import annotations

import json
import subprocess


def run(qreg_exe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([qreg_exe, *args], capture_output=True, text=True, timeout=60)


def test_bad_option_value_one_line(qreg_exe):
    result = run(qreg_exe, "recommend", "--ctx", "abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qreg: error: Invalid value for '--ctx': 'abc' is not a valid integer; run 'qreg recommend --help' for usage"
    ]


def test_bad_option_value_json(qreg_exe):
    result = run(qreg_exe, "serve", "--json", "--port", "70000")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "usage"
    assert error["exit_code"] == 2
    assert "--port" in error["message"]


def test_unknown_option_json_before_flag(qreg_exe):
    result = run(qreg_exe, "list", "--bogus", "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["type"] == "usage"


def test_unknown_command(qreg_exe):
    result = run(qreg_exe, "nosuch")
    assert result.returncode == 2
    assert "No such command 'nosuch'" in result.stderr
    assert "run 'qreg --help' for usage" in result.stderr


def test_missing_argument(qreg_exe):
    result = run(qreg_exe, "info")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Missing argument 'VARIANT'" in result.stderr


# --- file system errors and QREG_DEBUG ----------------------------------------------


def test_data_dir_is_file_one_line(qreg_exe, tmp_path, monkeypatch, random_repo):
    # Tests run as root, which ignores permissions, so a regular file is put where
    # qreg's data folder should be.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_DATA_HOME", str(blocker))

    result = run(qreg_exe, "pull", "Q2_K", "--manifest", str(random_repo.manifest_path))

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "qreg: error: file system error: Not a directory (" in result.stderr
    assert str(blocker) in result.stderr
    assert "Traceback" not in result.stderr
    assert blocker.read_text() == "x"


def test_data_dir_is_file_json(qreg_exe, tmp_path, monkeypatch, random_repo):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_DATA_HOME", str(blocker))

    result = run(qreg_exe, "rm", "Q2_K", "--manifest", str(random_repo.manifest_path), "--json")

    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "error"
    assert "Not a directory" in error["message"]


def test_config_dir_is_file_one_line(qreg_exe, tmp_path, monkeypatch):
    blocker = tmp_path / "config-file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))

    result = run(qreg_exe, "config", "set", "serve.ctx", "2048")

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(blocker) in result.stderr
    assert "Traceback" not in result.stderr
    assert blocker.read_text() == "x"


def test_debug_keeps_exit_code(qreg_exe, monkeypatch):
    monkeypatch.setenv("QREG_DEBUG", "1")
    result = run(qreg_exe, "info", "nosuch")
    assert result.returncode == 3
    assert "Traceback" in result.stderr


def test_debug_zero_is_off(qreg_exe, monkeypatch):
    monkeypatch.setenv("QREG_DEBUG", "0")
    result = run(qreg_exe, "info", "nosuch")
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_error_line_escapes_control_bytes(capsys):
    from registry.cli.output import print_error

    print_error("bad key 'a\x00b\x0cc\x1b[2J'", kind="gguf", exit_code=5, json_mode=True)

    captured = capsys.readouterr()
    assert captured.err == "qreg: error: bad key 'a\\x00b\\x0cc\\x1b[2J'\n"
    assert json.loads(captured.out)["error"]["message"] == "bad key 'a\x00b\x0cc\x1b[2J'"


def test_group_option_error_json(qreg_exe):
    result = run(qreg_exe, "--json", "list")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["type"] == "usage"
    assert len(result.stderr.strip().splitlines()) == 1


def test_negative_number_hint(qreg_exe):
    result = run(qreg_exe, "config", "set", "serve.port", "-1")
    assert result.returncode == 2
    assert "put '--' before it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
