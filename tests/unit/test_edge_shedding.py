"""Edge shedding (api/shedding.py): after the engine refuses a request, the next arrivals on the
generation routes are refused before the app sees them, for one window; then the app is probed."""
from __future__ import annotations

import asyncio

import httpx
from starlette.responses import JSONResponse

from serve_app.api.shedding import EdgeShedding


class CountingApp:
    """Answers 429 (Retry-After 3) while `overloaded`, else 200; counts the requests it saw."""

    def __init__(self) -> None:
        self.seen, self.overloaded = 0, True

    async def __call__(self, scope, receive, send):
        self.seen += 1
        if self.overloaded:
            resp = JSONResponse({"error": {"code": "engine_overloaded"}}, status_code=429, headers={"Retry-After": "3"})
        else:
            resp = JSONResponse({"ok": True})
        await resp(scope, receive, send)


def test_refuses_within_the_window_after_an_engine_refusal_then_probes_again():
    app = CountingApp()
    shed = EdgeShedding(app, window_s=0.2)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shed), base_url="http://t") as client:
            first = await client.post("/v1/fim/completions", json={"prefix": "x" * 2000})
            assert first.status_code == 429 and app.seen == 1
            shed_resp = await client.post("/v1/completions", json={"prompt": "x"})
            assert shed_resp.status_code == 429 and app.seen == 1          # the app never saw it
            assert shed_resp.headers["retry-after"] == "3"                 # the engine's own advice
            assert shed_resp.json()["error"]["code"] == "engine_overloaded"
            assert shed_resp.json()["error"]["type"] == "rate_limit_error"
            other = await client.get("/v1/models")                         # not a generation route
            assert app.seen == 2 and other.status_code == 429             # passed through, and not watched
            app.overloaded = False
            await asyncio.sleep(0.25)                                      # past the window: probe the app
            probe = await client.post("/v1/chat/completions", json={"messages": []})
            assert probe.status_code == 200 and app.seen == 3
            again = await client.post("/v1/chat/completions", json={"messages": []})
            assert again.status_code == 200 and app.seen == 4
        return shed.shed

    assert asyncio.run(run()) == 1
