"""Two Router replicas behind real Serve (issue 18): with prefix-affine routing every keystroke of an
editor session after its first is served from the prefix cache of the replica that holds it; with
Serve's power-of-two routing keystrokes land on the replica that has never seen the session. An
abort reaches the replica running the request."""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from serve_app.config import AppConfig
from serve_app.engine import SamplingParams
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

FILES = [f"def handler_{i}(request, state):\n    value = request.get('key_{i}')\n    if value is None:\n"
         f"        return state.default_{i}\n    total = sum(x * {i} for x in value)\n" for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("prefix-routing"), "mixtral", num_local_experts=4)


def deploy(model_dir, base_url, routing: str) -> None:
    from ray import serve

    from serve_app.deployments.app import build_app

    config = AppConfig(model=str(model_dir), expert_shards=0, served_model_name="tiny", num_routers=2,
                       router_routing=routing,
                       engine=dict(block_size=4, num_kv_blocks=512, max_num_batched_tokens=128))
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)


def typing_sessions(url: str) -> list[list[float]]:
    """Per session (one file), the cached share of each keystroke's prompt after the first."""
    shares = []
    with httpx.Client(timeout=60) as client:
        for text in FILES:
            session = []
            for end in range(60, 60 + 7 * 9, 9):                 # 7 keystrokes, 9 characters apart
                body = {"model": "tiny", "prompt": text[:end], "max_tokens": 2, "temperature": 0,
                        "precision": "int8"}   # one lane: the lanes keep separate caches
                usage = client.post(f"{url}/v1/completions", json=body).raise_for_status().json()["usage"]
                session.append(usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"])
            shares.append(session[1:])
    return shares


def test_keystrokes_follow_their_prefix_and_power_of_two_scatters_them(ray_cluster, base_url, model_dir):
    from ray import serve

    results = {}
    for routing in ("prefix", "power_of_two"):
        deploy(model_dir, base_url, routing)
        try:
            results[routing] = typing_sessions(base_url)
        finally:
            serve.delete("moe-serve")
    print()
    for routing, shares in results.items():
        flat = [s for session in shares for s in session]
        print(f"{routing}: mean cached share {sum(flat) / len(flat):.3f}, "
              f"cold keystrokes {sum(s < 0.5 for s in flat)} of {len(flat)}")
    # Affinity: every keystroke after a session's first finds most of its prompt cached.
    assert all(s >= 0.5 for session in results["prefix"] for s in session), results["prefix"]
    # Power of two: a session stays on one replica for 6 keystrokes with probability 1/32, so some
    # keystroke of the 6 sessions is cold on the other replica (all staying: 2^-30).
    assert any(s < 0.5 for session in results["power_of_two"] for s in session), results["power_of_two"]


def test_abort_reaches_the_replica_running_the_request(ray_cluster, base_url, model_dir):
    from ray import serve

    deploy(model_dir, base_url, "prefix")
    try:
        router = serve.get_deployment_handle("Router", "moe-serve")
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        for trial in range(6):
            request_id = f"abort-{trial}-{uuid.uuid4().hex[:6]}"
            stream = router.options(stream=True).generate.remote(
                request_id, list(range(5, 25 + trial)), params, "", "full", True)
            first = next(iter(stream))
            assert not first.finished
            started = time.monotonic()
            router.abort.remote(request_id).result(timeout_s=30)
            last = first
            for last in stream:
                pass
            reason = last.outputs[0].finish_reason
            assert reason == "abort", (trial, reason, len(last.outputs[0].token_ids))
            assert time.monotonic() - started < 10
    finally:
        serve.delete("moe-serve")
