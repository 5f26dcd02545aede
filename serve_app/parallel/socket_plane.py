"""The socket data plane: router ⇄ expert shards over plain TCP connections, Serve as the control plane.

Why (docs/benchmarks.md, "Data plane"): a Serve handle call per shard per MoE layer costs
milliseconds (request routing, the replica's event loop, pickling, the object store), and every
decode step makes one per MoE layer. Here each shard replica listens on a port of its node; the
router keeps one connection per shard and a layer is one frame out and one frame back per shard
(`wire.py`): on one node the kernel's loopback, across nodes the network, no Ray code in between.

Serve stays the control plane: it places, health-checks and restarts the ExpertShard replicas,
and the router learns a shard's address by asking the shard through its Serve handle
(`ExpertShard.data_plane`). A connection that dies under a question (the replica died or was
restarted) is replaced once within the layer: Serve is asked again, routes to the replacement when
it is up, and the rows are sent again (they are a pure function of the request), so a restart that
fits in the dispatch timeout costs the step time, not its requests; a second failure, a timeout or
a shard's own error fails the layer with ShardUnavailableError (503 for the requests in that step).
A connection found closed while idle is replaced before sending. The router never restarts.

Each replica draws a random token when it starts and hands it out only through Serve; a
connection must present it first, so only a caller that Serve lets reach the replica can use its
port (nothing the peer sends is unpickled either way).

Legend: R=rows sent to one shard, D=hidden.
"""
from __future__ import annotations

import hmac
import itertools
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from ray.exceptions import RayActorError

from serve_app.model.moe import DispatchPlan
from serve_app.parallel import wire
from serve_app.parallel.transport import (DispatchRecord, Replies, ShardRequest, ShardTransport,
                                          ShardUnavailableError, build_requests)

HELLO_TIMEOUT_S = 5.0          # a connection that does not present the token in time is closed
RETRY_PAUSE_S = 0.1            # between control-plane calls while a shard replica is replaced


@dataclass(frozen=True)
class PlaneAddress:
    """Where a data plane listens: a shard replica's (`ExpertShard.data_plane`) or the Router's
    engine process's (`Router.engine_address`, serve_app/hosting)."""
    host: str
    port: int
    token: bytes               # wire.TOKEN_BYTES: the first bytes a connection must send
    pid: int                   # the replica's process, to tell a restarted replica from the old one


def tune(sock: socket.socket) -> socket.socket:
    # Small latency-bound frames (one per layer, or per request output): Nagle's algorithm would hold it back waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer whose host vanished sends no FIN: keepalive probes find it (~25 s) instead of a shard
    # thread waiting forever, or the router learning it only from a layer's timeout.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):                      # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


class ShardServer:
    """Shard side: a listening socket and one thread per connected router, each serving requests
    in order with `compute` (ShardRequest → [R, D], in the request's dtype)."""

    def __init__(self, compute: Callable[[ShardRequest], torch.Tensor], host: str, pid: int):
        self._compute = compute
        self._listener = socket.create_server((host, 0))
        self._open: set[socket.socket] = set()
        self._closed = False
        self._lock = threading.Lock()
        self.address = PlaneAddress(host, self._listener.getsockname()[1], secrets.token_bytes(wire.TOKEN_BYTES), pid)
        threading.Thread(target=self._accept, daemon=True, name="shard-data-plane").start()

    def close(self) -> None:
        """Stop serving, as the replica's death would: the listener and every connection close."""
        with self._lock:
            self._closed = True
            try:
                self._listener.shutdown(socket.SHUT_RDWR)     # wakes the accept() (close alone does not)
            except OSError:
                pass
            self._listener.close()
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:                                # the peer closed it first
                    pass

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:                                    # closed
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(tune(conn),), daemon=True,
                             name="shard-data-plane-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(HELLO_TIMEOUT_S)
                if not hmac.compare_digest(bytes(wire.recv_exact(conn, wire.TOKEN_BYTES)), self.address.token):
                    return
                conn.settimeout(None)                          # a router may stay idle for hours
                with torch.inference_mode():                   # thread-local: set on this thread
                    while True:
                        frame = wire.recv_request(conn)
                        try:
                            y = self._compute(frame.request).to(frame.request.x.dtype)
                        except Exception as exc:               # noqa: BLE001 - reported to the router
                            wire.send_error(conn, frame.seq, f"{type(exc).__name__}: {exc}")
                            continue
                        wire.send_response(conn, frame.seq, y)
            except (OSError, RuntimeError, wire.WireError):    # the router went away, or a stranger
                return
            finally:
                with self._lock:
                    self._open.discard(conn)


@dataclass
class SocketTransport(ShardTransport):
    """ExpertBackend over the shards' data planes (the Serve handles only tell addresses)."""

    # (shard, seconds left) → the address of a live replica of that shard; None = ask the shard's
    # Serve handle (`address_via_serve`). The Router's engine process has no Ray: it asks its replica.
    resolve: Callable[[int, float], PlaneAddress] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.resolve is None:
            self.resolve = address_via_serve(self.handles)
        self._conns: dict[int, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()       # one layer on the wire at a time (lanes share a transport)

    def close(self) -> None:
        with self._lock:
            for shard in list(self._conns):
                self._drop(shard)
            self._selector.close()

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        """Every shard's frame goes out before any answer is read, and all share one deadline; answers
        are taken as they arrive, so each shard's recorded round trip is its own."""
        with self._lock:
            return self._run(x, plan)

    def _run(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        started = time.perf_counter()
        deadline = started + self.timeout_s
        requests = build_requests(x, plan, self.holders, next(self.turns))
        seq = next(self._seq)
        self._drop_closed()
        waiting: dict[int, tuple[ShardRequest, list]] = {}
        resent: set[int] = set()            # shards asked again on a new connection this layer
        out = Replies()
        blame = next(iter(requests), -1)    # the shard a failure is reported against
        try:
            for shard, (req, assigns) in requests.items():
                blame = shard
                self._send(shard, seq, req, deadline, resent)
                waiting[shard] = (req, assigns)
            while waiting:
                events = self._selector.select(self._left(deadline))
                if not events:
                    blame = next(iter(waiting))
                    raise TimeoutError(f"no answer within {self.timeout_s:g} s")
                for key, _ in events:
                    if key.data not in waiting:         # a shard this layer does not wait on closed:
                        self._drop(key.data)            # replaced when a layer needs it
                        continue
                    blame = key.data
                    req, assigns = waiting[blame]
                    try:
                        y = wire.recv_response(self._conns[blame], seq, req.x, deadline)
                    except (TimeoutError, RuntimeError):
                        raise                           # too late, or the shard said why it failed
                    except OSError:                     # the connection died under the question
                        self._resend(blame, seq, req, deadline, resent)
                        continue
                    del waiting[blame]
                    if self.on_dispatch is not None:
                        self.on_dispatch(DispatchRecord(blame, plan.layer, req.x.shape[0], time.perf_counter() - started))
                    out.add(y.to(x.device), assigns)
        except Exception as exc:            # noqa: BLE001 - death, timeout, a bad frame alike
            # An answer still on its way would arrive out of turn: those connections go too.
            for shard in {blame, *waiting}:
                self._drop(shard)
            raise ShardUnavailableError(blame, exc) from exc
        return out.outputs()

    def quiesce(self) -> None:
        """Returns once no layer is on the wire (one started under an old placement has finished)."""
        with self._lock:
            pass

    def _send(self, shard: int, seq: int, req: ShardRequest, deadline: float, resent: set[int]) -> None:
        try:
            self._put(shard, seq, req, deadline)
        except TimeoutError:
            raise
        except OSError:                     # closed since the last layer, unseen by _drop_closed
            self._resend(shard, seq, req, deadline, resent)

    def _put(self, shard: int, seq: int, req: ShardRequest, deadline: float) -> None:
        conn = self._connection(shard, deadline)
        conn.settimeout(self._left(deadline))
        wire.send_request(conn, seq, req)

    def _resend(self, shard: int, seq: int, req: ShardRequest, deadline: float, resent: set[int]) -> None:
        """Ask again, once per layer, on a new connection: a shard replica that died is being
        replaced by Serve, and its rows are a pure function of the request, so the restart costs
        this layer time (within the deadline), not its requests."""
        if shard in resent:
            raise ConnectionError(f"the connection to shard {shard} failed twice in one layer")
        resent.add(shard)
        self._drop(shard)
        self._put(shard, seq, req, deadline)

    def _connection(self, shard: int, deadline: float) -> socket.socket:
        if (conn := self._conns.get(shard)) is not None:
            return conn
        addr = self._address(shard, deadline)
        conn = socket.create_connection((addr.host, addr.port), timeout=self._left(deadline))
        try:
            tune(conn).sendall(addr.token)
            self._selector.register(conn, selectors.EVENT_READ, shard)
        except BaseException:
            conn.close()
            raise
        self._conns[shard] = conn
        return conn

    def _address(self, shard: int, deadline: float) -> PlaneAddress:
        return self.resolve(shard, self._left(deadline))

    def _drop_closed(self) -> None:
        """Between layers nothing should be readable: a readable connection was closed by its
        shard (a replica that died or restarted while idle) and is replaced before use."""
        for key, _ in self._selector.select(0):
            self._drop(key.data)

    def _drop(self, shard: int) -> None:
        if (conn := self._conns.pop(shard, None)) is not None:
            self._selector.unregister(conn)
            conn.close()

    @staticmethod
    def _left(deadline: float) -> float:
        return max(1e-3, deadline - time.perf_counter())


def address_via_serve(handles: Sequence) -> Callable[[int, float], PlaneAddress]:
    """The control plane: Serve routes the call to a live replica of the shard (waiting for one
    that is starting) and it answers with where it listens. A call that reached a replica as it
    died is asked again until the time is up."""
    def resolve(shard: int, timeout_s: float) -> PlaneAddress:
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                return handles[shard].data_plane.remote().result(timeout_s=max(1e-3, deadline - time.perf_counter()))
            except RayActorError:
                if deadline - time.perf_counter() < RETRY_PAUSE_S:
                    raise
                time.sleep(RETRY_PAUSE_S)
    return resolve
