"""Metrics: one definition list, recorded by the engine observer and the HTTP middleware."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.config import AppConfig
from serve_app.embedded import build_embedded_app
from serve_app.metrics import DEFINITIONS, LATENCY_BUCKETS, Metrics
from tests.helpers.engines import build_model_dir


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_every_definition_is_exposed_under_its_name():
    text = Metrics("prometheus").exposition().decode()
    for d in DEFINITIONS:
        assert f"# HELP {d.name} " in text and f"# TYPE {d.name} {d.kind}" in text


def test_latency_buckets_are_fine_between_5_and_200_ms():
    inside = [b for b in LATENCY_BUCKETS if 0.005 <= b <= 0.2]
    assert len(inside) >= 15 and 0.05 in LATENCY_BUCKETS


def test_wrong_tags_are_refused():
    with pytest.raises(ValueError, match="takes tags"):
        Metrics("prometheus").inc("moe_requests_total", endpoint="/x")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("metrics"), "mixtral")
    app = build_embedded_app(AppConfig(model=str(model_dir), served_model_name="tiny",
                                       engine=dict(block_size=4, num_kv_blocks=256)))
    yield app
    app.state.engine.shutdown()


async def _traffic(app) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        prompt = "def add(a, b):\n    return a + b\n" * 3
        for _ in range(2):       # the second request hits the prefix cache
            resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                               "max_tokens": 5, "temperature": 0})
            assert resp.status_code == 200
        assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                            "temperature": -1})).status_code == 400
        return (await client.get("/metrics")).text


def test_embedded_metrics_count_requests_tokens_cache_hits_and_experts(app):
    import asyncio

    samples = _samples(asyncio.run(_traffic(app)))
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in samples["moe_requests_total"]}
    assert requests[("/v1/completions", "200")] == 2 and requests[("/v1/completions", "400")] == 1
    assert sum(s.value for s in samples["moe_generation_tokens_total"]) == 10
    assert sum(s.value for s in samples["moe_prefix_cache_hits_total"]) > 0
    ttft = [s for s in samples["moe_time_to_first_token_seconds_count"]]
    assert sum(s.value for s in ttft) == 2
    routed = sum(s.value for s in samples["moe_expert_tokens_total"])
    assert routed > 0 and routed % 2 == 0             # top-2: every token counted twice per MoE layer
    assert {s.labels["layer"] for s in samples["moe_expert_tokens_total"]} == {"0", "1"}
    latency = [s for s in samples["moe_request_latency_seconds_count"] if s.labels["endpoint"] == "/v1/completions"]
    assert sum(s.value for s in latency) == 3


def test_descriptions_are_ascii_because_ray_metrics_reject_anything_else():
    for d in DEFINITIONS:
        d.description.encode("ascii")


def test_lane_gauges_are_never_left_stale_when_two_lanes_step_at_once():
    """Issue 17, race 3: both lane threads wrote the summed gauges without a lock, so a lane could
    overwrite the other's newer totals with stale ones; if both then went idle, the gauges stayed
    wrong (KV blocks "in use" on an idle server). Forced interleaving: lane A is held inside its
    gauge update while lane B reports idle; A must not publish a total that misses B's update."""
    import threading

    from serve_app.engine.stats import StepStats
    from serve_app.metrics import EngineMetricsObserver, Metrics

    metrics = Metrics("prometheus")
    observer = EngineMetricsObserver(metrics)
    fast, full = observer.lane("fast"), observer.lane("full")
    full.on_step(StepStats(0.01, 1, 1, num_running=1, num_waiting=0, kv_blocks_used=7, kv_blocks_total=10,
                           prefix_queries=0, prefix_hits=0))
    b_done, a_inside = threading.Event(), threading.Event()
    real_set = metrics.set

    def slow_set(name, value, **tags):      # lane A, once: wait (bounded) for lane B to finish
        if threading.current_thread().name == "lane-a" and not a_inside.is_set():
            a_inside.set()
            b_done.wait(timeout=0.5)
        real_set(name, value, **tags)
    metrics.set = slow_set

    def lane_a():
        fast.on_step(StepStats(0.01, 1, 1, num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=10,
                               prefix_queries=0, prefix_hits=0))

    def lane_b():
        a_inside.wait(timeout=5)
        full.on_step(StepStats(0.01, 1, 1, num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=10,
                               prefix_queries=0, prefix_hits=0))
        b_done.set()

    threads = [threading.Thread(target=lane_a, name="lane-a"), threading.Thread(target=lane_b, name="lane-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    text = metrics.exposition().decode()
    assert "moe_kv_blocks_used 0.0" in text and "moe_requests_running 0.0" in text, text
    assert "moe_kv_blocks_total 20.0" in text
