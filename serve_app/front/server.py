"""The front's server: an aiohttp site on the public port, on a thread of the `moe-serve` process.

Why there and not in a Serve deployment: the front must outlive every replica, and the driver
process is the one a replica restart never touches (its exit stops the app anyway). Why a thread:
the driver's main thread only waits for Ctrl-C; the relay's event loop (uvloop when installed, as
Ray's own HTTP servers use) runs beside it without sharing a loop with Ray's client.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass

from aiohttp import web

from serve_app.front.relay import Relay, RelayConfig

# No Ingress replica's own keep-alive is shorter; the front's client connections idle out like uvicorn's.
CLIENT_KEEPALIVE_S = 90.0
SHUTDOWN_S = 5.0


@dataclass(frozen=True)
class FrontConfig:
    """Where the front listens and what it relays to."""
    host: str                # public bind address (AppConfig.host)
    port: int                # public port (AppConfig.port)
    relay: RelayConfig

    @classmethod
    def from_app(cls, config) -> "FrontConfig":
        """From an AppConfig: the Ingress replicas listen on config.ingress_ports() of this node."""
        relay = RelayConfig(upstream_host="127.0.0.1", upstream_ports=config.ingress_ports(),
                            max_body_bytes=config.max_body_bytes, body_timeout_s=config.request_timeout_s,
                            head_timeout_s=config.request_timeout_s + 10)
        return cls(config.host, config.port, relay)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class FrontServer:
    """`start()` returns once the port listens (or raises why it cannot); `stop()` closes it."""

    def __init__(self, cfg: FrontConfig) -> None:
        self.cfg = cfg
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="moe-serve-front", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def start(self, timeout_s: float = 10.0) -> "FrontServer":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the front did not listen on {self.url} within {timeout_s:g} s")
        if self._error is not None:
            raise RuntimeError(f"the front cannot listen on {self.url}: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = SHUTDOWN_S + 5) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            print(f"moe-serve: the front on {self.url} did not stop within {timeout_s:g} s", file=sys.stderr)

    def __enter__(self) -> "FrontServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:       # noqa: BLE001 — reported to start(), which raises it
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        relay = Relay(self.cfg.relay)
        await relay.start()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", relay.handle, expect_handler=relay.expect)
        # handler_cancellation: a client that leaves cancels its handler, which closes the
        # upstream connection, which the Ingress reads as a disconnect and aborts the request.
        # shutdown_timeout: open requests get this long to finish on stop(), inside its join.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               keepalive_timeout=CLIENT_KEEPALIVE_S, shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True).start()
            self._stopping = asyncio.Event()
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await relay.close()
