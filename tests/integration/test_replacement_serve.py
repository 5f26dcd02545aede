"""Experts re-placed on the running app (issue 18): the Router moves experts between its ExpertShard
replicas while full-precision requests stream through them; every request answers 200 with the text
it had before, and each shard ends up holding what the new placement gives it. Then the Router's
own EPLB (`rebalance`, replicating the hottest expert into a spare slot) under the same traffic."""
from __future__ import annotations

import threading

import httpx
import pytest

from serve_app.config import AppConfig
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n", "for i in range(10):\n", "import os\n"]


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("replace-serve"), "mixtral", num_local_experts=4)
    config = AppConfig(model=str(model_dir), expert_shards=2, served_model_name="tiny", quantized_precisions=(),
                       dtype="float32", engine=dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64))
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)
    yield base_url
    serve.delete("moe-serve")


def complete(client: httpx.Client, url: str, prompt: str) -> tuple[int, str]:
    got = client.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                     "temperature": 0, "precision": "full"})
    return got.status_code, got.json()["choices"][0]["text"] if got.status_code == 200 else got.text


def under_traffic(url: str, action) -> tuple[list[tuple[str, int, str]], object]:
    """Runs `action()` while 3 users send PROMPTS; (every answer as (prompt, status, text), its result)."""
    stop, answers = threading.Event(), []

    def user(k: int):
        with httpx.Client(timeout=60) as client:
            i = k
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                answers.append((prompt, *complete(client, url, prompt)))
                i += 1

    users = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(3)]
    for u in users:
        u.start()
    try:
        while len(answers) < 6:
            threading.Event().wait(0.05)
        result = action()
        sent = len(answers)
        while len(answers) < sent + 6:                      # and requests after the switch
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for u in users:
            u.join(timeout=60)
    return answers, result


def test_experts_move_between_shards_under_traffic_and_answers_stay_the_same(app):
    from ray import serve

    url = app
    with httpx.Client(timeout=60) as client:
        want = {p: complete(client, url, p)[1] for p in PROMPTS}
    router = serve.get_deployment_handle("Router", "moe-serve")
    # Round-robin had experts 0, 2 on shard 0 and 1, 3 on shard 1; swap two of them in every layer.
    layout = {"0": [0, 1], "1": [2, 3]}
    answers, report = under_traffic(url, lambda: router.apply_placement.remote(layout).result(timeout_s=120))
    assert sum(report["read"]) > 0 and sum(report["dropped"]) == sum(report["read"])
    assert all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    assert all(text == want[p] for p, _, text in answers)          # float32: exactly the same text
    info = [serve.get_deployment_handle(f"ExpertShard{i}", "moe-serve").info.remote().result() for i in (0, 1)]
    assert {e for _, e in info[0]["experts"]} == {0, 1} and {e for _, e in info[1]["experts"]} == {2, 3}

    answers, result = under_traffic(url, lambda: router.rebalance.remote(spare_slots=1).result(timeout_s=120))
    assert all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    assert result["max_imbalance_after"] <= result["max_imbalance_before"] + 1e-9
    held = [serve.get_deployment_handle(f"ExpertShard{i}", "moe-serve").info.remote().result()["experts"]
            for i in (0, 1)]
    assert len(held[0]) + len(held[1]) > 8                        # a spare slot each: some expert twice
    print(f"\nre-placement: {len(answers)} requests under EPLB, all 200; max/mean shard load "
          f"{result['max_imbalance_before']:.3f} -> {result['max_imbalance_after']:.3f}")
