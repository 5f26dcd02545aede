"""The parent side, in the Router replica: start the engine process, supervise it, relay.

What the replica still does: tell clients where the engine listens (`address`, through Serve),
answer the engine's control-plane calls for the shards (their Serve handles live here), record the
engine's metrics into Ray's (the engine process has no Ray worker) and fail Serve's health check
when the engine is gone or silent, so Serve replaces the replica — and with it the engine.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Sequence

from serve_app.hosting.channel import Channel
from serve_app.hosting.spec import RouterEngineSpec
from serve_app.metrics import Metrics
from serve_app.parallel.socket_plane import PlaneAddress, address_via_serve

log = logging.getLogger(__name__)

SILENT_AFTER_S = 10.0       # no tick for this long (ticks come every 0.25 s): the engine is stuck


class EngineHost:
    def __init__(self, spec: RouterEngineSpec, shards: Sequence, metrics: Metrics | None, host: str,
                 start_timeout_s: float = 600.0):
        """Blocks until the engine has loaded its model and listens (or raises what went wrong).
        `shards`: the ExpertShard handles; `metrics`: where the engine's records go (None: dropped);
        `host`: the address of this node the engine listens on."""
        self.metrics = metrics
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "serve_app.hosting.engine_process", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),))
        theirs.close()
        conn = Connection(ours.detach())
        self._dead_lanes: list[str] = []
        self._last_tick = time.monotonic()
        try:
            conn.send(("spec", spec, host))
            if not conn.poll(start_timeout_s):
                raise TimeoutError(f"the engine process did not start within {start_timeout_s:g} s")
            kind, value = conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._kill()
            raise RuntimeError(f"the engine process failed to start (exit code {self.proc.poll()}): {exc}") from exc
        if kind != "ready":
            self._kill()
            raise RuntimeError(f"the engine process failed to start:\n{value}")
        self.address: PlaneAddress = value
        self._last_tick = time.monotonic()
        self.channel = Channel(conn, {"data_plane": address_via_serve(shards)}, on_notice=self._notice,
                               name="engine-host").start()

    def _notice(self, kind: str, args: tuple) -> None:
        if kind == "tick":
            records, self._dead_lanes = args
            self._last_tick = time.monotonic()
            if self.metrics is not None:
                try:
                    self.metrics.apply(records)
                except Exception:               # noqa: BLE001 - metrics never fail the engine
                    log.exception("engine metrics not recorded")

    def raise_if_down(self) -> None:
        """For Serve's health check: a failure restarts the replica and, with it, the engine."""
        if (code := self.proc.poll()) is not None:
            raise RuntimeError(f"the engine process exited with code {code}")
        if self.channel.closed:
            raise RuntimeError("the engine process closed its control pipe")
        if (silent := time.monotonic() - self._last_tick) > SILENT_AFTER_S:
            raise RuntimeError(f"the engine process has been silent for {silent:.1f} s")
        if self._dead_lanes:
            raise RuntimeError(f"engine loop not running in lanes {self._dead_lanes}")

    def kv_usage(self, timeout_s: float = 5.0) -> dict:
        return self.channel.call("kv_usage", timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self.channel.close()                    # EOF: the engine exits
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
