"""Driving one request's engine outputs: to a JSON body, or to a server-sent-event stream.

Cancellation is the point of this module. An editor cancels a completion on every keystroke; a
cancelled request that keeps decoding holds KV blocks and batch slots that live requests need. So
whenever the client goes away or the deadline passes, the engine iterator is closed *and*
`client.abort` is awaited (shielded from the cancellation that got us here), which frees the
request's blocks before we return:
- Before the response starts (non-streaming, or waiting for a stream's first token) we watch the
  ASGI channel for `http.disconnect` next to the work (`run_guarded`).
- While streaming, Starlette cancels the body iterator on disconnect (ASGI < 2.4) or `send` fails
  (ASGI >= 2.4, where Starlette leaves the iterator suspended); `EventStreamResponse` closes the
  iterator in both cases, so its `finally` always runs.
Errors after the headers went out cannot change the status: they become a final
`data: {"error": ...}` event, then `data: [DONE]`, as OpenAI's streams do.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.api.client import EngineClient
from serve_app.api.errors import ApiError, from_exception
from serve_app.api.prepare import PreparedRequest
from serve_app.api.render import Renderer, StreamState
from serve_app.engine import RequestOutput

T = TypeVar("T")
DONE_EVENT = "data: [DONE]\n\n"
# Status for "the client closed the connection before we answered" (nginx's convention); nobody reads it.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client went away before the response started; nobody is listening for an answer."""


def request_timeout(timeout_s: float) -> ApiError:
    return ApiError(504, f"the request did not finish within {timeout_s:g} s and was aborted",
                    type="timeout_error", code="request_timeout")


async def run_guarded(request: Request, work: Awaitable[T], deadline: float, timeout_s: float) -> T:
    """`await work`, unless the client disconnects (→ ClientDisconnected) or the deadline passes
    (→ 504); either way `work` is cancelled and finished before this returns."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            raise ClientDisconnected()
        raise request_timeout(timeout_s)
    finally:
        task.cancel()
        gone.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, gone, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the only message left on the channel is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def last_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in outputs:
        if final.finished:
            break
    if final is None or not final.finished:
        raise RuntimeError("the engine's output stream ended before the request finished")
    return final


async def abort_quietly(client: EngineClient, outputs: AsyncIterator[Any], request_id: str) -> None:
    """Close the engine iterator and abort the request, even while being cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await outputs.aclose()
        finally:
            await client.abort(request_id)


def start_generation(client: EngineClient, prepared: PreparedRequest, stream: bool) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for a prepared request (`stream`: every step's, else the final one);
    the request's `on_finished` hook sees the final output on its way."""
    outputs = client.generate(prepared.request_id, prepared.prompt_token_ids, prepared.params,
                              tag=prepared.tier.tier.value, precision=prepared.precision, stream=stream)
    return outputs if prepared.on_finished is None else _Hooked(outputs, prepared.on_finished)


class _Hooked:
    """The engine's outputs, with a hook called on the final one. An iterator object, not an async
    generator: `aclose` goes straight to the engine's iterator (which aborts the request), whatever
    state this one is in, exactly as without the hook."""

    def __init__(self, outputs: AsyncIterator[RequestOutput], on_finished) -> None:
        self.outputs, self.on_finished = outputs, on_finished

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self.outputs.__anext__()
        if out.finished:
            self.on_finished(out)
        return out

    async def aclose(self) -> None:
        await self.outputs.aclose()


def response_headers(prepared: PreparedRequest) -> dict[str, str]:
    return {"X-Request-Id": prepared.request_id, "x-moe-tier": prepared.tier.tier.value,
            "x-moe-precision": prepared.precision}


# Event streams are not to be cached or buffered by proxies (nginx reads X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def fail_before_response(client: EngineClient, outputs: AsyncIterator[Any], prepared: PreparedRequest,
                               exc: BaseException) -> Response:
    """An error before the response started: free the request's blocks first, then answer 499 to
    a client that left, or raise the error's API response (cancellation propagates)."""
    await abort_quietly(client, outputs, prepared.request_id)
    if isinstance(exc, ClientDisconnected):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(exc, Exception):
        raise from_exception(exc, prepared.param_aliases) from exc
    raise exc


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is always closed when the response ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


async def event_stream(first: RequestOutput, outputs: AsyncIterator[RequestOutput], prepared: PreparedRequest,
                       renderer: Renderer, client: EngineClient, deadline: float,
                       timeout_s: float) -> AsyncIterator[str]:
    """SSE events for one request, starting from its first output (already received)."""
    state, out, error = StreamState(), first, None
    try:
        while True:
            for chunk in renderer.chunks(out, state):
                yield sse(chunk.model_dump_json())
            if out.finished:
                break
            out = await next_before(outputs, deadline, timeout_s)
        if prepared.include_usage:
            yield sse(renderer.usage_chunk(out).model_dump_json())
    except Exception as exc:             # noqa: BLE001 - the status is sent; report in-band
        error = from_exception(exc, prepared.param_aliases)
    finally:
        if not out.finished:             # error, timeout, disconnect: free the blocks first
            await abort_quietly(client, outputs, prepared.request_id)
    if error is not None:
        yield sse(json.dumps(error.body()))
    yield DONE_EVENT


async def next_before(outputs: AsyncIterator[RequestOutput], deadline: float, timeout_s: float) -> RequestOutput:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        out = await asyncio.wait_for(anext(outputs, None), timeout=max(0.0, remaining))
    except asyncio.TimeoutError:
        raise request_timeout(timeout_s) from None
    if out is None:
        raise RuntimeError("the engine's output stream ended before the request finished")
    return out
