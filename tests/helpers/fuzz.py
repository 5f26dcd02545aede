"""Hypothesis strategies for HTTP requests to the API, from its own request models, and the
property every response must have (issue 17: no 5xx, ever; 4xx bodies in OpenAI's shape).

Why strategies over the pydantic models rather than schemathesis: the app parses bodies by hand
(api/body.py) and so publishes no OpenAPI document. The fields come from the models themselves
(`model_fields`), so a field added to the API is fuzzed without editing this file. Each field gets
a value that is valid-ish for it (what its annotation names, in and just outside its range) or any
JSON at all (wrong types, odd Unicode with lone surrogates, huge numbers, NaN, deep nesting); a
body may also carry an unknown field, be a raw byte string, a JSON scalar or array, use a wrong
content type, or go to a route with the wrong method.

Generation is kept cheap on purpose: max_tokens and n are small when valid, so thousands of
requests run in a couple of minutes on two cores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from serve_app.api.llamacpp import LlamaCompletionRequest, LlamaInfillRequest
from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest, FimRequest

ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/v1/fim/completions": FimRequest, "/completion": LlamaCompletionRequest, "/infill": LlamaInfillRequest}
# llama.cpp's routes: their streams end with a `"stop": true` object, not [DONE] (api/llamacpp_render.py).
LLAMA_ROUTES = ("/completion", "/infill")

# Text with every Unicode category, surrogates included: json.dumps writes a lone one as "\\ud800".
odd_text = st.text(st.characters(codec=None), max_size=40)
code_text = st.sampled_from(["def f(x):\n    return ", "import os\n", "class A:\n", "", " ", "\t\n", "x = 1"])
text = st.one_of(code_text, odd_text)
small_int = st.integers(-2, 8)
edge_int = st.sampled_from([0, 1, -1, 16, 17, 2**31, 2**63, -(2**63), 10**30])
number = st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([0, 1, 2, 2.5, -100, 100, 101, 1e308]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
any_json = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(text, inner, max_size=4)), max_leaves=12)

FIELD_VALUES: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from([None, "tiny-moe", "gpt-4", ""]),
    "prompt": st.one_of(text, st.lists(st.integers(-2, 70000), max_size=6), st.lists(text, max_size=4),
                        st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=4), max_size=3)),
    "suffix": text, "prefix": text,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot"]),
         "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                     "text": text}), max_size=2))}),
        max_size=3),
    "max_tokens": st.one_of(small_int, edge_int), "max_completion_tokens": st.one_of(small_int, edge_int),
    "temperature": number, "top_p": number, "top_k": st.one_of(small_int, edge_int),
    "n": st.integers(0, 4), "best_of": st.integers(0, 5), "seed": st.one_of(small_int, edge_int),
    "stop": st.one_of(st.none(), text, st.lists(text, max_size=10)),
    "stream": st.booleans(), "echo": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": st.one_of(st.booleans(), small_int, edge_int), "top_logprobs": st.one_of(small_int, edge_int),
    "precision": st.sampled_from(["auto", "int4", "int8", "full", "fp8"]),
    "frequency_penalty": number, "presence_penalty": number,
    "logit_bias": st.one_of(st.none(), st.dictionaries(st.one_of(st.integers(-1, 70000).map(str), text), number,
                                                       max_size=3)),
    "user": text,
    # llama.cpp's fields (api/llamacpp.py), and its other names for some of ours
    "n_predict": st.one_of(small_int, edge_int), "n_cmpl": st.integers(-1, 4), "n_indent": st.one_of(small_int, edge_int),
    "t_max_predict_ms": st.one_of(small_int, edge_int), "return_tokens": st.booleans(),
    "input_prefix": text, "input_suffix": text,
    "input_extra": st.lists(st.fixed_dictionaries({"text": text}, optional={"filename": text, "time": any_json}),
                            max_size=3),
    "response_fields": st.one_of(st.none(), st.lists(st.sampled_from(["content", "timings/prompt_n", "", "a/b/c",
                                                                      "generation_settings/n_ctx"]), max_size=4)),
    "n_probs": small_int, "repeat_penalty": number, "min_p": number, "extra_context": any_json,
}


def field_value(name: str) -> st.SearchStrategy:
    valid = FIELD_VALUES.get(name, any_json)
    return st.one_of(valid, valid, valid, any_json)          # mostly plausible values, often anything


def json_body(model) -> st.SearchStrategy[dict]:
    optional = {name: field_value(name) for name in model.model_fields}
    required = [name for name, f in model.model_fields.items() if f.is_required()]
    body = st.fixed_dictionaries({name: field_value(name) for name in required},
                                 optional={k: v for k, v in optional.items() if k not in required})
    extra = st.dictionaries(st.sampled_from(["foo", "tools", "functions", "response_format", ""]), any_json,
                            max_size=1)
    return st.tuples(body, extra, st.booleans()).map(lambda t: {**t[0], **t[1]} if t[2] else t[0])


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str
    content: bytes
    content_type: str | None

    def __repr__(self) -> str:                                # hypothesis prints this on failure
        return f"FuzzRequest({self.method} {self.path} {self.content_type!r} {self.content[:300]!r})"


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()                        # ensure_ascii: lone surrogates become escapes


requests = st.one_of(
    # A body shaped like the route's model: most of the examples.
    st.sampled_from(sorted(ROUTES)).flatmap(
        lambda path: json_body(ROUTES[path]).map(lambda b: FuzzRequest("POST", path, _encode(b), "application/json"))),
    # Deeply nested values where a field is expected.
    st.tuples(st.sampled_from(sorted(ROUTES)), st.sampled_from(["prompt", "messages", "prefix", "logit_bias"]),
              st.integers(30, 5000)).map(
        lambda t: FuzzRequest("POST", t[0], b'{"%s": ' % t[1].encode() + b"[" * t[2] + b"]" * t[2] + b"}",
                              "application/json")),
    # Not an object, not JSON, not UTF-8, or another content type.
    st.tuples(st.sampled_from(sorted(ROUTES)), st.one_of(st.binary(max_size=64), any_json.map(_encode)),
              st.sampled_from(["application/json", None, "text/plain", "application/x-www-form-urlencoded",
                               "application/merge-patch+json", "application/json; charset=latin-1"])).map(
        lambda t: FuzzRequest("POST", t[0], t[1], t[2])),
    # Wrong methods and unknown routes.
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
              st.sampled_from([*sorted(ROUTES), "/v1/models", "/v1/nope", "/health", "/v1/models/x%00y"])).map(
        lambda t: FuzzRequest(t[0], t[1], b"", None)),
)


def check_response(status: int, content_type: str, body: bytes, path: str = "") -> None:
    """The property: never a 5xx; an error is OpenAI-shaped; a stream is well-formed (OpenAI's
    end with [DONE], llama.cpp's with a `stop: true` object) and has no server error inside it."""
    assert status < 500, f"{status}: {body[:500]!r}"
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body[:500]
        return
    if content_type.startswith("text/event-stream"):
        events = [block[len("data: "):] for block in body.decode().split("\n\n") if block.strip()]
        if path in LLAMA_ROUTES:
            assert events and (json.loads(events[-1]).get("stop") is True or "error" in json.loads(events[-1]))
            events.append("[DONE]")
        assert events and events[-1] == "[DONE]", body[-300:]
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert payload["error"]["type"] != "server_error", event
        return
    json.loads(body)
