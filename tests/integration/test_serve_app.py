"""The whole system on a real local Ray cluster: Ingress → Router → 4 ExpertShards, over real HTTP."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import pytest

from serve_app import LLM, SamplingParams
from serve_app.config import AppConfig
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):\n", "class Point:\n    def __init__(self", "import os\n", "for i in range(10):"]
ENGINE = dict(block_size=4, num_kv_blocks=1024, max_num_batched_tokens=128, long_prefill_chunk=64)


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("serve"), "mixtral", num_local_experts=8)
    config = AppConfig(model=str(model_dir), expert_shards=4, engine=ENGINE, served_model_name="tiny")
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    wait_for_health(base_url)
    yield SimpleNamespace(model_dir=model_dir, config=config, url=base_url,
                          router=serve.get_deployment_handle("Router", app_name="moe-serve"))
    serve.delete("moe-serve")


@pytest.fixture(scope="module")
def offline(app):
    """The single-process reference: same checkpoint, all experts local."""
    return LLM(app.model_dir, **ENGINE)


def _complete(url: str, prompt: str, **fields) -> dict:
    # precision "full": the single-process reference runs full-precision experts (auto would let
    # the tier classifier pick the INT4/INT8 fast lane for short completions).
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "precision": "full", **fields}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_greedy_completions_over_http_equal_single_process_output(app, offline):
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0))
    for prompt, ref in zip(PROMPTS, expected):
        got = _complete(app.url, prompt)
        assert got["choices"][0]["text"] == ref.outputs[0].text
        assert got["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)


def test_llama_vim_infill_through_ray_equals_single_process_fim(app, offline):
    """llama.cpp's /infill, as llama.vim sends it, over the Ray app and its shards (precision full)."""
    from serve_app.tokenizer import CodeTokenizer

    prefix, line, suffix = "def add(a, b):\n", "    return", "\n\nprint(add(1, 2))\n"
    body = {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": [], "prompt": line,
            "n_predict": 12, "n_indent": 0, "top_k": 40, "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"],
            "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "temperature": 0, "precision": "full", "response_fields": ["content", "timings/predicted_n"]}
    resp = httpx.post(f"{app.url}/infill", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.text.startswith('{"content":"')                    # compact, as llama.vim parses it
    ids = CodeTokenizer.from_dir(app.model_dir).build_fim_prompt_ids(prefix + line, suffix)
    ref = offline.generate([ids], SamplingParams(max_tokens=12, temperature=0, top_k=40, top_p=0.9))[0]
    assert resp.json() == {"content": ref.outputs[0].text, "timings/predicted_n": len(ref.outputs[0].token_ids)}


def test_each_shard_loaded_only_its_own_experts(app):
    infos = app.router.health.remote().result(timeout_s=30)
    assert [i["shard"] for i in infos] == [0, 1, 2, 3]
    for info in infos:
        assert {e for _, e in info["experts"]} == {info["shard"], info["shard"] + 4}
        assert info["keys_read"] == 3 * len(info["experts"])       # w1, w3, w2 of its experts only


def test_official_openai_client_works_unchanged(app, offline):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    full = {"precision": "full"}
    done = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=full)
    ref = offline.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert done.choices[0].text == ref
    fim = client.completions.create(model="tiny", prompt="def f(x):\n    ", suffix="\n    return y\n",
                                    max_tokens=8, temperature=0)
    assert fim.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True, extra_body=full)]
    assert "".join(pieces) == ref


async def _stream(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True, "precision": "full"}
    text, done = [], False
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    assert done
    return "".join(text)


def test_32_concurrent_streams_all_finish_with_correct_text(app, offline):
    prompts = [PROMPTS[i % 4] + " " * (i // 4) for i in range(32)]
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]

    async def run_all():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(_stream(client, app.url, p) for p in prompts))

    assert asyncio.run(run_all()) == expected


def _kv(app) -> dict:
    return app.router.kv_usage.remote().result(timeout_s=30)


def test_client_disconnect_frees_its_kv_blocks(app):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{app.url}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert _kv(app)["used_blocks"] > 0
    deadline = time.monotonic() + 15
    while _kv(app)["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _kv(app) == {"used_blocks": 0, "free_blocks": ENGINE["num_kv_blocks"], "requests": 0}


BAD = [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, 400, "max_tokens"),
]


@pytest.mark.parametrize("fields, status, param", BAD)
def test_bad_input_gets_openai_error_and_server_keeps_serving(app, fields, status, param):
    body = {"model": "tiny", "max_tokens": 4, **fields}
    resp = httpx.post(f"{app.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    assert _complete(app.url, "def ok():", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_malformed_json_and_unknown_route(app):
    resp = httpx.post(f"{app.url}/v1/completions", content=b"{not json", timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "error" in resp.json()
    assert httpx.get(f"{app.url}/v1/nothing", timeout=30).status_code == 404


def test_killing_a_shard_fails_requests_cleanly_and_service_resumes(app, offline):
    """Full precision, so the requests cross the shards (the classifier would put them on the
    router's INT8 lane); every request is in flight when the shard dies. Each either gets a 503
    (or 429) with Retry-After or completes with exactly the single-process text: a shard restart never
    corrupts an answer. (A 429 with Retry-After is an answer too: while the step waits for the
    replacement shard, requests queue past the queue-delay limit.)"""
    import ray

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ExpertShard2" in a["name"] and "SERVE_REPLICA" in a["name"])
    handle = ray.get_actor(victim["name"], namespace=victim["namespace"])
    # 64 tokens: long enough that every request is still running when the shard dies (with
    # speculative decoding a full-precision request takes several tokens per step).
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0))]

    def routers() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::moe-serve#Router#")}
    routers_before = routers()

    async def traffic():
        async with httpx.AsyncClient(timeout=60) as client:
            sent = []

            async def one(i):
                started = time.monotonic()
                sent.append(i)
                resp = await client.post(f"{app.url}/v1/completions", json={
                    "model": "tiny", "prompt": PROMPTS[i % 4], "max_tokens": 64, "temperature": 0,
                    "precision": "full"})
                return i, resp, started, time.monotonic()
            tasks = [asyncio.create_task(one(i)) for i in range(8)]
            while len(sent) < len(tasks):          # every request on its way (a loaded machine is slow)
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            ray.kill(handle, no_restart=False)
            return killed_at, await asyncio.gather(*tasks)

    killed_at, results = asyncio.run(traffic())
    for i, resp, started, ended in results:
        assert started < killed_at < ended                         # in flight at the kill
        assert ended - started < 45                                # nobody hangs past the dispatch timeout
        # 429: the step stalled on the dead shard past the queue-delay limit while it waited
        assert resp.status_code in (200, 429, 503), resp.text
        if resp.status_code != 200:
            assert resp.headers.get("retry-after")
        else:
            assert resp.headers["x-moe-precision"] == "full"
            assert resp.json()["choices"][0]["text"] == expected[i % 4]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        resp = httpx.post(f"{app.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                          timeout=30)
        if resp.status_code == 200:
            break
        time.sleep(1)
    assert resp.status_code == 200
    wait_for_health(app.url, timeout_s=60)
    # The data plane found the restarted shard by itself: the Router replica is the same one.
    assert routers() == routers_before and routers_before
