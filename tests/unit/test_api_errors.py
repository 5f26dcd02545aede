"""Every bad request gets its status and an OpenAI-shaped error naming the field; overload is 429
and a dead engine 503, both with Retry-After; bugs are a generic 500 that leaks nothing."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from serve_app.api import ApiSettings, LocalEngineClient, create_app
from serve_app.engine import SamplingParams
from tests.unit.test_api_support import (API_KEY, MODEL, anyio_backend, api_model_dir, engine_is_idle,  # noqa: F401
                                         engine, http_client, make_app, make_settings, start_engine, tokenizer)

pytestmark = pytest.mark.anyio

MAX_BODY = 64 * 1024          # small, so the 413 cases stay cheap
CHAT = "/v1/chat/completions"
FIM = "/v1/fim/completions"


@dataclass(frozen=True)
class BadInput:
    name: str
    status: int
    param: str | None = None
    json: Any = None                     # the body as JSON ...
    content: bytes | None = None         # ... or raw bytes
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    api_key: str | None = API_KEY

    def body(self) -> dict[str, Any]:
        if self.content is not None:
            return {"content": self.content}
        return {"json": self.json} if self.json is not None else {}


def _ok(**kw) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "x = 1", "max_tokens": 2, **kw}


def _chat(**kw) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


JSON = {"Content-Type": "application/json"}
DEEP = b"[" * 5000 + b"]" * 5000
BAD_INPUTS = [
    # Found by hand probes (issue 17): each was a 500 before body.py refused it.
    BadInput("5000-deep array as the body", 400, content=DEEP, headers=JSON),
    BadInput("5000-deep array as the prompt", 400, content=b'{"prompt": ' + DEEP + b'}', headers=JSON),
    BadInput("40-deep array as the prompt", 400, content=b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b'}', headers=JSON),
    BadInput("5000-deep chat body", 400, path=CHAT, content=b'{"messages": ' + DEEP + b'}', headers=JSON),
    BadInput("lone surrogate in the prompt", 400, content=b'{"prompt": "\\ud800x"}', headers=JSON),
    BadInput("lone low surrogate in a stop string", 400, content=b'{"prompt": "x", "stop": ["\\uDFFF"]}', headers=JSON),
    BadInput("lone surrogate in chat content", 400, path=CHAT,
             content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}', headers=JSON),
    BadInput("lone surrogate in a FIM prefix", 400, path=FIM, content=b'{"prefix": "\\ud800", "suffix": "a"}',
             headers=JSON),
    BadInput("lone surrogate in a logit_bias key", 400, content=b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}',
             headers=JSON),
    BadInput("malformed json", 400, content=b'{"prompt": "x",', headers=JSON),
    BadInput("json array body", 400, content=b"[1, 2]", headers=JSON),
    BadInput("empty body", 400, content=b"", headers=JSON),
    BadInput("invalid utf-8", 400, content=b'{"prompt": "\xff\xfe"}', headers=JSON),
    BadInput("non-json content type", 415, content=b"prompt=x", headers={"Content-Type": "text/plain"}),
    BadInput("missing prompt", 400, "prompt", json={"model": MODEL}),
    BadInput("prompt of wrong type", 400, "prompt", json=_ok(prompt=5)),
    BadInput("batch of mixed prompts", 400, "prompt", json=_ok(prompt=["a", [5, 6]])),
    BadInput("batch too large", 400, "prompt", json=_ok(prompt=["a"] * 33)),
    BadInput("batch with an empty prompt", 400, "prompt[1]", json=_ok(prompt=["a", ""])),
    BadInput("batch with a prompt over the context", 400, "prompt[1]", json=_ok(prompt=[[5], [5] * 600])),
    BadInput("batch with a token id outside the vocabulary", 400, "prompt[1]", json=_ok(prompt=[[5], [5, 99999]])),
    BadInput("empty prompt", 400, "prompt", json=_ok(prompt="")),
    BadInput("empty token list", 400, "prompt", json=_ok(prompt=[])),
    BadInput("token id outside vocabulary", 400, "prompt", json=_ok(prompt=[5, 99999])),
    BadInput("prompt over the context", 400, "prompt", json=_ok(prompt=[5] * 600)),
    BadInput("max_tokens over the context", 400, "max_tokens", json=_ok(max_tokens=100_000)),
    BadInput("max_tokens as string", 400, "max_tokens", json=_ok(max_tokens="16")),
    BadInput("max_tokens zero", 400, "max_tokens", json=_ok(max_tokens=0)),
    BadInput("max_tokens bool", 400, "max_tokens", json=_ok(max_tokens=True)),
    BadInput("negative temperature", 400, "temperature", json=_ok(temperature=-0.5)),
    BadInput("NaN temperature", 400, "temperature", content=b'{"prompt": "x", "temperature": NaN}', headers=JSON),
    BadInput("huge temperature", 400, "temperature", json=_ok(temperature=1e308)),
    BadInput("temperature as string", 400, "temperature", json=_ok(temperature="0.2")),
    BadInput("top_p zero", 400, "top_p", json=_ok(top_p=0)),
    BadInput("top_p above one", 400, "top_p", json=_ok(top_p=1.5)),
    BadInput("top_k below -1", 400, "top_k", json=_ok(top_k=-5)),
    BadInput("n too large", 400, "n", json=_ok(n=100)),
    BadInput("negative seed", 400, "seed", json=_ok(seed=-1)),
    BadInput("stop list too long", 400, "stop", json=_ok(stop=[f"s{i}" for i in range(9)])),
    BadInput("empty stop string", 400, "stop", json=_ok(stop=[""])),
    BadInput("stop of wrong type", 400, "stop", json=_ok(stop=[1])),
    BadInput("logprobs too large", 400, "logprobs", json=_ok(logprobs=50)),
    BadInput("echo with suffix", 400, "echo", json=_ok(echo=True, suffix="x")),
    BadInput("echo with logprobs", 400, "echo", json=_ok(echo=True, logprobs=1)),
    BadInput("best_of below n", 400, "best_of", json=_ok(best_of=1, n=2)),
    BadInput("best_of streamed", 400, "best_of", json=_ok(best_of=3, stream=True)),
    BadInput("best_of too large", 400, "best_of", json=_ok(best_of=100)),
    BadInput("best_of as string", 400, "best_of", json=_ok(best_of="2")),
    BadInput("logit_bias key not a token id", 400, "logit_bias", json=_ok(logit_bias={"abc": 1})),
    BadInput("logit_bias negative id", 400, "logit_bias", json=_ok(logit_bias={"-3": 1})),
    BadInput("logit_bias out of range", 400, "logit_bias", json=_ok(logit_bias={"5": 101})),
    BadInput("logit_bias value a string", 400, "logit_bias.5", json=_ok(logit_bias={"5": "1"})),
    BadInput("logit_bias outside the vocabulary", 400, "logit_bias", json=_ok(logit_bias={"99999": 5})),
    BadInput("logit_bias too many tokens", 400, "logit_bias", json=_ok(logit_bias={str(i): 1 for i in range(301)})),
    BadInput("logit_bias not an object", 400, "logit_bias", json=_ok(logit_bias=[1, 2])),
    BadInput("penalty out of range", 400, "presence_penalty", json=_ok(presence_penalty=2.5)),
    BadInput("penalty of wrong type", 400, "frequency_penalty", json=_ok(frequency_penalty="1")),
    BadInput("unknown field", 400, "foo", json=_ok(foo=1)),
    BadInput("suffix with token ids", 400, "suffix", json=_ok(prompt=[5, 6], suffix="x")),
    BadInput("stream_options without stream", 400, "stream_options", json=_ok(stream_options={"include_usage": True})),
    BadInput("unknown model", 404, "model", json=_ok(model="gpt-4")),
    BadInput("chat: bad role", 400, "messages[0].role", path=CHAT,
             json={"messages": [{"role": "bot", "content": "x"}]}),
    BadInput("chat: no messages", 400, "messages", path=CHAT, json={"messages": []}),
    BadInput("chat: image content", 400, "messages[0].content", path=CHAT,
             json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    BadInput("chat: top_logprobs without logprobs", 400, "top_logprobs", path=CHAT, json=_chat(top_logprobs=2)),
    BadInput("chat: top_logprobs too large", 400, "top_logprobs", path=CHAT,
             json=_chat(logprobs=True, top_logprobs=99)),
    BadInput("chat: max_completion_tokens over context", 400, "max_completion_tokens", path=CHAT,
             json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}),
    BadInput("chat: tools unsupported", 400, "tools", path=CHAT, json=_chat(tools=[])),
    BadInput("fim: missing prefix", 400, "prefix", path=FIM, json={"suffix": "x"}),
    BadInput("fim: n is not a fim field", 400, "n", path=FIM, json={"prefix": "x", "n": 2}),
    BadInput("body too large by Content-Length", 413, json=_ok(prompt="x" * (MAX_BODY + 10))),
    BadInput("missing API key", 401, json=_ok(), api_key=None),
    BadInput("wrong API key", 401, json=_ok(), api_key="sk-wrong"),
    BadInput("unknown model card", 404, "model", path="/v1/models/gpt-4", method="GET"),
    BadInput("unknown route", 404, path="/v1/engines"),
    BadInput("wrong method", 405, method="GET"),
]


@pytest.fixture
def app(engine, tokenizer):
    return make_app(engine, tokenizer, api_keys=("sk-other", API_KEY), max_body_bytes=MAX_BODY)


def assert_openai_error(response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.name)
async def test_bad_input_gets_its_status_and_an_openai_error_then_service_goes_on(app, engine, case):
    async with http_client(app, case.api_key) as client:
        r = await client.request(case.method, case.path, headers=case.headers, **case.body())
        assert_openai_error(r, case.status, case.param)
    async with http_client(app, API_KEY) as client:
        ok = await client.post("/v1/completions", json=_ok(max_tokens=1))
        assert ok.status_code == 200, ok.text
    assert engine_is_idle(engine)


async def test_escaped_surrogate_pairs_and_moderate_nesting_are_fine(app):
    # An emoji written as its JSON surrogate pair is one valid character, unlike a lone half.
    async with http_client(app, API_KEY) as client:
        pair = await client.post("/v1/completions", content=b'{"prompt": "x = \\ud83d\\ude00", "max_tokens": 1}',
                                 headers=JSON)
        chat = await client.post(CHAT, json=_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
    assert pair.status_code == 200, pair.text
    assert chat.status_code == 200, chat.text


def test_the_bad_input_table_is_big_enough():
    assert len(BAD_INPUTS) >= 25 and len({c.name for c in BAD_INPUTS}) == len(BAD_INPUTS)


async def test_unauthenticated_requests_are_told_to_use_bearer(app):
    async with http_client(app) as client:
        r = await client.post("/v1/completions", json=_ok())
    assert assert_openai_error(r, 401, None)["code"] == "missing_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_health_needs_no_api_key(app):
    async with http_client(app) as client:
        assert (await client.get("/health")).status_code == 200


async def test_chunked_body_over_the_limit_is_cut_off_without_content_length(app):
    sent = 0

    async def chunks():
        nonlocal sent
        for _ in range(64):                  # 64 × 4 KiB = 4 × MAX_BODY if it were all read
            sent += 4096
            yield b"x" * 4096

    async with http_client(app, API_KEY) as client:
        r = await client.post("/v1/completions", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, None)
    assert sent <= MAX_BODY + 2 * 4096                 # reading stopped right after the limit


@pytest.mark.parametrize("path", ["/v1/completions", "/infill"])
async def test_a_body_that_stops_arriving_is_a_408_at_the_request_timeout(engine, tokenizer, path):
    app = make_app(engine, tokenizer, request_timeout_s=0.3)

    async def trickle():
        yield b'{"prompt": "def f'
        await asyncio.sleep(30)                      # the rest never comes (in time)
        yield b'"}'

    started = time.monotonic()
    async with http_client(app) as client:
        r = await client.post(path, content=trickle(), headers=JSON)
    assert_openai_error(r, 408, None)
    assert time.monotonic() - started < 5


async def test_wrong_method_names_the_allowed_one(app):
    async with http_client(app, API_KEY) as client:
        r = await client.get("/v1/chat/completions")
    assert_openai_error(r, 405, None)
    assert r.headers["allow"] == "POST"


async def test_full_engine_queue_answers_429_with_retry_after(api_model_dir, tokenizer):
    # One running slot and one waiting slot: A runs, B waits, so the HTTP request C is refused.
    engine = start_engine(api_model_dir, max_num_seqs=1, max_waiting_requests=1, retry_after_s=2.5)
    step = engine.core.step

    def slow_step():                # A's 400 tokens must outlast C's round trip however fast steps get
        time.sleep(0.005)
        return step()
    engine.core.step = slow_step
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    ids = tokenizer.encode("x = 1")
    a = engine.generate("a", ids, long)
    b = engine.generate("b", ids, long)
    b_first = None
    try:
        await anext(a)                                                  # A is running
        b_first = asyncio.ensure_future(anext(b))                       # B is admitted, then waits
        for _ in range(3000):
            if engine.snapshot(lambda core: len(core.scheduler.waiting)) == 1:
                break
            await asyncio.sleep(0.01)
        async with http_client(make_app(engine, tokenizer)) as client:
            r = await client.post("/v1/completions", json=_ok())
        error = assert_openai_error(r, 429, None)
        assert error["type"] == "rate_limit_error" and r.headers["retry-after"] == "3"
    finally:
        b_first.cancel()
        await asyncio.gather(b_first, return_exceptions=True)
        await a.aclose()
        await b.aclose()
        idle = engine_is_idle(engine)
        engine.shutdown()
    assert idle


async def test_stopped_engine_answers_503_with_retry_after(api_model_dir, tokenizer):
    engine = start_engine(api_model_dir)
    engine.shutdown()
    app = create_app(LocalEngineClient(engine, retry_after_s=0.2), make_settings(engine.core, tokenizer))
    async with http_client(app) as client:
        health = await client.get("/health")
        completion = await client.post("/v1/completions", json=_ok())
    for r in (health, completion):
        assert assert_openai_error(r, 503, None)["code"] == "backend_unavailable"
        assert r.headers["retry-after"] == "1"          # rounded up, never 0


class _BuggyClient:
    """An EngineClient with a bug: the real engine is not needed to show how a bug is answered.
    Its exceptions quote request data (`secret`), as a careless message might quote a prompt."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def generate(self, request_id, prompt_token_ids, params, tag="", precision="full", stream=True):
        raise RuntimeError(f"failed on {self.secret}")
        yield  # pragma: no cover - makes this an async generator

    async def abort(self, request_id):
        return None

    async def check_health(self):
        raise KeyError(self.secret)


async def test_a_bug_is_a_generic_500_and_is_logged_without_its_message(tokenizer, caplog):
    secret = "-".join(["customer", "code", "1234"])       # built at run time: not in any source line
    settings = ApiSettings(MODEL, tokenizer, max_model_len=512)
    with caplog.at_level(logging.ERROR):
        async with http_client(create_app(_BuggyClient(secret), settings)) as client:
            r = await client.post("/v1/completions", json=_ok())
            health = await client.get("/health")
    for response in (r, health):
        error = assert_openai_error(response, 500, None)
        assert error["type"] == "server_error" and secret not in response.text and "Traceback" not in response.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "RuntimeError" in logged and "KeyError" in logged and secret not in logged
