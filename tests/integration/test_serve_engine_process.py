"""The other hosting: the Router's engine in a process of its own, reached by the Ingress over its
connection (`engine_host: process`, serve_app/hosting). The other Ray tests run the default (the
engine inside the replica); both must give the single-process output. (This module runs after
test_prometheus.py: after the chaos soak, with this hosting, Prometheus found the node's metrics
export down — not understood yet, see docs/benchmarks.md.)"""
from __future__ import annotations

import json

import httpx
import pytest

from serve_app import LLM, SamplingParams
from serve_app.config import AppConfig
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

ENGINE = dict(block_size=4, num_kv_blocks=512, max_num_batched_tokens=128, long_prefill_chunk=64)
PROMPTS = ["def add(a, b):\n", "import os\n", "for i in range(10):"]


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("engine-process"), "mixtral", num_local_experts=4)
    config = AppConfig(model=str(model_dir), expert_shards=2, engine_host="process", engine=ENGINE,
                       served_model_name="tiny")
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)
    yield model_dir, base_url, serve.get_deployment_handle("Router", app_name="moe-serve")
    serve.delete("moe-serve")


def test_engine_process_over_its_connection_equals_single_process_output(app):
    model_dir, url, router = app
    expected = LLM(model_dir, **ENGINE).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    for prompt, ref in zip(PROMPTS, expected):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "precision": "full"}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == ref.outputs[0].text
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == ref.outputs[0].text
    address = router.engine_address.remote().result(timeout_s=30)
    assert address.port > 0 and len(address.token) == 16
    assert router.kv_usage.remote().result(timeout_s=30)["requests"] == 0
