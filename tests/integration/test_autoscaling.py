"""Serve autoscaling from AppConfig, for real (issue 18): under load the Router deployment grows to
its max_replicas, and shrinks back to min_replicas once the load is gone. Small numbers: a tiny
checkpoint, target 1 request in flight per replica, delays of seconds."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from serve_app.config import AppConfig
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

SCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
         "downscale_delay_s": 4, "look_back_period_s": 2}


def running_replicas(deployment: str) -> int:
    from ray import serve
    status = serve.status().applications["moe-serve"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"{what} within {timeout_s:g} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("autoscaling"), "mixtral", num_local_experts=4)
    config = AppConfig(model=str(model_dir), expert_shards=0, served_model_name="tiny", autoscaling={"router": SCALE},
                       engine=dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64))
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)
    yield base_url
    serve.delete("moe-serve")


def test_router_scales_up_under_load_and_back_down_after(app):
    url = app
    assert running_replicas("Router") == 1
    stop, statuses = threading.Event(), []

    def editor():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                body = {"model": "tiny", "prompt": "def f(x):\n", "max_tokens": 48, "temperature": 0}
                statuses.append(client.post(f"{url}/v1/completions", json=body).status_code)

    users = [threading.Thread(target=editor, daemon=True) for _ in range(6)]
    for user in users:
        user.start()
    try:
        up = wait_until(lambda: running_replicas("Router") == 2, 90, "a second Router replica")
        sent_at_two = len(statuses)
        time.sleep(3)                                  # both replicas serve the load
    finally:
        stop.set()
        for user in users:
            user.join(timeout=60)
    assert len(statuses) > sent_at_two and set(statuses) == {200}, sorted(set(statuses))
    down = wait_until(lambda: running_replicas("Router") == 1, 90, "back to one Router replica")
    print(f"\nRouter: 1 -> 2 replicas {up:.1f} s into the load, back to 1 {down:.1f} s after it "
          f"({len(statuses)} requests, all 200)")
    got = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=60)
    assert got.status_code == 200, got.text
