"""Frames on a request connection (Ingress ⇄ engine process) and the address a client is told.

A frame = 4-byte big-endian length + a pickled tuple. Pickle is read only after the connection
presented the engine process's random token, which only the Serve control plane hands out (the
data plane's rule, serve_app/parallel/socket_plane.py).

Client → engine: ("gen", request_id, prompt_token_ids, SamplingParams, tag, precision, stream)
                 ("abort", request_id)
Engine → client: ("out", request_id, RequestOutput)      # the last one has finished=True
                 ("err", request_id, exception)          # the request ended with this error
"""
from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass

TOKEN_BYTES = 16
HELLO_TIMEOUT_S = 5.0           # a connection that does not present the token in time is closed
MAX_FRAME_BYTES = 64 << 20      # a prompt of a million token ids pickles to ~5 MB
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class EngineAddress:
    """Where an engine process listens (returned by `Router.engine_address`)."""
    host: str
    port: int
    token: bytes                # TOKEN_BYTES: the first bytes a connection must send
    pid: int                    # the engine process, to tell a restarted one from the old


class FrameError(ConnectionError):
    """A frame that cannot be one of ours: the connection is dropped."""


def encode(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple:
    """The next message; IncompleteReadError at EOF, FrameError on nonsense."""
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes (limit {MAX_FRAME_BYTES})")
    message = pickle.loads(await reader.readexactly(size))
    if not isinstance(message, tuple) or not message:
        raise FrameError("a frame must hold a non-empty tuple")
    return message


def no_delay(writer: asyncio.StreamWriter) -> None:
    """Frames are small and latency-bound: no Nagle delay."""
    if (sock := writer.get_extra_info("socket")) is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def wire_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (the engine's errors keep their fields: sequence.py), else a
    RuntimeError that names it — an error must reach the client, never kill the connection."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:                               # noqa: BLE001 - anything pickle refuses
        return RuntimeError(f"{type(exc).__name__}: {exc}")
