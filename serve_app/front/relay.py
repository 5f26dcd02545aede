"""One request through the front: read its body, send it to a live Ingress replica, relay the answer.

Failure policy (nginx's `proxy_next_upstream error` for requests that are not idempotent):
- A replica that refuses the connection (killed, or its replacement not listening yet) has seen
  nothing: it is put last for `down_s` and the next port is tried, for any method.
- A replica that went away after the request was sent and before its response head may have begun
  generating: a POST is not replayed (the Router may still finish the first copy), the client gets
  503 with Retry-After, which every OpenAI client retries. GET, HEAD and OPTIONS are sent once
  more by aiohttp's client itself (to the same port), then to the next port.
- Once the response began, a stream (`text/event-stream`) gets the error event the Ingress itself
  sends for a failure mid-stream, then `data: [DONE]` on the OpenAI routes (llama.cpp's `/completion`
  and `/infill` streams end without one). Only whole events are relayed, so that error event never
  follows half a JSON object. Any other body is cut: a short read is all that is left to say.

The client leaving cancels the handler (`handler_cancellation`), which closes the upstream
connection; the Ingress sees the disconnect and aborts the engine request, as without the front.
Bodies are read whole first (limit and deadline as the Ingress applies them, so a slow client holds
a coroutine here, not an Ingress replica's task); `Expect: 100-continue` is answered here (a declared
body over the limit gets its 413 before it is sent) and not passed on. The client's Host goes to
the replica, so what it builds from it (FastAPI's trailing-slash redirects) names the public address.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from serve_app.api.body import body_timeout, too_large
from serve_app.api.errors import ApiError, retry_after_header

# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing fields each side sets for itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "content-length",
                        "expect"})     # the body is read here first: nothing for the replica to continue
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Headers a client reads as one value. Serve's RequestIdMiddleware appends its own X-Request-ID
# after the app's (the completion's id, which our logs and the body name): the app's is kept.
ONCE = frozenset({"x-request-id"})
# What aiohttp's client would add on its own; a header the client did not send is not invented
# (no Content-Type on a body: the Ingress accepts that as JSON, application/octet-stream it refuses).
NOT_INVENTED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
SSE_ERROR_TAIL_V1 = b"data: [DONE]\n\n"


class _ClientGone(Exception):
    """A write to the client failed: it closed its connection (not an upstream failure)."""


async def _send(resp: web.StreamResponse, data: bytes) -> None:
    try:
        await resp.write(data)
    except ConnectionResetError as exc:
        raise _ClientGone from exc


@dataclass(frozen=True)
class RelayConfig:
    """What a relay needs to know of the app (built from AppConfig by server.FrontConfig)."""
    upstream_host: str               # where the Ingress replicas listen (this node)
    upstream_ports: tuple[int, ...]  # their direct-ingress port range, every port of it
    max_body_bytes: int              # AppConfig.max_body_bytes: larger bodies get 413 here
    body_timeout_s: float            # AppConfig.request_timeout_s: a body still arriving after it gets 408
    head_timeout_s: float            # no response head from the replica by then: 504 (a safety net; the
                                     # Ingress answers within request_timeout_s itself)
    retry_after_s: float = 1.0       # Retry-After of the front's own 503s
    down_s: float = 0.5              # a refusing port is tried last for this long


class Upstreams:
    """The Ingress ports in round-robin order, the ones that refused lately last (still tried: a
    replacement replica may listen again before `down_s` is over, and refusal costs microseconds)."""

    def __init__(self, ports: tuple[int, ...], down_s: float) -> None:
        if not ports:
            raise ValueError("a front needs at least one upstream port")
        self.ports, self.down_s = ports, down_s
        self._down_until = dict.fromkeys(ports, 0.0)
        self._next = 0

    def order(self) -> list[int]:
        k = self._next % len(self.ports)
        self._next += 1
        rotated = self.ports[k:] + self.ports[:k]
        now = time.monotonic()
        return sorted(rotated, key=lambda p: self._down_until[p] > now)   # stable: round-robin kept

    def mark_down(self, port: int) -> None:
        self._down_until[port] = time.monotonic() + self.down_s

    def mark_up(self, port: int) -> None:
        self._down_until[port] = 0.0


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


class Relay:
    """The aiohttp handler. Owns one client session (a keep-alive pool per Ingress port)."""

    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        self.upstreams = Upstreams(cfg.upstream_ports, cfg.down_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Pooled connections are dropped after 30 s idle, well before uvicorn's keep-alive (Ray's
        # http_options.keep_alive_timeout_s, 90 s by default) closes them from the replica's side.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             skip_auto_headers=NOT_INVENTED, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def unavailable(self, why: str) -> ApiError:
        return ApiError(503, f"the server is restarting, retry later: {why}", type="server_error",
                        code="ingress_unavailable", headers=retry_after_header(self.cfg.retry_after_s))

    async def expect(self, request: web.Request) -> web.Response | None:
        """aiohttp's Expect handler: refuse a declared body over the limit before the client sends
        it; else answer 100 Continue as aiohttp would."""
        if request.content_length is not None and request.content_length > self.cfg.max_body_bytes:
            return error_response(too_large(request.content_length, self.cfg.max_body_bytes))
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(ApiError(417, f"unknown Expect: {request.headers.get('Expect')!r}",
                                           code="expectation_failed"))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0       # the response proper has not begun (as aiohttp's own)
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.raw_path.startswith("/"):      # absolute-form or `*`: nothing to relay
            return error_response(ApiError(400, f"unsupported request target {request.raw_path[:100]!r}",
                                           code="invalid_request_target"))
        try:
            body = await self._read_body(request)
            upstream = await self._open(request, body)
        except ApiError as err:
            return error_response(err)
        async with upstream:
            return await self._relay(request, upstream)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(request.content_length, limit)
        buf = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.content.iter_any():
                    buf += chunk
                    if len(buf) > limit:
                        raise too_large(len(buf), limit, at_least=True)
        except TimeoutError:
            raise body_timeout(self.cfg.body_timeout_s) from None
        except RequestPayloadError as exc:    # malformed chunked framing
            raise ApiError(400, f"malformed request body: {exc}", code="invalid_body") from None
        return bytes(buf)

    def _headers(self, request: web.Request) -> CIMultiDict:
        named = {h.strip().lower() for line in request.headers.getall("Connection", ()) for h in line.split(",")}
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP_BY_HOP and k.lower() not in named)
        peer = request.remote or ""
        seen = headers.popall("X-Forwarded-For", [])
        headers["X-Forwarded-For"] = ", ".join([*seen, peer]) if seen else peer
        return headers

    async def _open(self, request: web.Request, body: bytes) -> aiohttp.ClientResponse:
        """The first replica's response head, or an ApiError for the client."""
        assert self.session is not None, "Relay.start() first"
        headers = self._headers(request)
        for port in self.upstreams.order():
            url = URL(f"http://{self.cfg.upstream_host}:{port}{request.raw_path}", encoded=True)
            try:
                async with asyncio.timeout(self.cfg.head_timeout_s):
                    upstream = await self.session.request(request.method, url, headers=headers,
                                                          data=body or None, allow_redirects=False)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # Refused, or not accepted within sock_connect (a full listen backlog): not sent.
                self.upstreams.mark_down(port)
                continue
            except TimeoutError:
                raise ApiError(504, f"no answer from the Ingress within {self.cfg.head_timeout_s:g} s",
                               type="timeout_error", code="upstream_timeout") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
                if request.method in IDEMPOTENT:
                    continue            # aiohttp already sent it again on this port: the next one
                raise self.unavailable(f"the Ingress replica stopped before answering ({type(exc).__name__})") \
                    from None
            self.upstreams.mark_up(port)
            return upstream
        raise self.unavailable("no Ingress replica is accepting connections")

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() in HOP_BY_HOP or (k.lower() in ONCE and k in resp.headers):
                continue
            resp.headers.add(k, v)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        events = upstream.content_type == "text/event-stream"
        await resp.prepare(request)
        pending = b""                   # an event stream's bytes after its last complete event
        try:
            async for chunk in upstream.content.iter_any():
                if not events:
                    await _send(resp, chunk)
                    continue
                pending += chunk
                cut = pending.rfind(b"\n\n") + 2
                if cut >= 2:
                    await _send(resp, pending[:cut])
                    pending = pending[cut:]
        except _ClientGone:
            # The client left: leaving this handler closes the upstream connection, which the
            # Ingress reads as a disconnect (the request is aborted); aiohttp notes the reset.
            return resp
        except (aiohttp.ClientError, OSError):
            if not events:
                # A body cut mid-way: cut the client's connection too, so that it cannot take
                # half a body for the whole (its framing is then incomplete, as the Ingress's was).
                if request.transport is not None:
                    request.transport.close()
                return resp
            pending = self._stream_error(request.path)
        try:
            if pending:
                await resp.write(pending)
            await resp.write_eof()
        except ConnectionResetError:
            pass                        # the client left at the end: nothing more to tell it
        return resp

    def _stream_error(self, path: str) -> bytes:
        err = self.unavailable("the Ingress replica stopped mid-stream")
        event = f"data: {json.dumps(err.body(), separators=(',', ':'))}\n\n".encode()
        return event + (SSE_ERROR_TAIL_V1 if path.startswith("/v1/") else b"")
