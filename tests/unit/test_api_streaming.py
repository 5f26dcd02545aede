"""Streams start at the first token, and a client that leaves (or a deadline that passes) aborts the
request in the engine: its KV blocks are back in the pool before the app returns."""
from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.api import LocalEngineClient, create_app
from serve_app.engine import EngineStepError
from tests.unit.test_api_support import (LONG_RUNNING_PROMPT, AsgiCall, anyio_backend,  # noqa: F401
                                         engine, api_model_dir, engine_is_idle, http_client, make_app, make_settings,
                                         sse_events, start_engine, tokenizer, wait_until)

pytestmark = pytest.mark.anyio

# Far more tokens than a test waits for: the request is still decoding when the client leaves.
LONG = {"prompt": LONG_RUNNING_PROMPT, "max_tokens": 400, "temperature": 0}


def running_requests(engine) -> int:
    return engine.snapshot(lambda core: len(core.requests))


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"], ids=["disconnect-message", "send-fails"])
async def test_stream_disconnect_aborts_the_request_and_frees_its_blocks(engine, tokenizer, spec_version):
    call = AsgiCall(make_app(engine, tokenizer), "/v1/completions", {**LONG, "stream": True},
                    spec_version=spec_version, on_first_body=lambda: running_requests(engine))
    task = asyncio.ensure_future(call.run())
    await asyncio.wait_for(call.first_body.wait(), timeout=120)
    # The first chunk left while the request was still decoding: the stream is not buffered.
    assert call.status == 200 and call.at_first_body == 1
    first = sse_events(call.body_text)[0]
    assert first["choices"][0]["finish_reason"] is None
    call.disconnected.set()
    await asyncio.wait_for(task, timeout=60)
    # The abort is shielded from the cancelled handler: it completes at the engine's next step boundary.
    assert await wait_until(lambda: engine_is_idle(engine), timeout_s=10)


async def test_non_streaming_disconnect_aborts_the_request_and_frees_its_blocks(engine, tokenizer):
    call = AsgiCall(make_app(engine, tokenizer), "/v1/completions", LONG)
    task = asyncio.ensure_future(call.run())
    assert await wait_until(lambda: engine.snapshot(lambda core: core.num_steps > 0 and len(core.requests) == 1)
                            and engine.snapshot(lambda core: core.blocks.num_free_blocks < core.blocks.num_blocks))
    call.disconnected.set()
    await asyncio.wait_for(task, timeout=60)
    assert call.status == 499 and await wait_until(lambda: engine_is_idle(engine), timeout_s=10)


async def test_request_over_the_deadline_is_aborted_with_504(engine, tokenizer):
    app = make_app(engine, tokenizer, request_timeout_s=0.2)
    async with http_client(app) as client:
        r = await client.post("/v1/completions", json=LONG)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert engine_is_idle(engine)


class _FailsAfterFirstOutput(LocalEngineClient):
    """The real engine, whose step fails (as a crashed expert shard would) after the first output."""

    async def generate(self, request_id, prompt_token_ids, params, tag="", precision="full", stream=True):
        async for out in super().generate(request_id, prompt_token_ids, params, tag, precision, stream):
            yield out
            raise EngineStepError("engine step failed: expert shard 3 went away")


async def test_error_after_the_stream_started_is_a_final_error_event_then_done(engine, tokenizer):
    app = create_app(_FailsAfterFirstOutput(engine), make_settings(engine.core, tokenizer))
    async with http_client(app) as client:
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 50, "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200
    assert events[0]["object"] == "chat.completion.chunk"
    assert set(events[-2]) == {"error"} and events[-2]["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"
    assert engine_is_idle(engine)


async def test_admission_errors_of_a_stream_keep_their_http_status(engine, tokenizer):
    async with http_client(make_app(engine, tokenizer)) as client:
        r = await client.post("/v1/completions", json={"prompt": [5, 99999], "stream": True})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert json.loads(r.text)["error"]["param"] == "prompt"


async def test_extra_routers_are_served_next_to_the_api(engine, tokenizer):
    # The hook /metrics (another module) plugs into; the API's error shape covers its routes too.
    from fastapi import APIRouter
    from fastapi.responses import PlainTextResponse

    router = APIRouter()
    router.add_api_route("/metrics", lambda: PlainTextResponse("requests_total 0\n"), methods=["GET"])
    app = create_app(LocalEngineClient(engine), make_settings(engine.core, tokenizer), extra_routers=[router])
    async with http_client(app) as client:
        metrics = await client.get("/metrics")
        wrong = await client.post("/metrics")
    assert metrics.status_code == 200 and metrics.text == "requests_total 0\n"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


class _CountingClient(LocalEngineClient):
    """The real engine; records what `stream` the app asked for and how many outputs it got."""

    def __init__(self, engine):
        super().__init__(engine)
        self.calls: list[tuple[bool, int]] = []

    async def generate(self, request_id, prompt_token_ids, params, tag="", precision="full", stream=True):
        n = 0
        try:
            async for out in super().generate(request_id, prompt_token_ids, params, tag, precision, stream):
                n += 1
                yield out
        finally:                                    # the app closes the iterator once it has the final output
            self.calls.append((stream, n))


async def test_a_non_streaming_request_asks_for_the_final_output_only_and_gets_the_same_text(engine, tokenizer):
    client = _CountingClient(engine)
    app = create_app(client, make_settings(engine.core, tokenizer))
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0}
    async with http_client(app) as http:
        whole = await http.post("/v1/completions", json=body)
        streamed = await http.post("/v1/completions", json={**body, "stream": True})
    assert client.calls[0] == (False, 1)            # one output crossed the client boundary, not 12
    assert client.calls[1][0] is True and client.calls[1][1] > 1
    chunks = [e for e in sse_events(streamed.text) if e != "[DONE]"]
    assert whole.json()["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks)
