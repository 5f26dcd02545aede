"""The HTTP API over a real tiny engine: results equal the engine's, prompts are built the model's
way (FIM, chat template), streams add up to the whole answer, and the openai SDK can talk to it."""
from __future__ import annotations

import logging

import httpx2
import openai
import pytest

from serve_app import LLM, SamplingParams
from tests.unit.test_api_support import (API_KEY, MODEL, anyio_backend, api_model_dir, engine_is_idle,  # noqa: F401
                                         client, engine, http_client, make_app, sse_events, start_engine, tokenizer)

pytestmark = pytest.mark.anyio

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def llm(api_model_dir):
    # The offline API over its own engine: the oracle for what HTTP must return.
    return LLM(api_model_dir, block_size=4, num_kv_blocks=256)


def greedy_text(llm, prompt, max_tokens: int) -> tuple[str, list[int]]:
    out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))[0].outputs[0]
    return out.text, out.token_ids


async def test_greedy_completion_equals_offline_llm_output(client, llm):
    expected_text, expected_ids = greedy_text(llm, PROMPT, 8)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == expected_text
    assert body["usage"]["completion_tokens"] == len(expected_ids)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(expected_ids)
    assert r.headers["x-request-id"] == body["id"]


async def test_token_id_prompt_gives_same_text_as_the_string_prompt(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    common = {"max_tokens": 6, "temperature": 0}
    by_text = (await client.post("/v1/completions", json={"prompt": PROMPT, **common})).json()
    by_ids = (await client.post("/v1/completions", json={"prompt": ids, **common})).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


async def test_suffix_and_fim_endpoint_both_run_the_fim_prompt(client, llm, tokenizer):
    prefix, suffix = "def area(w, h):\n    return ", "\n\nprint(area(2, 3))\n"
    fim_ids = tokenizer.build_fim_prompt_ids(prefix, suffix)
    assert fim_ids[0] == tokenizer.token_to_id("<fim_prefix>")
    expected, _ = greedy_text(llm, fim_ids, 6)
    via_suffix = (await client.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 6,
                                                             "temperature": 0})).json()
    via_fim = (await client.post("/v1/fim/completions", json={"prefix": prefix, "suffix": suffix, "max_tokens": 6,
                                                              "temperature": 0})).json()
    assert via_suffix["choices"][0]["text"] == expected
    assert via_suffix["usage"]["prompt_tokens"] == len(fim_ids)
    assert set(via_fim) == {"id", "completion", "finish_reason", "usage", "tier", "precision"}
    assert via_fim["completion"] == expected and via_fim["usage"]["prompt_tokens"] == len(fim_ids)


async def test_penalties_reach_the_engine_on_every_endpoint(client, llm, tokenizer):
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 0.5}
    plain, _ = greedy_text(llm, PROMPT, 24)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, **penalties))[0].outputs[0]
    assert out.text != plain                                  # guard: these penalties change the answer
    common = {"max_tokens": 24, "temperature": 0, **penalties}
    r = await client.post("/v1/completions", json={"prompt": PROMPT, **common})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == out.text
    prefix, suffix = "def area(w, h):\n    return ", "\n"
    fim = llm.generate(tokenizer.build_fim_prompt_ids(prefix, suffix),
                       SamplingParams(max_tokens=24, temperature=0.0, **penalties))[0].outputs[0].text
    r = await client.post("/v1/fim/completions", json={"prefix": prefix, "suffix": suffix, **common})
    assert r.status_code == 200 and r.json()["completion"] == fim


async def test_checkpoint_penalty_defaults_fill_only_what_the_request_leaves_out(engine, tokenizer, llm, tmp_path):
    from serve_app.api.settings import GenerationDefaults

    (tmp_path / "generation_config.json").write_text('{"frequency_penalty": 1.5, "presence_penalty": 0.5}')
    defaults = GenerationDefaults.from_model_dir(tmp_path)
    assert (defaults.frequency_penalty, defaults.presence_penalty) == (1.5, 0.5)
    penalized = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, frequency_penalty=1.5,
                                                    presence_penalty=0.5))[0].outputs[0].text
    plain, _ = greedy_text(llm, PROMPT, 24)
    async with http_client(make_app(engine, tokenizer, generation_defaults=defaults)) as c:
        implicit = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0})).json()
        explicit = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                          "frequency_penalty": 0, "presence_penalty": 0})).json()
    assert implicit["choices"][0]["text"] == penalized != plain
    assert explicit["choices"][0]["text"] == plain


async def test_a_checkpoints_structural_skipping_penalty_applies_only_with_its_default_penalty(
        engine, tokenizer, llm, tmp_path):
    from serve_app.api.settings import GenerationDefaults

    (tmp_path / "generation_config.json").write_text('{"frequency_penalty": 2.0, "penalty_skips_structural": true}')
    defaults = GenerationDefaults.from_model_dir(tmp_path)
    assert defaults.penalty_skips_structural

    def offline(**penalties) -> str:
        return llm.generate(PROMPT, SamplingParams(max_tokens=32, temperature=0.0, **penalties))[0].outputs[0].text
    skipping = offline(frequency_penalty=2.0, penalty_skips_structural=True)
    async with http_client(make_app(engine, tokenizer, generation_defaults=defaults)) as c:
        implicit = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0})).json()
        explicit = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                                                          "frequency_penalty": 2.0})).json()
        zero = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                                                      "presence_penalty": 0})).json()
    assert implicit["choices"][0]["text"] == skipping
    assert zero["choices"][0]["text"] == skipping      # a client's 0 turns a penalty off, not the skipping
    assert explicit["choices"][0]["text"] == offline(frequency_penalty=2.0)    # a client's penalty is OpenAI's


def test_generation_defaults_are_checked_when_the_model_loads(tmp_path):
    from serve_app.api.settings import GenerationDefaults

    assert GenerationDefaults.from_model_dir(tmp_path) == GenerationDefaults()      # no file: neutral
    (tmp_path / "generation_config.json").write_text('{"frequency_penalty": 3, "temperature": 0.7}')
    with pytest.raises(ValueError, match="frequency_penalty"):
        GenerationDefaults.from_model_dir(tmp_path)


async def test_chat_uses_the_chat_template_and_returns_an_assistant_message(client, llm, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "add two numbers"}]
    prompt_ids = tokenizer.build_chat_prompt_ids(messages)
    expected, _ = greedy_text(llm, prompt_ids, 6)
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                        "max_completion_tokens": 6, "temperature": 0})
    body = r.json()
    assert r.status_code == 200, r.text
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_developer_role_renders_as_system(client):
    def body(role):
        return {"messages": [{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
    as_developer = (await client.post("/v1/chat/completions", json=body("developer"))).json()
    as_system = (await client.post("/v1/chat/completions", json=body("system"))).json()
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]
    assert as_developer["usage"]["prompt_tokens"] == as_system["usage"]["prompt_tokens"]


def _completion_text(body):
    return body["choices"][0]["text"]


def _chat_text(body):
    choice = body["choices"][0]
    return choice["delta"]["content"] if "delta" in choice else choice["message"]["content"]


def _fim_text(body):
    return body["completion"]


@pytest.mark.parametrize("path, body, text_of", [
    ("/v1/completions", {"prompt": PROMPT}, _completion_text),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, _chat_text),
    ("/v1/fim/completions", {"prefix": "x = ", "suffix": "\n"}, _fim_text),
])
async def test_stream_chunks_concatenate_to_the_non_streamed_text_and_end_with_done(client, path, body, text_of):
    request = {**body, "max_tokens": 10, "temperature": 0}
    whole = (await client.post(path, json=request)).json()
    r = await client.post(path, json={**request, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [e for e in events[:-1] if e.get("choices", [None])]
    assert "".join(text_of(c) for c in chunks) == text_of(whole)
    finish = [c.get("finish_reason") or c.get("choices", [{}])[0].get("finish_reason") for c in chunks]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])


async def test_stream_include_usage_sends_a_final_usage_chunk(client):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-2])


async def test_chat_stream_opens_with_the_assistant_role(client):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                        "max_tokens": 3, "temperature": 0, "stream": True})
    chunks = sse_events(r.text)[:-1]
    firsts = {}
    for c in chunks:
        choice = c["choices"][0]
        firsts.setdefault(choice["index"], choice["delta"])
    assert set(firsts) == {0, 1} and all(d["role"] == "assistant" for d in firsts.values())


async def test_n_returns_n_choices_and_counts_all_their_tokens(client):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "n": 3, "max_tokens": 4, "temperature": 0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) == 1           # greedy: identical candidates
    assert body["usage"]["completion_tokens"] == 3 * 4


async def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    text = (await client.post("/v1/completions", json=request)).json()["choices"][0]["text"]
    at = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalnum())
    stop = text[at:at + 2]
    cut = (await client.post("/v1/completions", json={**request, "stop": [stop]})).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"


async def test_same_seed_gives_same_sampled_text(client):
    request = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 1234, "n": 2}
    first = (await client.post("/v1/completions", json=request)).json()["choices"]
    second = (await client.post("/v1/completions", json=request)).json()["choices"]
    assert [c["text"] for c in first] == [c["text"] for c in second]


async def test_completion_logprobs_have_openai_legacy_shape(client):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]


async def test_chat_logprobs_list_content_with_top_alternatives(client):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 3, "temperature": 0, "logprobs": True,
                                                        "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])      # greedy picks the best


async def test_explicit_precision_the_backend_lacks_is_a_400_and_auto_falls_back_to_full(client):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "precision": "int8"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "precision"
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["precision"] == "full"
    assert r.headers["x-moe-precision"] == "full" and r.headers["x-moe-tier"] == r.json()["tier"]


async def test_models_lists_the_served_model_and_health_is_ok(client):
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    health = await client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_prompts_and_completions_never_reach_the_logs(client, caplog):
    secret = "SECRET_CUSTOMER_CODE_42"
    with caplog.at_level(logging.DEBUG):
        await client.post("/v1/completions", json={"prompt": secret, "max_tokens": 3})
        await client.post("/v1/completions", json={"prompt": secret, "temperature": 9})       # a 400
        await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}],
                                                        "max_tokens": 3, "stream": True})
    assert not any(secret in rec.getMessage() for rec in caplog.records)


async def test_requests_leave_no_blocks_behind(client, engine):
    await client.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "max_tokens": 3, "stream": True})
    await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert engine_is_idle(engine)


async def test_official_openai_client_completes_streams_and_sees_errors(engine, tokenizer):
    app = make_app(engine, tokenizer, api_keys=(API_KEY,))
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test/v1") as http:
        sdk = openai.AsyncOpenAI(api_key=API_KEY, base_url="http://test/v1", http_client=http, max_retries=0)
        completion = await sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
        assert completion.usage.completion_tokens == 4 and isinstance(completion.choices[0].text, str)
        stream = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, stream=True)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        whole = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0)
        assert streamed == whole.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.completions.create(model=MODEL, prompt=PROMPT, temperature=7)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError):
            await sdk.completions.create(model="gpt-4", prompt=PROMPT)
        wrong_key = openai.AsyncOpenAI(api_key="sk-wrong", base_url="http://test/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong_key.models.list()


def test_the_api_package_does_not_import_ray():
    # api/ is the HTTP layer only; deployments/ is the one place that knows Ray (STYLE habit 1).
    import subprocess
    import sys

    code = "import sys, serve_app.api; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
