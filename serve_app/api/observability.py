"""HTTP-side metrics: a middleware that counts and times every request, and the /metrics route.

The middleware is plain ASGI so that it sees streamed responses end (the last body message), not
just their first byte: end-to-end latency of a streamed completion includes every chunk. The tier
label comes from the `x-moe-tier` response header (adaptive precision sets it; "none" otherwise).
Endpoints are labelled by known route only, so a scanner hitting random paths cannot blow up the
label cardinality.
"""
from __future__ import annotations

import time
from typing import Awaitable, Callable

from fastapi import APIRouter
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.metrics import Metrics

KNOWN_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/fim/completions", "/v1/models",
                             "/health", "/metrics"})
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        started = time.perf_counter()
        state = {"status": 500, "tier": "none", "precision": None, "done": False}

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for key, value in message.get("headers", []):
                    if key.lower() == b"x-moe-tier":
                        state["tier"] = value.decode("latin-1")
                    elif key.lower() == b"x-moe-precision":
                        state["precision"] = value.decode("latin-1")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(endpoint, state, started)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            self._record(endpoint, state, started)     # client gone mid-stream: still counted once

    def _record(self, endpoint: str, state: dict, started: float) -> None:
        if state["done"]:
            return
        state["done"] = True
        tier = state["tier"]
        self.metrics.inc("moe_requests_total", endpoint=endpoint, status=state["status"], tier=tier)
        if state["precision"] is not None:
            self.metrics.inc("moe_tier_requests_total", tier=tier, precision=state["precision"])
        if endpoint != "/metrics":
            self.metrics.observe("moe_request_latency_seconds", time.perf_counter() - started,
                                 endpoint=endpoint, tier=tier)


def metrics_router(source: Callable[[], Awaitable[bytes]]) -> APIRouter:
    """GET /metrics serving whatever `source` returns in Prometheus text format."""
    router = APIRouter()

    async def metrics() -> Response:
        return Response(await source(), media_type=PROMETHEUS_CONTENT_TYPE)

    router.add_api_route("/metrics", metrics, methods=["GET"])
    return router
