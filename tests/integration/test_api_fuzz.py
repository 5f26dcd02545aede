"""Schema-driven fuzzing of the HTTP API (issue 17): requests generated from the API's own request
models (tests/helpers/fuzz.py) against `moe-serve --embedded` over real HTTP, and a smaller run
through the Ray Serve app. Every response is 2xx or an OpenAI-shaped 4xx, never a 5xx; after the
run the server still serves, and every KV block is free again.

Deterministic in CI (derandomized); MOE_FUZZ_EXAMPLES and MOE_FUZZ_SEED explore further:
    MOE_FUZZ_EXAMPLES=20000 MOE_FUZZ_SEED=7 pytest tests/integration/test_api_fuzz.py
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import httpx2
import pytest
from hypothesis import HealthCheck, given, seed, settings

from tests.helpers import servers
from tests.helpers.engines import build_model_dir
from tests.helpers.fuzz import FuzzRequest, check_response, requests
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("MOE_FUZZ_EXAMPLES", "2000"))
# A short context bounds what one valid request can cost (chat's default max_tokens is what the
# context leaves), so thousands of examples fit in CI; every code path is the same.
ENGINE = {"max_model_len": 96, "block_size": 4, "num_kv_blocks": 512}
SEED = int(os.environ.get("MOE_FUZZ_SEED", "0"))


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=SEED == 0,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def embedded_url(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("fuzz-model"), "mixtral")
    run_dir = tmp_path_factory.mktemp("fuzz-server")
    config = run_dir / "config.json"
    config.write_text(json.dumps({"engine": ENGINE}))
    with servers.embedded_server(run_dir / "server.log", "--model", str(model_dir), "--config", str(config),
                                 timeout_s=120) as url:
        yield url


def send(client: httpx2.Client, req: FuzzRequest) -> httpx2.Response:
    headers = {"content-type": req.content_type} if req.content_type else {}
    return client.request(req.method, req.path, content=req.content or None, headers=headers)


def gauge(metrics: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M)]
    return sum(values)


def wait_until(busy: Callable[[], float], timeout_s: float = 30.0) -> float:
    """Poll until busy() is 0 (gauges and counters trail the engine's last step by a moment)."""
    deadline = time.monotonic() + timeout_s
    while (value := busy()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def embedded_busy(client: httpx2.Client) -> float:
    metrics = client.get("/metrics").text
    return gauge(metrics, "moe_requests_running") + gauge(metrics, "moe_kv_blocks_used")


def run_fuzz(url: str, examples: int, busy: Callable[[httpx2.Client], float]) -> int:
    seen = {"count": 0}
    with httpx2.Client(base_url=url, timeout=60) as client:
        @seed(SEED)
        @fuzz_settings(examples)
        @given(requests)
        def one(req: FuzzRequest) -> None:
            seen["count"] += 1
            started = time.perf_counter()
            r = send(client, req)
            seen["slowest"] = max(seen.get("slowest", (0.0, None)), (time.perf_counter() - started, repr(req)))
            check_response(r.status_code, r.headers.get("content-type", ""), r.content, req.path)

        one()
        ok = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2})
        assert ok.status_code == 200, ok.text                   # still serving
        assert wait_until(lambda: busy(client)) == 0           # and nothing left behind
    print(f"{seen['count']} requests; slowest {seen['slowest'][0]:.2f} s: {seen['slowest'][1][:200]}")
    return seen["count"]


def test_fuzzed_requests_never_get_a_5xx_from_the_embedded_server(embedded_url):
    assert run_fuzz(embedded_url, EXAMPLES, embedded_busy) >= EXAMPLES * 0.9


@pytest.fixture(scope="module")
def ray_app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.config import AppConfig
    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("fuzz-serve"), "mixtral", num_local_experts=4)
    config = AppConfig(model=str(model_dir), expert_shards=2, served_model_name="tiny-moe", engine=ENGINE)
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)
    yield serve.get_deployment_handle("Router", app_name="moe-serve")
    serve.delete("moe-serve")


def test_fuzzed_requests_never_get_a_5xx_through_ray(ray_app, base_url):
    def busy(_client) -> float:
        kv = ray_app.kv_usage.remote().result(timeout_s=30)
        return kv["used_blocks"] + kv["requests"]
    assert run_fuzz(base_url, max(50, EXAMPLES // 8), busy) >= 50
