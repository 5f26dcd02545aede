"""Frames on a request connection (Ingress ⇄ engine process).

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
import struct

from serve_app.parallel.socket_plane import tune

MAX_FRAME_BYTES = 64 << 20      # a prompt of a million token ids pickles to ~5 MB
_LEN = struct.Struct(">I")


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
    """The data plane's socket options (no Nagle delay, keepalive probes) on a stream's socket."""
    if (sock := writer.get_extra_info("socket")) is not None:
        tune(sock)


def wire_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (the engine's errors keep their fields: sequence.py), else a
    RuntimeError that names it — an error must reach the client, never kill the connection."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:                               # noqa: BLE001 - anything pickle refuses
        return RuntimeError(f"{type(exc).__name__}: {exc}")
