"""The whole main job, with nothing faked: recommend, pull, inspect, serve, embed, stop.

The fixture GGUFs were made by llama.cpp's llama-quantize; the loopback mirror serves
them over the Hugging Face protocol to the real huggingface_hub client; the real
llama-server serves the pulled file. Every step runs the installed `qreg` command.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess

from registry.errors import EXIT_INTERRUPTED
from registry.manifest import load_manifest
from server_helpers import QregServe, children_of, free_port, wait_gone

STEP_TIMEOUT = 300


def qreg(qreg_exe: str, *args: str) -> dict:
    """Run one qreg command with --json; fail the test with its stderr unless it exits 0."""
    result = subprocess.run([qreg_exe, *args, "--json"], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert result.returncode == 0, f"qreg {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_recommend_pull_inspect_serve_embed(qreg_exe, llama_server_bin, gguf_mirror, fixture_ggufs):
    manifest_path = str(fixture_ggufs.manifest_path)
    model = load_manifest(manifest_path).model

    recommendation = qreg(qreg_exe, "recommend", "--manifest", manifest_path, "--ctx", "1024")
    pick = recommendation["pick"]
    assert pick in fixture_ggufs.files

    pulled = qreg(qreg_exe, "pull", pick, "--manifest", manifest_path)
    assert pulled["sha256"] == fixture_ggufs.index[pick]["sha256"]
    assert gguf_mirror.cdn_gets(fixture_ggufs.files[pick].name), "the file did not come through the mirror"

    report = qreg(qreg_exe, "inspect", pick, "--manifest", manifest_path)
    assert report["variant_match"]["variant"] == pick
    assert report["embedding_length"] == model.embedding_length
    assert report["add_eos"] is False  # the card's files leave EOS to the caller; qreg serve adds it

    port = free_port()
    serve = QregServe(
        qreg_exe,
        ["--manifest", manifest_path, "--port", str(port), "--ctx", "1024", "--server-bin", str(llama_server_bin), "--json"],
        env=dict(os.environ),
    )
    try:
        ready = serve.wait_ready(STEP_TIMEOUT)
        assert ready is not None, serve.stderr + serve.process.stderr.read()
        assert ready["variant"] == pick  # the pulled variant recommend picks
        assert ready["add_eos_override"] is True
        assert ready["url"] == f"http://127.0.0.1:{port}"

        texts = ["Quarterly revenue rose 12 percent.", "Quarterly revenue rose 12 percent.", "The cat sleeps."]
        embedded = qreg(qreg_exe, "embed", "--url", ready["url"], *texts)
        vectors = [item["embedding"] for item in embedded["inputs"]]
        assert embedded["dimensions"] == model.embedding_length
        for vector in vectors:
            assert len(vector) == model.embedding_length
            assert abs(norm(vector) - 1.0) < 1e-4
        assert abs(embedded["similarity"][0][1] - 1.0) < 1e-6
        assert embedded["similarity"][0][2] < 0.999

        server_pid = ready["pid"]
        serve.signal(signal.SIGINT)
        assert serve.finish() == EXIT_INTERRUPTED
        assert wait_gone(server_pid), f"llama-server pid {server_pid} is still running"
        assert children_of(serve.process.pid) == []
    finally:
        serve.cleanup()


def test_serve_pull_then_detach_and_stop(qreg_exe, llama_server_bin, gguf_mirror, fixture_ggufs):
    manifest_path = str(fixture_ggufs.manifest_path)
    port = free_port()

    ready = qreg(
        qreg_exe, "serve", "Q4_K_M", "--pull", "--manifest", manifest_path, "--port", str(port),
        "--ctx", "512", "--server-bin", str(llama_server_bin), "--detach",
    )
    try:
        assert ready["variant"] == "Q4_K_M"
        pulled = qreg(qreg_exe, "ls", "--manifest", manifest_path)
        assert "Q4_K_M" in json.dumps(pulled)

        embedded = qreg(qreg_exe, "embed", "--url", ready["url"], "one text")
        assert embedded["dimensions"] == load_manifest(manifest_path).model.embedding_length

        listed = qreg(qreg_exe, "ps")["servers"]
        assert [server["pid"] for server in listed] == [ready["pid"]]
        qreg(qreg_exe, "stop", str(port))
        assert wait_gone(ready["pid"])
        assert qreg(qreg_exe, "ps")["servers"] == []
    finally:
        if not wait_gone(ready["pid"], 0):
            os.kill(ready["pid"], signal.SIGKILL)
