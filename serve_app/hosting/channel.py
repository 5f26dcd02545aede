"""The control pipe between the Router replica and its engine process.

Both ends run the same `Channel` over a `multiprocessing.connection.Connection` (a socketpair):
one reader thread per end; `call(method, *args)` blocks for the other end's answer, `notify`
sends one-way. Handlers run in a small thread pool, so a slow one (a shard's control-plane call
through Serve can wait seconds for a replacement replica) never holds up the reader — or the other
calls in flight. Nothing here is per request or per token: requests go over `frames.py`.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable

log = logging.getLogger(__name__)


class ChannelClosedError(ConnectionError):
    """The other end is gone (its process exited or closed the pipe)."""


class Channel:
    def __init__(self, conn: Connection, handlers: dict[str, Callable[..., Any]],
                 on_notice: Callable[[str, tuple], None] | None = None, on_close: Callable[[], None] | None = None,
                 name: str = "channel"):
        """`handlers[method](*args)` answers the other end's calls; `on_notice(kind, args)` takes its
        one-way notices (in the reader thread: keep it short); `on_close()` runs once at EOF."""
        self._conn, self._handlers, self._on_notice, self._on_close = conn, handlers, on_notice, on_close
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-call")
        self.closed = False
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)

    def start(self) -> "Channel":
        self._reader.start()
        return self

    def call(self, method: str, *args, timeout: float | None = None) -> Any:
        """The other end's `handlers[method](*args)`; its exception is raised here."""
        future: Future = Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        try:
            self._send(("call", call_id, method, args))
            return future.result(timeout=timeout)
        finally:
            self._pending.pop(call_id, None)

    def notify(self, kind: str, *args) -> None:
        self._send(("notice", kind, args))

    def close(self) -> None:
        """The other end sees EOF now. (Closing the fd alone would not: our reader thread, blocked in
        recv on it, keeps the socket open until something arrives.)"""
        self.closed = True
        try:
            sock = socket.socket(fileno=os.dup(self._conn.fileno()))
            sock.shutdown(socket.SHUT_RDWR)     # wakes our reader with EOF and sends the peer FIN
            sock.close()
        except (OSError, ValueError):
            pass                                # already closed
        self._conn.close()

    def _send(self, message: tuple) -> None:
        if self.closed:
            raise ChannelClosedError("the control channel is closed")
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:        # ValueError: a Connection closed under us
            raise ChannelClosedError(str(exc)) from exc

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "call":
                    self._pool.submit(self._answer, *message[1:])
                elif kind == "reply":
                    _, call_id, ok, value = message
                    if (future := self._pending.get(call_id)) is not None:
                        future.set_result(value) if ok else future.set_exception(value)
                elif self._on_notice is not None:
                    self._on_notice(message[1], message[2])
        except (EOFError, OSError, TypeError):     # TypeError: close() while recv() waited
            pass
        finally:
            self.closed = True
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_exception(ChannelClosedError("the other end of the control channel is gone"))
            if self._on_close is not None:
                self._on_close()

    def _answer(self, call_id: int, method: str, args: tuple) -> None:
        try:
            reply = ("reply", call_id, True, self._handlers[method](*args))
        except Exception as exc:                    # noqa: BLE001 - the caller gets it
            reply = ("reply", call_id, False, exc)
        try:
            self._send(reply)
        except ChannelClosedError:
            pass
        except Exception as exc:                    # noqa: BLE001 - an answer that does not pickle
            log.exception("control call %s: answer not sent", method)
            self._send(("reply", call_id, False, RuntimeError(f"{method}: {type(exc).__name__}: {exc}")))
