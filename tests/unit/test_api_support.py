"""Shared fixtures and factories for the API tests (test_api*.py); it holds no tests itself.

It lives next to them under a test_api* name because the API tests own only these files; the
fixtures are imported by name into each test module. The model directory is session-scoped (built
once); engines are per module, each over the real tiny model: no engine mocks.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest

from serve_app.api import ApiSettings, LocalEngineClient, create_app
from serve_app.engine import AsyncEngine, EngineCore
from serve_app.tokenizer import CodeTokenizer
from tests.helpers.engines import build_model_dir, create_engine

MODEL = "tiny-moe"
API_KEY = "sk-test-key"
# Greedy decoding of this prompt runs to max_tokens without hitting EOS on the tiny model (seed 0),
# so requests on it stay in the engine long enough to be cancelled.
LONG_RUNNING_PROMPT = "def add(a, b):"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def api_model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("api-model"), "mixtral")


@pytest.fixture(scope="session")
def tokenizer(api_model_dir) -> CodeTokenizer:
    return CodeTokenizer.from_dir(api_model_dir)


def start_engine(model_dir, **options) -> AsyncEngine:
    return AsyncEngine(create_engine(model_dir, **options))


@pytest.fixture(scope="module")
def engine(api_model_dir):
    """One engine per test module that imports this fixture (module scope counts per importer)."""
    eng = start_engine(api_model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture
async def client(engine, tokenizer):
    async with http_client(make_app(engine, tokenizer)) as c:
        yield c


def make_settings(core: EngineCore, tokenizer: CodeTokenizer, **overrides) -> ApiSettings:
    return ApiSettings(**{"served_model_name": MODEL, "tokenizer": tokenizer,
                          "max_model_len": core.max_model_len, **overrides})


def make_app(engine: AsyncEngine, tokenizer: CodeTokenizer, **settings):
    return create_app(LocalEngineClient(engine), make_settings(engine.core, tokenizer, **settings))


def http_client(app, api_key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers, timeout=120)


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded; "[DONE]" stays a string."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), f"not an SSE data event: {block!r}"
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def engine_is_idle(engine: AsyncEngine) -> bool:
    """No request left and every KV block back in the pool."""
    return engine.snapshot(lambda core: not core.requests and not core.scheduler.running
                           and not core.scheduler.waiting
                           and core.blocks.num_free_blocks == core.blocks.num_blocks)


async def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.01) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return predicate()


@dataclass
class AsgiCall:
    """Drives one HTTP request through the ASGI app by hand, so a test can disconnect mid-response.

    `spec_version` picks Starlette's disconnect path: "2.3" listens on `receive` for
    `http.disconnect`; "2.4" learns it only when `send` raises OSError."""
    app: Any
    path: str
    body: dict[str, Any]
    spec_version: str = "2.3"
    messages: list[dict[str, Any]] = field(default_factory=list)
    first_body: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    # Called as the first body chunk is sent, its result kept: a probe of the server's state at that
    # moment, not after the test task gets to run (a tiny model can finish 400 tokens in between).
    on_first_body: Callable[[], Any] | None = None
    at_first_body: Any = None
    _body_sent: bool = False

    def scope(self) -> dict[str, Any]:
        raw = json.dumps(self.body).encode()
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": self.spec_version},
                "http_version": "1.1", "method": "POST", "scheme": "http", "path": self.path,
                "raw_path": self.path.encode(), "query_string": b"", "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
                "client": ("127.0.0.1", 5000), "server": ("test", 80), "state": {}}

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": json.dumps(self.body).encode(), "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.disconnected.is_set() and self.spec_version >= "2.4":
            raise OSError("client disconnected")
        self.messages.append(message)
        if message["type"] == "http.response.body" and message.get("body") and not self.first_body.is_set():
            if self.on_first_body is not None:
                self.at_first_body = self.on_first_body()
            self.first_body.set()

    async def run(self) -> None:
        await self.app(self.scope(), self.receive, self.send)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def body_text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body").decode()
