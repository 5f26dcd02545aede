"""`moe-serve` as users start it (Ray mode, the README's first command): the front on the public
port, two Ingress replicas on the ports above it, a completion answered, a clean exit on SIGINT.

It starts a private Ray cluster of its own (`--ray-address local`), beside the session's; the
short chaos soak (test_chaos.py) covers what the front does while replicas die.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from serve_app.cli import wait_healthy
from tests.helpers.engines import build_model_dir
from tests.helpers.servers import ROOT


def _free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free (the front's and the replicas' ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            held = []
            for port in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise RuntimeError(f"no run of {n} free ports")


def _post(url: str, body: dict) -> tuple[int, dict, list[str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read()), resp.headers.get_all("X-Request-ID")


@pytest.mark.integration
def test_moe_serve_serves_through_the_front_with_two_ingress_replicas(tmp_path):
    model = build_model_dir(tmp_path / "model", "mixtral", num_local_experts=4)
    config = tmp_path / "app.yaml"
    config.write_text("expert_shards: 0\nautoscaling:\n  ingress: {min_replicas: 2, max_replicas: 2}\n")
    port = _free_run(3)
    log = tmp_path / "moe-serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "--ray-address", "local", "--model",
                                    str(model), "--config", str(config), "--port", str(port)],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", timeout_s=240)
        except TimeoutError as exc:
            raise AssertionError(f"moe-serve did not start: {log.read_text()[-3000:]}") from exc
        for replica_port in (port + 1, port + 2):         # each Ingress replica on its own port
            wait_healthy(f"http://127.0.0.1:{replica_port}", timeout_s=60)
        for _ in range(4):                                 # round robin over both, through the front
            status, body, ids = _post(f"http://127.0.0.1:{port}/v1/completions",
                                      {"prompt": "def f(x):", "max_tokens": 3, "temperature": 0})
            assert status == 200 and body["usage"]["completion_tokens"] >= 1
            assert ids == [body["id"]]                     # the app's id once (Serve appends its own)
        assert "moe-serve: serving" in log.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rc = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert rc == 0, log.read_text()[-3000:]
    assert "moe-serve: shutting down" in log.read_text()
    with pytest.raises(OSError):                           # the front's port is released
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
