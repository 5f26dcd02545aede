"""llama.cpp's /completion and /infill, with the bodies its clients send (llama.vim, llama.vscode,
the seed's local client), over the real engine and tiny model: same engine and tiers as the OpenAI
routes, llama.cpp's answer shape, compact JSON, the stop rules, and errors named by the client's field."""
from __future__ import annotations

import json
import re

import pytest

from serve_app.api.llamacpp_render import LlamaOptions, LlamaRun, indent_cut, pick
from serve_app.api.prepare import prepare_completion
from serve_app.api.protocol import CompletionRequest
from serve_app.engine import CompletionOutput, RequestOutput
from serve_app.engine.sequence import RequestTimes
from tests.unit.test_api_support import (anyio_backend, api_model_dir, client, engine, engine_is_idle,  # noqa: F401
                                         make_settings, sse_events, tokenizer, wait_until)

PREFIX = "def add(a, b):\n"
LINE = "    return"
SUFFIX = "\n\nprint(add(1, 2))\n"
# llama.vim's FIM request (autoload/llama.vim, llama#fim), field for field.
LLAMA_VIM_BODY = {
    "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
    "input_extra": [{"text": "import os\n", "time": 1733212345, "filename": "util.py"}],
    "prompt": LINE, "n_predict": 12, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
    "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1000,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                        "tokens_cached"],
}
# llama.vim's warm-up request (llama#fim_warm_up / ring buffer updates).
LLAMA_VIM_WARM_UP = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": [], "prompt": "",
                     "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
                     "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
# llama.vscode's FIM request (src/llama-server.ts): n_cmpl completions, read as a JSON array.
LLAMA_VSCODE_BODY = {"id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [],
                     "prompt": LINE, "n_predict": 8, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False,
                     "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
                     "t_max_predict_ms": 500}


@pytest.mark.anyio
async def test_the_seed_clients_completion_body_gets_the_same_text_as_v1_completions(client):
    body = {"prompt": "def add(a, b):", "n_predict": 10, "temperature": 0, "top_p": 1.0, "stop": ["\n\n"]}
    r = await client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    out = r.json()
    ref = await client.post("/v1/completions", json={"prompt": body["prompt"], "max_tokens": 10, "temperature": 0,
                                                     "stop": ["\n\n"]})
    assert out["content"] == ref.json()["choices"][0]["text"]
    assert out["stop"] is True and out["tokens_predicted"] == ref.json()["usage"]["completion_tokens"] <= 10
    assert out["tokens_evaluated"] == ref.json()["usage"]["prompt_tokens"]
    assert out["stop_type"] == {"length": "limit", "stop": out["stop_type"]}[ref.json()["choices"][0]["finish_reason"]]
    assert out["stop_type"] in ("limit", "eos", "word")
    assert out["generation_settings"]["n_ctx"] > 0 and out["generation_settings"]["n_predict"] == 10
    assert all(isinstance(out["timings"][k], (int, float)) for k in ("prompt_n", "prompt_ms", "predicted_n",
                                                                      "predicted_ms", "prompt_per_second"))
    assert "prompt" not in out                    # the user's text is not echoed back


@pytest.mark.anyio
async def test_llama_vim_infill_body_answers_compact_json_with_exactly_its_response_fields(client):
    r = await client.post("/infill", json=LLAMA_VIM_BODY)
    assert r.status_code == 200, r.text
    assert re.search(r'"content"\s*:"', r.text) and ": " not in r.text.replace(r.json()["content"], "")
    out = r.json()
    assert set(out) == set(LLAMA_VIM_BODY["response_fields"])
    assert isinstance(out["content"], str) and out["timings/predicted_n"] <= 12
    assert out["tokens_cached"] >= out["timings/prompt_n"]


@pytest.mark.anyio
async def test_infill_is_the_fim_completion_of_prefix_plus_prompt(client, tokenizer):
    """Same engine and prompt as /v1/completions with a suffix: prefix + the cursor line's text."""
    body = {**LLAMA_VIM_BODY, "input_extra": [], "temperature": 0, "n_indent": 0, "t_max_predict_ms": 0,
            "response_fields": None}
    out = (await client.post("/infill", json=body)).json()
    ref = (await client.post("/v1/completions", json={"prompt": PREFIX + LINE, "suffix": SUFFIX, "max_tokens": 12,
                                                      "temperature": 0, "top_k": 40, "top_p": 0.9})).json()
    assert out["content"] == ref["choices"][0]["text"]
    assert out["tokens_evaluated"] == ref["usage"]["prompt_tokens"] == len(tokenizer.build_fim_prompt_ids(
        PREFIX + LINE, SUFFIX))


@pytest.mark.anyio
async def test_input_extra_goes_into_the_prompt_and_is_dropped_first_when_it_does_not_fit(client, engine):
    base = {**LLAMA_VIM_BODY, "temperature": 0, "response_fields": None, "input_extra": []}
    plain = (await client.post("/infill", json=base)).json()
    extra = [{"filename": f"m{i}.py", "text": f"def helper_{i}(x):\n    return x * {i}\n"} for i in range(3)]
    with_extra = (await client.post("/infill", json={**base, "input_extra": extra})).json()
    assert with_extra["tokens_evaluated"] > plain["tokens_evaluated"] and not with_extra["truncated"]
    huge = [{"filename": "big.py", "text": "x = 1\n" * engine.core.max_model_len}, *extra]
    cut = (await client.post("/infill", json={**base, "input_extra": huge}))
    assert cut.status_code == 200, cut.text
    assert cut.json()["truncated"] is True and cut.json()["tokens_evaluated"] == with_extra["tokens_evaluated"]


@pytest.mark.anyio
async def test_llama_vscode_n_cmpl_gets_a_json_array_with_n_ctx(client):
    r = await client.post("/infill", json=LLAMA_VSCODE_BODY)
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and [x["index"] for x in results] == [0, 1, 2]
    assert all(isinstance(x["content"], str) and x["generation_settings"]["n_ctx"] > 0 for x in results)
    assert all(isinstance(x["timings"]["predicted_per_second"], (int, float)) for x in results)


@pytest.mark.anyio
async def test_llama_vim_warm_up_answers_nothing_and_leaves_the_engine_idle(client, engine):
    r = await client.post("/infill", json=LLAMA_VIM_WARM_UP)
    assert r.status_code == 200, r.text
    assert r.json() == {}                         # response_fields [""]: no field
    full = (await client.post("/infill", json={**LLAMA_VIM_WARM_UP, "response_fields": None})).json()
    assert full["content"] == "" and full["tokens_predicted"] == 0 and full["stop_type"] == "limit"
    assert await wait_until(lambda: engine_is_idle(engine))


@pytest.mark.anyio
async def test_streamed_completion_is_llama_cpp_events_without_done(client):
    body = {"prompt": "def add(a, b):", "n_predict": 8, "temperature": 0, "stream": True}
    r = await client.post("/completion", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert "[DONE]" not in events and all('"content":' in line for line in r.text.split("\n\n") if line)
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    final = events[-1]
    assert final["content"] == "" and final["stop_type"] in ("limit", "eos")
    whole = (await client.post("/completion", json={**body, "stream": False})).json()
    assert "".join(e["content"] for e in events) == whole["content"]
    assert final["tokens_predicted"] == whole["tokens_predicted"]


@pytest.mark.anyio
async def test_t_max_predict_ms_ends_at_a_newline_and_frees_the_request(client, engine, tokenizer):
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    body = {"prompt": "x = 1", "n_predict": 64, "temperature": 0, "t_max_predict_ms": 1,
            "logit_bias": [[newline[0], 100.0]]}                 # every token a newline
    out = (await client.post("/completion", json=body)).json()
    assert out["stop_type"] == "limit" and 0 < out["tokens_predicted"] < 64, out
    assert set(out["content"]) == {"\n"}
    assert await wait_until(lambda: engine_is_idle(engine))


@pytest.mark.parametrize("body, param", [
    ({"input_suffix": "x"}, "input_prefix"),
    ({"input_prefix": "a", "input_suffix": "b", "n_probs": 5}, "n_probs"),
    ({"input_prefix": "a", "input_suffix": "b", "repeat_penalty": 1.1}, "repeat_penalty"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": [{"filename": "a.py"}]}, "input_extra[0].text"),
    ({"input_prefix": "a", "input_suffix": "b", "n_predict": 10**6}, "n_predict"),
    ({"input_prefix": "a", "input_suffix": "b", "top_k": "40"}, "top_k"),
    ({"input_prefix": "a", "input_suffix": "b", "logit_bias": [[1, True]]}, "logit_bias"),
])
@pytest.mark.anyio
async def test_bad_infill_bodies_are_400s_naming_the_clients_field(client, body, param):
    r = await client.post("/infill", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_mixed_or_empty_completion_prompt_is_a_400(client):
    for prompt in ([1, "a"], "", ["a", "b"]):
        r = await client.post("/completion", json={"prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (prompt, r.text)


def test_indent_cut_ends_at_the_first_line_indented_less_than_asked():
    assert indent_cut("x = 1\n    y = 2\nz = 3\n", 4) == len("x = 1\n    y = 2\n")
    assert indent_cut("x = 1\n    y = 2\n  z", 4) == len("x = 1\n    y = 2\n  ")   # the blanks stay
    assert indent_cut("x\n\n    y\n", 4) is None                                    # blank lines do not count
    assert indent_cut("x\ny", 0) is None and indent_cut("  only the first line", 8) is None


@pytest.mark.anyio
async def test_the_indent_rule_cuts_each_completion_and_holds_back_unknown_indentation(engine, tokenizer):
    settings = make_settings(engine.core, tokenizer)
    prepared = await prepare_completion(CompletionRequest(prompt="def f():", max_tokens=16, n=2), settings)
    run = LlamaRun(prepared, LlamaOptions(n_indent=4, t_max_predict_ms=0, response_fields=None, return_tokens=False,
                                          warm_up=False, as_array=True), settings)

    def step(texts: list[str]) -> None:
        outs = [CompletionOutput(i, t, list(range(len(t))), None, None, None, None, t[-1:], [0])
                for i, t in enumerate(texts)]
        run.update(RequestOutput("r", [1, 2], outs, False, 0, RequestTimes(0.0)))

    step(["\n    a = 1\n  ", "\n    b"])
    assert [c["content"] for c in run.chunks()] == ["\n    a = 1\n", "\n    b"]       # "  " held back
    assert not run.done
    step(["\n    a = 1\n  z", "\n    b = 2\n    c"])
    assert run.candidates[0].cut and run.candidates[0].text == "\n    a = 1\n  " and not run.done
    step(["\n    a = 1\n  z = 9", "\n    b = 2\n    c\nd"])
    assert run.done and [run.candidates[i].text for i in (0, 1)] == ["\n    a = 1\n  ", "\n    b = 2\n    c\n"]


def test_response_fields_are_flat_paths_and_missing_ones_are_left_out():
    obj = {"content": "x", "timings": {"prompt_n": 3}}
    assert pick(obj, ("content", "timings/prompt_n", "timings/nope", "")) == {"content": "x", "timings/prompt_n": 3}
    assert pick(obj, None) is obj
    assert json.loads(json.dumps(pick(obj, ()))) == {}
