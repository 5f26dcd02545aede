"""The socket data plane (parallel/socket_plane.py, wire.py) between real sockets in one process:
bit-identical to local experts, and every way a shard can fail ends in ShardUnavailableError
within the deadline, after which the transport reaches the (restarted) shard again.

The Serve handle's one job here — telling the router where a shard listens — is played by
`ControlPlane`; the Ray tests (tests/integration) run the same transport over real replicas.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from serve_app.model import load_expert_weights, load_model
from serve_app.model.moe import DispatchPlan, ExpertAssignment
from serve_app.parallel import wire
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.socket_plane import ShardServer, SocketTransport
from serve_app.parallel.transport import ShardUnavailableError, run_shard_request
from tests.helpers.checkpoints import build_checkpoint


class _Call:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class ControlPlane:
    """What the transport asks of a Serve handle: `data_plane.remote().result()` → the address."""

    def __init__(self, server: ShardServer):
        self.server, self.asked = server, 0
        self.data_plane = self

    def remote(self):
        self.asked += 1
        return _Call(self.server.address if self.server is not None else TimeoutError("no replica"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("plane"), "mixtral", num_local_experts=8)
    return ckpt.path, load_model(ckpt.path)


def _servers(path, plan, compute=None):
    servers = []
    for spec in plan.shards:
        backend = load_expert_weights(path, spec.experts)
        servers.append(ShardServer(compute or (lambda req, b=backend: run_shard_request(b, req)), "127.0.0.1", 0))
    return servers


def _layer(whole, rows=9, dtype=torch.float32, seed=0):
    x = torch.randn(rows, whole.config.hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x, whole.layers[1].mlp.plan(x)


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_outputs_are_bit_identical_to_local_experts(model, num_shards):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, num_shards)
    servers = _servers(path, plan)
    transport = SocketTransport([ControlPlane(s) for s in servers], plan, timeout_s=10)
    for rows, seed in ((1, 0), (9, 1), (300, 2)):          # 300 rows: frames larger than one send
        x, dispatch = _layer(whole, rows, seed=seed)
        got, want = transport.run_experts(x, dispatch), whole.local_experts.run_experts(x, dispatch)
        assert got.keys() == want.keys() and all(torch.equal(got[e], want[e]) for e in got)
    transport.close()


def test_bf16_rows_travel_as_their_bytes(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)
    seen = []
    servers = _servers(path, plan, compute=lambda req: (seen.append(req.x.dtype), req.x * 2)[1])
    transport = SocketTransport([ControlPlane(s) for s in servers], plan)
    x, dispatch = _layer(whole, 5, dtype=torch.bfloat16)
    out = transport.run_experts(x, dispatch)
    assert set(seen) == {torch.bfloat16}
    for a in dispatch.assignments:
        assert out[a.expert].dtype == torch.bfloat16 and torch.equal(out[a.expert], x[a.rows] * 2)


def test_a_shard_side_error_fails_the_layer_and_the_next_layer_works(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)
    fail = threading.Event()

    def compute(req):
        if fail.is_set():
            raise KeyError("no such expert")
        return req.x + 1
    transport = SocketTransport([ControlPlane(s) for s in _servers(path, plan, compute)], plan)
    x, dispatch = _layer(whole)
    fail.set()
    with pytest.raises(ShardUnavailableError, match="KeyError"):
        transport.run_experts(x, dispatch)
    fail.clear()
    assert all(torch.equal(y, x[a.rows] + 1) for a, y in
               ((a, transport.run_experts(x, dispatch)[a.expert]) for a in dispatch.assignments))


def test_a_slow_shard_fails_the_layer_at_the_deadline_and_its_late_answer_is_not_taken(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)
    delay = {"s": 1.5}

    def compute(req):
        time.sleep(delay["s"])
        return req.x * 3
    transport = SocketTransport([ControlPlane(s) for s in _servers(path, plan, compute)], plan, timeout_s=0.4)
    x, dispatch = _layer(whole)
    started = time.perf_counter()
    with pytest.raises(ShardUnavailableError, match="no answer within"):
        transport.run_experts(x, dispatch)
    assert time.perf_counter() - started < 1.0               # one deadline for the layer, not one per shard
    delay["s"] = 0.0
    time.sleep(1.6)                                          # the late answers have been sent by now
    x2, dispatch2 = _layer(whole, seed=5)
    out = transport.run_experts(x2, dispatch2)              # fresh connections: not the late answers
    assert all(torch.equal(out[a.expert], x2[a.rows] * 3) for a in dispatch2.assignments)


def test_a_restarted_shard_is_found_again_through_the_control_plane(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)
    servers = _servers(path, plan)
    control = [ControlPlane(s) for s in servers]
    transport = SocketTransport(control, plan, timeout_s=2)
    x, dispatch = _layer(whole)
    want = whole.local_experts.run_experts(x, dispatch)
    transport.run_experts(x, dispatch)
    # Shard 1 "restarts" while idle: its connections close, a new replica listens elsewhere.
    servers[1].close()
    control[1].server = _servers(path, plan)[1]
    time.sleep(0.1)
    got = transport.run_experts(x, dispatch)                 # closed while idle: replaced before use
    assert all(torch.equal(got[e], want[e]) for e in want)
    assert control[1].asked == 2 and control[0].asked == 1
    # While no replica is up, the layer fails fast and cleanly; once one is back, it serves.
    control[1].server.close()
    control[1].server = None
    with pytest.raises(ShardUnavailableError, match="shard 1"):
        transport.run_experts(x, dispatch)
    control[1].server = _servers(path, plan)[1]
    got = transport.run_experts(x, dispatch)
    assert all(torch.equal(got[e], want[e]) for e in want)


def test_a_connection_without_the_token_is_refused_and_the_shard_keeps_serving(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 1)
    server = _servers(path, plan)[0]
    with socket.create_connection((server.address.host, server.address.port), timeout=5) as stranger:
        stranger.sendall(b"x" * wire.TOKEN_BYTES)
        assert stranger.recv(1) == b""                        # closed on us
    with socket.create_connection((server.address.host, server.address.port), timeout=5) as garbled:
        garbled.sendall(server.address.token + b"\0" * wire.REQUEST.size)   # the right token, then junk
        assert garbled.recv(1) == b""
    x, dispatch = _layer(whole)
    got = SocketTransport([ControlPlane(server)], plan).run_experts(x, dispatch)
    want = whole.local_experts.run_experts(x, dispatch)
    assert all(torch.equal(got[e], want[e]) for e in want)


def test_each_shard_is_timed_on_its_own(model):
    """Shard 0 answers after 0.5 s, shard 1 at once: shard 1's recorded round trip is its own."""
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)

    def compute(req, delay):
        time.sleep(delay)
        return req.x

    servers = [ShardServer(lambda req, d=d: compute(req, d), "127.0.0.1", 0) for d in (0.5, 0.0)]
    records = []
    transport = SocketTransport([ControlPlane(s) for s in servers], plan, on_dispatch=records.append)
    x, dispatch = _layer(whole, rows=16)
    transport.run_experts(x, dispatch)
    seconds = {r.shard: r.seconds for r in records}
    assert seconds[1] < 0.3 < 0.5 <= seconds[0]


def test_a_shard_the_layer_does_not_wait_on_closing_mid_layer_costs_the_layer_nothing(model):
    """The layer's rows all go to shard 1, which is slow; meanwhile idle shard 0 goes away."""
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 2)
    servers = []

    def slow(req):
        servers[0].close()                       # the other shard dies while this one computes
        time.sleep(0.2)
        return req.x * 5
    servers += [ShardServer(lambda req: req.x * 5, "127.0.0.1", 0), ShardServer(slow, "127.0.0.1", 0)]
    transport = SocketTransport([ControlPlane(s) for s in servers], plan, timeout_s=5)
    transport._connection(0, time.perf_counter() + 5)     # shard 0 connected, idle this layer
    layer = whole.config.moe_layers[0]
    expert = next(e for (l, e), held in transport.holders.items() if l == layer and held == (1,))
    x = torch.randn(4, whole.config.hidden_size)
    dispatch = DispatchPlan(layer, 4, torch.full((4, 1), expert), torch.ones(4, 1),
                            torch.zeros(4, whole.config.num_experts),
                            [ExpertAssignment(expert, torch.arange(4), torch.ones(4))])
    out = transport.run_experts(x, dispatch)
    assert torch.equal(out[expert], x * 5)


def test_a_closed_server_accepts_nothing_more(model):
    server = ShardServer(lambda req: req.x, "127.0.0.1", 0)
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.address.host, server.address.port), timeout=2)


def test_an_answer_of_the_wrong_shape_fails_the_layer_cleanly(model):
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 1)
    server = ShardServer(lambda req: req.x[:-1], "127.0.0.1", 0)          # one row short
    transport = SocketTransport([ControlPlane(server)], plan, timeout_s=5)
    x, dispatch = _layer(whole)
    with pytest.raises(ShardUnavailableError, match="the answer is"):
        transport.run_experts(x, dispatch)


def test_a_shard_that_dies_under_a_question_is_asked_again_on_its_replacement(model):
    """Serve replaces a dead replica: the layer sends its rows again to the new one, once."""
    path, whole = model
    plan = PlacementPlan.round_robin(whole.config, 1)
    backend = load_expert_weights(path, plan.shards[0].experts)
    control = ControlPlane(None)

    def dying(req):
        control.server = replacement            # Serve's new replica, up while the old one dies
        old.close()
        return req.x
    old = ShardServer(dying, "127.0.0.1", 0)
    replacement = ShardServer(lambda req: run_shard_request(backend, req), "127.0.0.1", 0)
    control.server = old
    transport = SocketTransport([control], plan, timeout_s=5)
    x, dispatch = _layer(whole)
    got, want = transport.run_experts(x, dispatch), whole.local_experts.run_experts(x, dispatch)
    assert all(torch.equal(got[e], want[e]) for e in want) and control.asked == 2
    # A replacement that dies as well within the same layer is not asked a third time.
    servers = []

    def dies(req):                              # every replica dies on its first question
        me = servers[-1]
        servers.append(ShardServer(dies, "127.0.0.1", 0))
        control.server = servers[-1]
        me.close()
        return req.x
    servers.append(ShardServer(dies, "127.0.0.1", 0))
    control.server, control.asked = servers[-1], 0
    transport._drop(0)
    with pytest.raises(ShardUnavailableError, match="failed twice"):
        transport.run_experts(x, dispatch)
    assert control.asked == 2
