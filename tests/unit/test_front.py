"""The front (serve_app/front): a real aiohttp relay on a real port, in front of real upstreams —
uvicorn serving a Starlette app (what a direct-ingress Ingress replica runs), and raw sockets
that misbehave as a killed replica does (close before the head, die mid-stream)."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from serve_app.cli import free_port
from serve_app.config import AppConfig
from serve_app.front.relay import RelayConfig, Upstreams
from serve_app.front.server import FrontConfig, FrontServer


async def _echo(request):
    body = await request.body()
    return JSONResponse({"method": request.method, "path": request.url.path, "query": request.url.query,
                         "body": body.decode(), "headers": dict(request.headers)})


async def _two_ids(request):
    from starlette.responses import Response
    resp = Response(b"{}", media_type="application/json", headers={"X-Request-ID": "cmpl-1"})
    resp.raw_headers += [(b"x-request-id", b"serve-uuid"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    return resp


async def _events(request):
    async def gen():
        for i in range(3):
            yield f"data: {i}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream")


class Uvicorn:
    """A Starlette app on uvicorn in a thread, as a direct-ingress replica serves the Ingress."""

    def __init__(self) -> None:
        self.port = free_port()
        app = Starlette(routes=[Route("/echo", _echo, methods=["GET", "POST", "HEAD"]),
                                Route("/v1/events", _events, methods=["POST"]),
                                Route("/two-ids", _two_ids, methods=["GET"])])
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Uvicorn":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class RawUpstream:
    """A listener that reads one request head per connection, then does `act(conn, self)`; records
    the heads it saw (`heads`) and, where `act` sets it, that the front closed its end (`peer_closed`)."""

    def __init__(self, act) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.act, self.heads, self.peer_closed = act, [], threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        self.heads.append(data.split(b"\r\n\r\n")[0].decode())
        self.act(conn, self)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawUpstream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hang_up(conn: socket.socket, up: RawUpstream) -> None:
    """A replica that dies after reading the request head, before any answer."""
    conn.close()


def _front(*ports: int, max_body: int = 1000, body_timeout_s: float = 5.0) -> FrontServer:
    relay = RelayConfig("127.0.0.1", ports, max_body_bytes=max_body, body_timeout_s=body_timeout_s,
                        head_timeout_s=20.0)
    return FrontServer(FrontConfig("127.0.0.1", free_port(), relay))


def _post(front: FrontServer, path: str, body: bytes = b"{}", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", front.cfg.port, timeout=10)
    conn.request("POST", path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp, resp.read()


def _is_retry_later(resp, data: bytes) -> None:
    assert resp.status == 503 and resp.getheader("Retry-After") == "1"
    assert json.loads(data)["error"]["code"] == "ingress_unavailable"


def test_requests_and_answers_pass_through_on_one_kept_alive_connection():
    with Uvicorn() as up, _front(up.port) as front:
        conn = http.client.HTTPConnection("127.0.0.1", front.cfg.port, timeout=10)
        for i in range(3):
            conn.request("POST", f"/echo?x={i}", body=b'{"a": 1}', headers={"X-Custom": "y", "Connection": "keep-alive"})
            resp = conn.getresponse()
            seen = json.loads(resp.read())
            assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
            assert (seen["method"], seen["path"], seen["query"], seen["body"]) == ("POST", "/echo", f"x={i}", '{"a": 1}')
            assert seen["headers"]["x-custom"] == "y" and seen["headers"]["x-forwarded-for"] == "127.0.0.1"
            # The client's Host goes on (redirects the Ingress builds name the public port).
            assert seen["headers"]["host"] == f"127.0.0.1:{front.cfg.port}"
            # Nothing invented: no Content-Type (the Ingress reads that as JSON), no client User-Agent.
            assert "content-type" not in seen["headers"] and "user-agent" not in seen["headers"]
            assert "keep-alive" not in seen["headers"].get("connection", "")     # hop-by-hop, not relayed
        conn.request("GET", "/echo")
        assert json.loads(conn.getresponse().read())["method"] == "GET"        # the same connection still


def test_an_event_stream_is_relayed_whole():
    with Uvicorn() as up, _front(up.port) as front:
        resp, data = _post(front, "/v1/events")
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        assert data == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


def test_no_replica_listening_is_a_503_with_retry_after():
    with _front(free_port(), free_port()) as front:
        resp, data = _post(front, "/v1/completions")
        _is_retry_later(resp, data)


def test_a_dead_replica_port_is_skipped_for_a_live_one():
    with Uvicorn() as up, _front(free_port(), up.port) as front:
        for _ in range(4):                      # round-robin starts at each port in turn
            resp, data = _post(front, "/echo")
            assert resp.status == 200 and json.loads(data)["path"] == "/echo"


def test_upstream_order_is_round_robin_with_refusing_ports_last():
    ups = Upstreams((1, 2, 3), down_s=60)
    assert [ups.order()[0] for _ in range(3)] == [1, 2, 3]
    ups.mark_down(2)
    assert ups.order() == [1, 3, 2] and ups.order() == [3, 1, 2]
    ups.mark_up(2)
    assert ups.order() == [3, 1, 2]


def test_a_replica_that_dies_before_answering_a_post_gets_503_and_no_replay():
    with RawUpstream(_hang_up) as up, _front(up.port) as front:
        resp, data = _post(front, "/v1/completions", b'{"prompt": "x"}')
        _is_retry_later(resp, data)
        assert len(up.heads) == 1           # a POST that reached a replica is not sent again


def test_a_get_is_retried_once_when_the_replica_dies_before_answering():
    with RawUpstream(_hang_up) as up, _front(up.port) as front:
        conn = http.client.HTTPConnection("127.0.0.1", front.cfg.port, timeout=10)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        _is_retry_later(resp, resp.read())
        assert len(up.heads) == 2 and all(h.startswith("GET /v1/models ") for h in up.heads)


def _die_mid_event(conn, up):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    first = b'data: {"choices": []}\n\ndata: {"cho'                 # one event and half of the next
    conn.sendall(b"%x\r\n%s\r\n" % (len(first), first))
    time.sleep(0.05)
    conn.close()


@pytest.mark.parametrize("path, done", [("/v1/completions", True), ("/infill", False)])
def test_a_stream_cut_by_a_dying_replica_ends_with_an_error_event(path, done):
    with RawUpstream(_die_mid_event) as up, _front(up.port) as front:
        resp, data = _post(front, path)
        assert resp.status == 200
        events = data.decode().split("\n\n")
        assert events[0] == 'data: {"choices": []}'                         # the whole event relayed
        error = json.loads(events[1].removeprefix("data: "))["error"]        # the half one dropped
        assert error["code"] == "ingress_unavailable"
        assert events[2:] == (["data: [DONE]", ""] if done else [""])     # llama.cpp streams: no [DONE]


def test_a_client_that_leaves_closes_the_replicas_connection():
    def hold(conn, up):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"b\r\ndata: 0\n\n\n\r\n")
        conn.settimeout(10)
        try:
            if conn.recv(1) == b"":
                up.peer_closed.set()           # the front closed it: the Ingress would abort the request
        except OSError:
            up.peer_closed.set()
    with RawUpstream(hold) as up, _front(up.port) as front:
        client = socket.create_connection(("127.0.0.1", front.cfg.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        seen = b""
        while b"data: 0" not in seen:                  # the head and the event may come apart
            chunk = client.recv(4096)
            assert chunk, seen
            seen += chunk
        client.close()
        assert up.peer_closed.wait(5)


def test_one_request_id_reaches_the_client_and_repeated_headers_stay_repeated():
    with Uvicorn() as up, _front(up.port) as front:
        conn = http.client.HTTPConnection("127.0.0.1", front.cfg.port, timeout=10)
        conn.request("GET", "/two-ids")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.headers.get_all("X-Request-ID") == ["cmpl-1"]   # the app's, once
        assert resp.headers.get_all("Set-Cookie") == ["a=1", "b=2"]


def test_bodies_over_the_limit_get_413_declared_or_chunked():
    with Uvicorn() as up, _front(up.port, max_body=100) as front:
        resp, data = _post(front, "/echo", b"x" * 101)
        assert resp.status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
        conn = http.client.HTTPConnection("127.0.0.1", front.cfg.port, timeout=10)
        conn.request("POST", "/echo", body=iter([b"x" * 60, b"y" * 60]), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413 and "at least" in json.loads(resp.read())["error"]["message"]
        resp, data = _post(front, "/echo", b"x" * 100)                           # at the limit: relayed
        assert resp.status == 200 and json.loads(data)["body"] == "x" * 100


def test_a_body_that_does_not_arrive_in_time_gets_408():
    with Uvicorn() as up, _front(up.port, body_timeout_s=0.3) as front:
        client = socket.create_connection(("127.0.0.1", front.cfg.port), timeout=5)
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        head = client.recv(4096).decode()
        assert head.startswith("HTTP/1.1 408") and '"request_timeout"' in head


def test_expect_100_continue_and_malformed_requests():
    with Uvicorn() as up, _front(up.port) as front:
        client = socket.create_connection(("127.0.0.1", front.cfg.port), timeout=5)
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        client.sendall(b"{}")
        answer = client.recv(4096)
        while b'"headers"' not in answer:                             # the echo's body, after its head
            answer += client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200") and b'"expect"' not in answer.lower()   # not passed on
        big = socket.create_connection(("127.0.0.1", front.cfg.port), timeout=5)
        big.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        assert big.recv(4096)[9:12] == b"413"                        # refused before the body is sent
        odd = socket.create_connection(("127.0.0.1", front.cfg.port), timeout=5)
        odd.sendall(b"GET http://elsewhere/v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert odd.recv(4096)[9:12] == b"400"                        # absolute-form target: not relayed
        bad = socket.create_connection(("127.0.0.1", front.cfg.port), timeout=5)
        bad.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}")
        assert bad.recv(4096)[9:12] == b"400"                         # both framings: refused, not guessed
        resp, _ = _post(front, "/echo")
        assert resp.status == 200                                    # and the front still serves


def test_the_ingress_ports_sit_above_the_public_one():
    assert AppConfig(port=9000).ingress_ports() == (9001,)
    assert AppConfig(port=9000, front=False).ingress_ports() == (9000,)
    scaled = AppConfig(port=9000, autoscaling={"ingress": {"min_replicas": 1, "max_replicas": 3}})
    assert scaled.ingress_ports() == (9001, 9002, 9003)
    cfg = FrontConfig.from_app(scaled)
    assert (cfg.port, cfg.relay.upstream_ports, cfg.relay.max_body_bytes) == (9000, (9001, 9002, 9003), 1 << 20)
