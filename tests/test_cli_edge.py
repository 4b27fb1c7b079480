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
