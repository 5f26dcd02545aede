"""Processes the integration tests start and stop: `moe-serve --embedded` and friends."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from serve_app.cli import wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after timeout_s."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def embedded_server(log: Path, *args: str, timeout_s: float = 180.0) -> Iterator[str]:
    """`moe-serve --embedded` on a free port with extra `args`; yields its URL once /health is 200."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "--embedded", "--port", str(port), *args],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, timeout_s)
        except TimeoutError as exc:
            raise RuntimeError(f"embedded server did not start: {log.read_text()[-2000:]}") from exc
        yield url
    finally:
        stop_process(process)
