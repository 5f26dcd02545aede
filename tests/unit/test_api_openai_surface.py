"""The OpenAI completions surface clients expect: a batch of prompts, echo, logit_bias, best_of,
stream_options.include_usage; and vLLM's token-prompt dicts in `LLM.generate`. Each checked over a
real tiny engine against what single requests (or the offline LLM) return, and through the
official `openai` client where it has the parameter."""
from __future__ import annotations

import httpx2
import openai
import pytest

from serve_app import LLM, SamplingParams
from tests.unit.test_api_support import (API_KEY, MODEL, anyio_backend, api_model_dir, engine_is_idle,  # noqa: F401
                                         client, engine, http_client, make_app, sse_events, start_engine, tokenizer)

pytestmark = pytest.mark.anyio

PROMPTS = ["def add(a, b):", "import os\n", "class Point:"]
GREEDY = {"max_tokens": 5, "temperature": 0, "precision": "full"}


async def _complete(client, **body) -> dict:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_batch_returns_each_prompts_choices_at_prompt_times_n_plus_candidate(client, engine):
    singles = [await _complete(client, prompt=p, n=2, seed=7, temperature=1.0, max_tokens=5, precision="full")
               for p in PROMPTS]
    batch = await _complete(client, prompt=PROMPTS, n=2, seed=7, temperature=1.0, max_tokens=5, precision="full")
    assert batch["id"].startswith("cmpl-") and len(batch["choices"]) == 6
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    for i, single in enumerate(singles):
        for j in range(2):   # seeded: candidate j of prompt i is the single request's candidate j
            assert batch["choices"][2 * i + j]["text"] == single["choices"][j]["text"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert batch["usage"][key] == sum(s["usage"][key] for s in singles)
    assert engine_is_idle(engine)


async def test_a_batch_of_token_id_prompts_equals_the_text_batch(client, tokenizer):
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS]
    by_text = await _complete(client, prompt=PROMPTS, **GREEDY)
    by_ids = await _complete(client, prompt=ids, **GREEDY)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]


async def test_a_streamed_batch_adds_up_to_the_whole_batch_and_sums_usage(client, engine):
    whole = await _complete(client, prompt=PROMPTS, **GREEDY)
    r = await client.post("/v1/completions", json={"prompt": PROMPTS, "stream": True,
                                                   "stream_options": {"include_usage": True}, **GREEDY})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    finishes = {}
    assert len({e["id"] for e in events[:-1]}) == 1 and events[0]["id"].startswith("cmpl-")   # one response id
    for event in events[:-2]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert [texts[i] for i in range(3)] == [c["text"] for c in whole["choices"]]
    assert sorted(finishes) == [0, 1, 2]
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert engine_is_idle(engine)


async def test_a_batch_whose_prompt_is_refused_runs_nothing(client, engine):
    r = await client.post("/v1/completions", json={"prompt": ["fine", "x" * 5000], **GREEDY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
    assert engine_is_idle(engine)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_batch_whose_prompt_the_engine_refuses_aborts_the_others(api_model_dir, tokenizer, stream):
    small = start_engine(api_model_dir, max_num_seqs=1, max_waiting_requests=1)
    try:
        async with http_client(make_app(small, tokenizer)) as c:
            r = await c.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 30, "temperature": 0,
                                                       "precision": "full", "stream": stream})
            assert r.status_code == 429 and r.headers["retry-after"], r.text
            assert r.json()["error"]["code"] == "engine_overloaded"
            assert engine_is_idle(small)
            ok = await c.post("/v1/completions", json={"prompt": PROMPTS[:1], **GREEDY})
            assert ok.status_code == 200
    finally:
        small.shutdown()


async def test_best_of_equal_to_n_generates_exactly_that_many(client):
    r = await _complete(client, prompt=PROMPTS[0], best_of=1, max_tokens=4, temperature=1.0, seed=2)
    assert len(r["choices"]) == 1 and r["usage"]["completion_tokens"] <= 4


async def test_echo_puts_the_prompt_before_each_choice_streamed_or_not(client):
    plain = await _complete(client, prompt=PROMPTS[0], **GREEDY)
    echoed = await _complete(client, prompt=PROMPTS[0], echo=True, **GREEDY)
    assert echoed["choices"][0]["text"] == PROMPTS[0] + plain["choices"][0]["text"]
    r = await client.post("/v1/completions", json={"prompt": PROMPTS[0], "echo": True, "stream": True, **GREEDY})
    streamed = "".join(c["text"] for e in sse_events(r.text)[:-1] for c in e["choices"])
    assert streamed == echoed["choices"][0]["text"]


async def test_echo_of_token_ids_decodes_them(client, tokenizer):
    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    echoed = await _complete(client, prompt=ids, echo=True, **GREEDY)
    assert echoed["choices"][0]["text"].startswith(tokenizer.decode(ids))


async def test_logit_bias_forces_and_bans_tokens(client, tokenizer):
    forced_id = tokenizer.encode("x", add_special_tokens=False)[0]
    forced = await _complete(client, prompt=PROMPTS[0], logit_bias={str(forced_id): 100}, **GREEDY)
    assert forced["choices"][0]["text"] == tokenizer.decode([forced_id] * 5)
    plain = await _complete(client, prompt=PROMPTS[0], logprobs=0, **GREEDY)
    first = tokenizer.encode(plain["choices"][0]["logprobs"]["tokens"][0], add_special_tokens=False)
    banned = await _complete(client, prompt=PROMPTS[0], logprobs=0, logit_bias={str(first[0]): -100}, **GREEDY)
    assert banned["choices"][0]["logprobs"]["tokens"][0] != plain["choices"][0]["logprobs"]["tokens"][0]
    assert forced["choices"][0]["text"] != plain["choices"][0]["text"]


async def test_best_of_returns_the_n_candidates_with_the_highest_cumulative_logprob(client):
    body = {"prompt": PROMPTS[2], "temperature": 1.0, "seed": 11, "max_tokens": 6, "precision": "full"}
    all_three = await _complete(client, n=3, logprobs=0, **body)
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in all_three["choices"]]
    best = await _complete(client, n=1, best_of=3, **body)
    assert len(best["choices"]) == 1 and best["choices"][0]["index"] == 0
    assert best["choices"][0]["text"] == all_three["choices"][max(range(3), key=sums.__getitem__)]["text"]
    assert best["choices"][0]["logprobs"] is None                      # only asked for ranking
    assert best["usage"]["completion_tokens"] == all_three["usage"]["completion_tokens"]   # all 3 generated
    two = await _complete(client, n=2, best_of=3, **body)
    order = sorted(range(3), key=sums.__getitem__, reverse=True)[:2]
    assert [c["text"] for c in two["choices"]] == [all_three["choices"][i]["text"] for i in order]


async def test_the_official_openai_client_sends_batches_echo_bias_best_of_and_usage(engine, tokenizer):
    app = make_app(engine, tokenizer, api_keys=(API_KEY,))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test/v1") as http:
        sdk = openai.AsyncOpenAI(api_key=API_KEY, base_url="http://test/v1", http_client=http, max_retries=0)
        batch = await sdk.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=3, temperature=0)
        assert [c.index for c in batch.choices] == [0, 1, 2]
        echoed = await sdk.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=3, temperature=0)
        assert echoed.choices[0].text.startswith(PROMPTS[0])
        forced_id = tokenizer.encode("x", add_special_tokens=False)[0]
        biased = await sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0,
                                              logit_bias={str(forced_id): 100})
        assert biased.choices[0].text == tokenizer.decode([forced_id] * 2)
        best = await sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, best_of=2, n=1, seed=1)
        assert len(best.choices) == 1
        stream = await sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.completions.create(model=MODEL, prompt=PROMPTS[0], best_of=1, n=2)
        assert bad.value.param == "best_of"
    assert engine_is_idle(engine)


def test_llm_generate_takes_vllm_token_prompt_dicts(api_model_dir, tokenizer):
    llm = LLM(api_model_dir, block_size=4, num_kv_blocks=64)
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=True)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    by_dict = llm.generate({"prompt_token_ids": ids}, params)
    by_list = llm.generate(ids, params)
    both = llm.generate([{"prompt_token_ids": ids}, {"prompt": PROMPTS[0]}], params)
    assert len(by_dict) == 1 and by_dict[0].outputs[0].token_ids == by_list[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in both] == [by_list[0].outputs[0].token_ids] * 2
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {}}, params)
