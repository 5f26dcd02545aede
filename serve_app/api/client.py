"""What the HTTP layer needs from an engine, and the in-process implementation of it.

Why a Protocol: the same FastAPI app runs over an engine in this process (tests, embedded mode)
and, inside Ray Serve, over a router deployment reached through a handle. The app depends only on
`EngineClient`; `deployments/` provides the Ray-backed one. Its contract:
- `generate` is an async generator function: calling it returns the request's outputs as they
  happen. Admission errors (`EngineOverloadedError`, `RequestRejectedError`,
  `BackendUnavailableError`) are raised by the first `__anext__`, before any output, so the app can
  still answer with a proper status. Closing the iterator early aborts the request.
- `abort` frees the request's KV blocks before it returns; unknown ids are ignored. The app calls
  it on client disconnect as well as closing the iterator, so an implementation whose iterator
  cannot abort on close is still correct.
- `stream=False` asks for the finished output only (a non-streaming HTTP request renders nothing
  else): when the engine is remote that saves one message per generated token.
- `check_health` returns when the engine can take work and raises `BackendUnavailableError` when not.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator, Protocol, runtime_checkable

from serve_app.api.errors import BackendUnavailableError
from serve_app.engine import AsyncEngine, RequestOutput, SamplingParams
from serve_app.engine.lanes import Lanes


@runtime_checkable
class EngineClient(Protocol):
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request (cumulative text plus deltas), the last with `finished=True`.
        `tag` labels the request's metrics (its tier); `precision` picks its experts."""
        ...

    async def abort(self, request_id: str) -> None:
        ...

    async def check_health(self) -> None:
        ...


class LocalEngineClient:
    """`EngineClient` over an `AsyncEngine` (or precision `Lanes` of them) in this process."""

    def __init__(self, engine: AsyncEngine | Lanes, retry_after_s: float = 1.0) -> None:
        self.engine = engine
        self.retry_after_s = retry_after_s      # told to clients while the engine loop is down

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        # Without this check a request added to a stopped engine would wait forever: nobody steps it.
        self._raise_if_down()
        async with aclosing(self.engine.generate(request_id, prompt_token_ids, params, tag, precision,
                                                 stream)) as outputs:
            async for out in outputs:
                yield out

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        self._raise_if_down()

    def _raise_if_down(self) -> None:
        if not self.engine.alive:
            raise BackendUnavailableError("the engine loop is not running", self.retry_after_s)
