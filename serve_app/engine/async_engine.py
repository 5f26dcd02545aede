"""Async front of the engine: a background thread runs `step()` while there is work; every request
gets an async stream of its outputs.

Why a thread and not an asyncio task: a step is a blocking PyTorch forward, so running it off the
event loop keeps the HTTP side answering while the model computes.

Adds and aborts go through an inbox that the engine thread applies between steps; they never wait
for the core's lock. Why: the engine thread held the lock for each whole step and took it again
at once, and Python locks are not fair, so an add from the event loop (through a worker thread)
could wait several steps for it; under 8 editors that was ~100 ms of a request's time outside the
engine (docs/benchmarks.md, "serving path"). Admission errors still reach the caller before any
output (they are the stream's first item), `abort` still returns only once the request's blocks
are free (it awaits the engine thread's acknowledgement), and add and abort of one request are
applied in the order they were posted, so a request cancelled while being added is aborted.
A step that raises fails the streams of every request in flight (no client is left hanging) and
the loop goes on with a clean engine. The lock keeps `snapshot` readers (metrics, health,
tests) out of a step; they never block on it (see `snapshot`).

Lanes: engines that share a device can share a `LaneGate` (engine/priority.py); a ``priority``
engine reports when it has work, the others wait their turn before each step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from serve_app.engine.core import EngineCore
from serve_app.engine.priority import LaneGate
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import EngineError, RequestOutput

log = logging.getLogger(__name__)


class EngineStepError(EngineError):
    """The engine failed while this request was in flight; the request was aborted."""


class EngineStoppedError(EngineError):
    """The engine loop is not running (shut down or crashed); nothing would ever step a new request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue            # RequestOutput items, or an exception to raise in the consumer
    final_only: bool = False        # deliver only the finished output (or an exception)


class AsyncEngine:
    def __init__(self, core: EngineCore, gate: LaneGate | None = None, priority: bool = False):
        self.core = core
        self._gate = gate
        self._priority = priority
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        # (callable, args) the engine thread runs between steps; deque append/popleft are atomic.
        self._inbox: collections.deque = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they happen (``stream=False``: the finished one only, which
        spares the event loop one wake-up per token). Admission errors raise before the first item;
        leaving the iteration early (client gone, task cancelled) aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), final_only=not stream)
        if not self.alive:
            raise EngineStoppedError("the engine loop is not running")
        self._post(self._add, request_id, prompt_token_ids, params, tag, precision, stream, time.monotonic())
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Returns once the request's blocks are free (or it was unknown)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self.alive:
            return
        self._post(self._abort, request_id, lambda: _call_soon(loop, _resolve, done))
        await done

    def _post(self, fn, *args, work: bool = True) -> None:
        self._inbox.append((fn, args))
        if work:
            self._report_busy(True)      # the lane gate hears of new work before the engine wakes
        self._wake.set()
        if not self._thread.is_alive():  # stopped between the caller's check and now: answer here
            self._drain_on_stop()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def snapshot(self, fn):
        """fn(core) between two steps (for metrics, health and tests), its result returned here:
        at once when the core's lock is free, else run by the engine thread after its current
        step. Never a blocking wait for the lock: a thread waiting for it could wait out a whole
        request while the engine re-took it step after step."""
        if threading.current_thread() is self._thread:
            return fn(self.core)
        if self._lock.acquire(blocking=False):   # idle, or waiting its lane's turn: run it here
            try:
                return fn(self.core)
            finally:
                self._lock.release()
        result: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["value"] = fn(self.core)
            except BaseException as exc:     # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = exc
            finally:
                done.set()
        self._post(run, work=False)
        done.wait()
        if "error" in result:
            raise result["error"]
        return result["value"]

    # ---- engine thread side --------------------------------------------------------------------

    def _add(self, request_id, prompt_token_ids, params, tag: str, precision: str, stream: _Stream,
             arrival: float) -> None:
        try:
            self.core.add_request(request_id, prompt_token_ids, params, tag, precision, arrival)
        except Exception as exc:            # noqa: BLE001 - admission errors go to the caller
            _send(stream, exc)
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str, acknowledge) -> None:
        try:
            final = self.core.abort(request_id)
            if final is not None:               # a reader still waiting gets the aborted output, not silence
                self._deliver(request_id, final)
            self._streams.pop(request_id, None)
        finally:
            acknowledge()

    def _apply_inbox(self) -> None:
        while self._inbox:
            fn, args = self._inbox.popleft()
            fn(*args)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        elif stream.final_only:
            return
        if not _send(stream, item):          # the reader's event loop is closed: nobody will read
            self._streams.pop(request_id, None)
            self.core.abort(request_id)      # free its blocks now; the engine thread goes on

    def _report_busy(self, busy: bool) -> None:
        if self._gate is not None and self._priority:
            self._gate.set_busy(self, busy)

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()                   # clear before checking, so a concurrent add is never missed
            with self._lock:
                self._apply_inbox()
            if not self.core.has_unfinished():
                self._report_busy(False)
                self._wake.wait()
                continue
            self._report_busy(True)              # also covers a request added while we went idle
            if self._gate is not None and not self._priority:
                self._gate.wait_turn()
            with self._lock:
                self._apply_inbox()              # what arrived while we waited our turn
                if not self.core.has_unfinished():   # aborted meanwhile
                    continue
                try:
                    outputs = self.core.step()
                except Exception as exc:         # noqa: BLE001 - fail the requests, keep serving
                    log.exception("engine step failed; aborting %d requests", len(self.core.requests))
                    for request_id in list(self.core.requests):
                        self.core.abort(request_id)
                        self._deliver(request_id, EngineStepError(f"engine step failed: {exc}"))
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
        self._drain_on_stop()

    def _drain_on_stop(self) -> None:
        """After shutdown nothing steps again: fail pending adds, acknowledge pending aborts."""
        with self._lock:
            while self._inbox:
                fn, args = self._inbox.popleft()
                if fn == self._add:
                    _send(args[5], EngineStoppedError("the engine loop is not running"))
                else:
                    fn(*args)


def _send(stream: _Stream, item) -> bool:
    """Hand an item to the stream's event loop; False when that loop is closed (its reader is gone)."""
    return _call_soon(stream.loop, stream.queue.put_nowait, item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """call_soon_threadsafe that never raises: a delivery failing must not kill the engine thread."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:                     # "Event loop is closed"
        return False


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
