"""Shed overload at the edge: once the engine refuses work, refuse the next arrivals before they cost.

Under 5× the editor load the engine's own admission control (queue delay, predicted latency;
engine/core.py) refuses most requests, but each refused request has already been parsed,
tokenized, turned into a FIM prompt and (under Ray) sent to the Router, whose event loop then
shares the GIL with the engine thread. Measured on the 2-core machine at 40 editors: the Ingress
spent ~0.9 of a core and the admitted requests' latency doubled (docs/benchmarks.md, "overload").

So after an engine refusal (a 429 on a generation route: the engine's overload is the only source
of those) this middleware answers the generation routes' arrivals for the next `window_s` itself: 429, the same
OpenAI-shaped error and Retry-After, without parsing the JSON or touching the engine. The first
request after the window goes through and probes the engine again (a circuit breaker's half-open
state), so admission reopens within one window of the engine having room.
"""
from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/fim/completions"})


class EdgeShedding:
    def __init__(self, app: ASGIApp, window_s: float) -> None:
        self.app, self.window_s = app, window_s
        self.until = 0.0               # time.monotonic() before which arrivals are refused here
        self.retry_after = b"1"        # the engine's last Retry-After, repeated to the shed requests
        self.shed = 0                  # requests refused here (for tests and logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_ROUTES or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if time.monotonic() < self.until:
            await self._refuse(receive, send)
            return

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                self.until = time.monotonic() + self.window_s
                self.retry_after = next((v for k, v in message.get("headers", []) if k.lower() == b"retry-after"),
                                        self.retry_after)
            await send(message)

        await self.app(scope, receive, watching_send)

    async def _refuse(self, receive: Receive, send: Send) -> None:
        self.shed += 1
        while True:                    # drain the body so a keep-alive connection stays usable
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = json.dumps({"error": {
            "message": "the server is overloaded, retry later: the engine refused work within the last "
                       f"{self.window_s * 1000:.0f} ms", "type": "rate_limit_error", "param": None,
            "code": "engine_overloaded"}}).encode()
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after), (b"x-moe-shed", b"edge")]})
        await send({"type": "http.response.body", "body": body})

