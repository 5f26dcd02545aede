"""The Ingress side: an `EngineClient` (serve_app/api/client.py) over an engine process's request
connection. One connection per event loop, shared by its requests (frames carry request ids);
the address comes from the Router deployment through Serve, once per connection.

A connection that breaks fails its requests as 503 with Retry-After (the engine, or its replica,
is being replaced) and the next request connects again — to the replacement, which Serve routes
the address call to once it is up.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray.exceptions import RayError

from serve_app.api.errors import BackendUnavailableError
from serve_app.engine import RequestOutput, SamplingParams
from serve_app.engine.async_engine import EngineStepError
from serve_app.engine.sampling_params import SamplingParamsError
from serve_app.engine.sequence import EngineError
from serve_app.hosting.frames import FrameError, encode, no_delay, read_frame

# Errors that are the request's fault keep their status (400/429); anything else is the backend's.
CLIENT_ERRORS = (SamplingParamsError, EngineError, ValueError)


def ray_cause(exc: BaseException) -> BaseException:
    """The exception a Ray error wraps (a RayTaskError's `cause`), else `exc` itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


async def router_health(router, timeout_s: float) -> None:
    """/health through the Router deployment (its engines run, every shard answers), or 503."""
    try:
        await asyncio.wait_for(router.health.remote(), timeout=timeout_s)
    except (RayError, asyncio.TimeoutError) as exc:
        raise BackendUnavailableError(f"unhealthy: {type(ray_cause(exc)).__name__}") from exc


def backend_error(cause: BaseException) -> BaseException:
    """What the API raises for an error the engine ended a request with."""
    if isinstance(cause, BackendUnavailableError):
        return cause
    if isinstance(cause, EngineStepError) or not isinstance(cause, CLIENT_ERRORS):
        return BackendUnavailableError(f"the model backend failed: {type(cause).__name__}")
    return cause


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.queues: dict[str, asyncio.Queue] = {}      # request id → its outputs, or an exception
        self.closed = False
        self._task = asyncio.create_task(self._read())

    def send(self, message: tuple) -> None:
        if self.closed:
            raise BackendUnavailableError("the connection to the engine was lost")
        self.writer.write(encode(message))

    async def _read(self) -> None:
        try:
            while True:
                kind, request_id, value = await read_frame(self.reader)
                if (queue := self.queues.get(request_id)) is not None:
                    queue.put_nowait(value if kind == "out" else backend_error(value))
        except (asyncio.IncompleteReadError, ConnectionError, FrameError, ValueError):
            pass
        finally:
            self.closed = True
            for queue in self.queues.values():
                queue.put_nowait(BackendUnavailableError("the connection to the engine was lost"))
            self.writer.close()


class RemoteEngineClient:
    def __init__(self, router, connect_timeout_s: float = 2.0, health_timeout_s: float = 5.0):
        """`router`: the Router deployment's handle (`engine_address`, `health`)."""
        self.router = router
        self.connect_timeout_s = connect_timeout_s
        self.health_timeout_s = health_timeout_s
        self._conns: dict[asyncio.AbstractEventLoop, _Connection] = {}
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        conn = await self._connection()
        queue = conn.queues[request_id] = asyncio.Queue()
        finished = False
        try:
            conn.send(("gen", request_id, prompt_token_ids, params, tag, precision, stream))
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True             # the engine ended it (or it is gone)
                    raise item
                finished = item.finished
                yield item
        finally:
            conn.queues.pop(request_id, None)
            if not finished and not conn.closed:    # client went away: free the KV now
                conn.send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        conn = self._conns.get(asyncio.get_running_loop())
        if conn is not None and not conn.closed:
            conn.send(("abort", request_id))

    async def check_health(self) -> None:
        await router_health(self.router, self.health_timeout_s)

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if (conn := self._conns.get(loop)) is not None and not conn.closed:
            return conn
        async with self._locks.setdefault(loop, asyncio.Lock()):
            if (conn := self._conns.get(loop)) is None or conn.closed:
                try:
                    conn = self._conns[loop] = await asyncio.wait_for(self._connect(), self.connect_timeout_s)
                except (RayError, OSError, asyncio.TimeoutError) as exc:
                    raise BackendUnavailableError(f"the engine is unreachable: {type(exc).__name__}") from exc
        return conn

    async def _connect(self) -> _Connection:
        address = await self.router.engine_address.remote()
        reader, writer = await asyncio.open_connection(address.host, address.port)
        no_delay(writer)
        writer.write(address.token)
        return _Connection(reader, writer)
