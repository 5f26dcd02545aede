"""The engine in its own process (serve_app/hosting): same outputs as in-process lanes, typed errors,
aborts that free the KV, a dead engine or replica that fails requests as 503 (never a hang), a
connection without the token that is refused, metrics relayed in order, the control pipe both ways.

The Router deployment's Serve handle is replaced by `_RouterHandle` (the address call, awaitable);
the Ray integration tests run the real one (tests/integration/test_serve_app.py, test_chaos.py).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Pipe

import pytest
import torch

from serve_app.api.errors import BackendUnavailableError
from serve_app.config import AppConfig, EngineConfig, ProcessSettings
from serve_app.engine.sequence import RequestRejectedError
from serve_app.hosting.channel import Channel, ChannelClosedError
from serve_app.hosting.client import RemoteEngineClient
from serve_app.hosting.engine_process import TICK_S
from serve_app.hosting.frames import encode
from serve_app.hosting.host import EngineHost
from serve_app.hosting.spec import RouterEngineSpec, build_router_lanes
from serve_app.metrics import Metrics, MetricsRelay
from serve_app.model import ModelConfig
from serve_app.parallel.placement import PlacementPlan
from tests.helpers.engines import build_model_dir, fixed_kernels, greedy

PROMPTS = {"a": [5, 6, 7, 8], "b": [9, 10, 11, 12, 13, 14], "c": [3, 1, 4, 1, 5, 9, 2, 6]}


def _spec(model_dir, **engine) -> RouterEngineSpec:
    plan = PlacementPlan.round_robin(ModelConfig.from_dir(model_dir), 0)
    cfg = EngineConfig(**{"block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 64, **engine})
    return RouterEngineSpec(str(model_dir), plan, cfg, ProcessSettings(1, 0.0005), "float32",
                            quantized_precisions=("int8",))


class _Awaitable:
    def __init__(self, fn):
        self.fn = fn

    def __await__(self):
        async def call():
            return self.fn()
        return call().__await__()


class _RouterHandle:
    """What RemoteEngineClient uses of the Router's Serve handle: `engine_address.remote()`."""

    def __init__(self, host: EngineHost):
        outer = self

        class _Method:
            @staticmethod
            def remote():
                return _Awaitable(lambda: outer.host.address)
        self.host, self.engine_address = host, _Method


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("hosting"), "mixtral")


@pytest.fixture(scope="module")
def metrics():
    return Metrics("prometheus")


@pytest.fixture(scope="module")
def host(model_dir, metrics):
    with fixed_kernels():           # the engine process and this one pick the same kernels
        host = EngineHost(_spec(model_dir), [], metrics, "127.0.0.1")
        yield host
    host.close()


async def _collect(client, request_id, prompt, params, precision="full", stream=True):
    return [o async for o in client.generate(request_id, prompt, params, precision=precision, stream=stream)]


def test_outputs_equal_the_same_lanes_in_this_process(model_dir, host):
    client = RemoteEngineClient(_RouterHandle(host))

    async def run(engine, prefix):
        results = {}
        for precision in ("full", "int8"):
            for stream in (True, False):
                calls = [_collect(engine, f"{prefix}{rid}{precision}{stream}", p, greedy(12), precision, stream)
                         for rid, p in PROMPTS.items()]
                # float32 is batch-invariant here, so the full lane runs them together; the int8 kernels'
                # sums depend on the rows in the call, so those run one at a time (same batches both sides).
                outs = await asyncio.gather(*calls) if precision == "full" else [await c for c in calls]
                results[precision, stream] = [(o[-1].outputs[0].token_ids, o[-1].outputs[0].text, len(o))
                                              for o in outs]
        return results

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the engine process's (spec.process): sums depend on the thread split
    with fixed_kernels():
        lanes = build_router_lanes(_spec(model_dir), None, None)
        try:
            local = asyncio.run(run(lanes, "l"))
        finally:
            lanes.shutdown()
            torch.set_num_threads(threads)
    remote = asyncio.run(run(client, "r"))
    assert remote == local
    assert all(n == 1 for _, _, n in remote["full", False])        # final-only: one frame per request
    assert all(n > 1 for _, _, n in remote["full", True])


def test_request_errors_keep_their_type_and_the_engine_keeps_serving(host):
    client = RemoteEngineClient(_RouterHandle(host))

    async def run():
        errors = []
        for prompt, precision in (([], "full"), ([5, 6], "int4"), ([10 ** 6], "full")):
            with pytest.raises(RequestRejectedError) as info:
                await _collect(client, f"bad{len(errors)}", prompt, greedy(4), precision)
            errors.append(info.value)
        ok = await _collect(client, "after", [5, 6, 7], greedy(4))
        return errors, ok

    errors, ok = asyncio.run(run())
    assert [e.param for e in errors] == ["prompt", "precision", "prompt"]
    assert ok[-1].finished and len(ok[-1].outputs[0].token_ids) == 4


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(host):
    client = RemoteEngineClient(_RouterHandle(host))

    async def run():
        stream = client.generate("long", [5, 6, 7, 8], greedy(400))
        await stream.__anext__()
        busy = host.kv_usage()
        await stream.aclose()
        for _ in range(100):
            if (usage := host.kv_usage())["requests"] == 0:
                return busy, usage
            await asyncio.sleep(0.02)
        return busy, host.kv_usage()

    busy, after = asyncio.run(run())
    assert busy["requests"] == 1 and busy["used_blocks"] > 0
    assert after == {"used_blocks": 0, "free_blocks": busy["used_blocks"] + busy["free_blocks"], "requests": 0}


def test_metrics_reach_the_parent_in_order(host, metrics):
    client = RemoteEngineClient(_RouterHandle(host))

    def generated() -> float:
        text = metrics.exposition().decode()
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith("moe_generation_tokens_total"))

    time.sleep(3 * TICK_S)             # what earlier tests recorded has arrived
    before = generated()
    asyncio.run(_collect(client, "metered", [5, 6, 7], greedy(7)))
    asyncio.run(_collect(client, "metered8", [5, 6, 7], greedy(3), "int8"))
    deadline = time.monotonic() + 5
    while generated() < before + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert generated() == before + 10
    total = host.kv_usage()
    # The gauges: summed over both lanes, as in one process.
    assert f"moe_kv_blocks_total {float(total['used_blocks'] + total['free_blocks'])}" in metrics.exposition().decode()


def test_a_connection_without_the_token_is_closed_and_nothing_is_read(host):
    with socket.create_connection((host.address.host, host.address.port), timeout=10) as conn:
        conn.sendall(b"x" * 16 + encode(("gen", "evil", [1], None, "", "full", True)))
        assert conn.recv(100) == b""                # closed without an answer
    asyncio.run(_collect(RemoteEngineClient(_RouterHandle(host)), "still", [5, 6], greedy(2)))
    host.raise_if_down()


def test_a_dead_engine_fails_requests_in_flight_as_503_and_the_health_check(model_dir):
    host = EngineHost(_spec(model_dir), [], None, "127.0.0.1")
    client = RemoteEngineClient(_RouterHandle(host))

    async def run():
        stream = client.generate("doomed", [5, 6, 7, 8], greedy(400))
        await stream.__anext__()
        os.kill(host.address.pid, signal.SIGKILL)
        with pytest.raises(BackendUnavailableError):
            async for _ in stream:
                pass
        with pytest.raises(BackendUnavailableError):        # the next request: refused, not hung
            await asyncio.wait_for(_collect(client, "next", [5, 6], greedy(2)), 10)

    try:
        asyncio.run(run())
        host.proc.wait(10)
        with pytest.raises(RuntimeError, match="exited"):
            host.raise_if_down()
    finally:
        host.close()


def test_the_engine_process_exits_with_its_parent(model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from tests.unit.test_hosting import _spec
        from serve_app.hosting.host import EngineHost
        host = EngineHost(_spec({str(model_dir)!r}), [], None, "127.0.0.1")
        print(host.address.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)                          # running
        parent.kill()                              # SIGKILL: no chance to clean up
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"      # a zombie has exited (its parent reaps it)
    except FileNotFoundError:
        return False


def test_a_spec_that_cannot_load_raises_the_engine_traceback(tmp_path, model_dir):
    spec = _spec(model_dir)
    spec.model_dir = str(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="failed to start") as info:
        EngineHost(spec, [], None, "127.0.0.1", start_timeout_s=120)
    assert "missing" in str(info.value)


def test_the_control_pipe_calls_both_ways_and_fails_pending_calls_at_close():
    a_end, b_end = Pipe()
    a = Channel(a_end, {"double": lambda x: 2 * x}, name="a").start()
    b = Channel(b_end, {"boom": lambda: 1 / 0, "block": lambda: time.sleep(5)}, name="b").start()
    assert b.call("double", 21, timeout=5) == 42
    with pytest.raises(ZeroDivisionError):
        a.call("boom", timeout=5)
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_raises(lambda: a.call("block", timeout=10))))
    waiter.start()
    time.sleep(0.2)
    b.close()
    waiter.join(5)
    assert errors and isinstance(errors[0], ChannelClosedError)     # not the 5 s handler's answer
    with pytest.raises(ChannelClosedError):
        a.call("double", 1, timeout=1)


def _raises(fn):
    try:
        fn()
    except BaseException as exc:                   # noqa: BLE001
        return exc
    return None


def test_metrics_relay_checks_names_and_tags_where_recorded_and_keeps_order():
    relay, direct, relayed = MetricsRelay(), Metrics("prometheus"), Metrics("prometheus")
    for m in (relay, direct):
        m.set("moe_requests_running", 3)
        m.set("moe_requests_running", 1)
        m.inc("moe_prompt_tokens_total", 5)
        m.observe("moe_time_to_first_token_seconds", 0.02, tier="simple")
    with pytest.raises(ValueError):
        relay.observe("moe_time_to_first_token_seconds", 0.02)
    with pytest.raises(KeyError):
        relay.inc("no_such_metric")
    relayed.apply(relay.drain())
    assert relay.drain() == []
    strip = lambda text: [l for l in text.decode().splitlines() if not l.startswith("#") and "_created" not in l]  # noqa: E731
    assert strip(relayed.exposition()) == strip(direct.exposition())


def test_engine_host_config_fits_the_transport():
    assert AppConfig().resolved_engine_host() == "replica"
    assert AppConfig(engine_host="process").resolved_engine_host() == "process"
    assert AppConfig(expert_transport="serve", expert_shards=0, engine_host="process").resolved_engine_host() == "process"
    with pytest.raises(ValueError, match="engine_host 'process' needs expert_transport 'socket'"):
        AppConfig(expert_transport="serve", engine_host="process")
