"""The socket data plane's wire format: one frame per shard request and per answer.

Why a format of our own and not pickle: a frame is a fixed header plus the raw bytes of the
rows, so both sides read it with two `recv_into`s into preallocated tensors, bit for bit (any
dtype, bf16 included, travels as its bytes), and nothing a peer sends is ever unpickled.

    request  = REQUEST header | experts [N] int32 | counts [N] int32 | rows [R, D] raw
    response = RESPONSE header | rows [R, D] raw            (status OK)
             | RESPONSE header | message utf-8 [R bytes]     (status ERROR; R = its length)

Legend: N=experts in the request, R=rows, D=hidden.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import torch

from serve_app.parallel.transport import ShardRequest

MAGIC = 0x4D6F4531                                   # "MoE1": a stray connection fails fast
# magic, seq, layer, experts N, rows R, cols D, dtype code
REQUEST = struct.Struct("<IQiIIIB")
# magic, seq, status, rows R (or message bytes), cols D
RESPONSE = struct.Struct("<IQBII")
OK, ERROR = 0, 1
TOKEN_BYTES = 16                                     # the hello a client sends first (shard's secret)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
MAX_ROWS = 1 << 24                                   # sanity bound on a header read from the wire


class WireError(ConnectionError):
    """The peer sent something that is not a frame of this protocol, or closed mid-frame."""


@dataclass
class Frame:
    """A decoded request (shard side): its sequence number, to echo, and the work."""
    seq: int
    request: ShardRequest


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (contiguous tensors only; bf16 through a uint8 view)."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def send_parts(sock: socket.socket, parts: list) -> None:
    """All parts in one system call where the kernel takes them (small frames: always)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    sent = sock.sendmsg(views)
    if sent == sum(len(v) for v in views):
        return
    rest = []                                       # a large frame filled the socket buffer
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        rest.append(v[sent:])
        sent = 0
    sock.sendall(b"".join(rest))                    # rare (multi-MB prefill chunks); a copy is fine


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WireError("connection closed by the peer")
        got += n


def _recv_rows(sock: socket.socket, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=dtype)      # [R, D]
    if out.numel():
        recv_into_exact(sock, _raw(out))
    return out


def send_request(sock: socket.socket, seq: int, req: ShardRequest) -> None:
    x = req.x.contiguous().cpu()                     # a Router on GPU: the rows cross through the host
    ids = torch.tensor(list(req.experts) + list(req.counts), dtype=torch.int32)     # [2N]
    head = REQUEST.pack(MAGIC, seq, req.layer, len(req.experts), x.shape[0], x.shape[1], CODE[x.dtype])
    send_parts(sock, [head, _raw(ids), _raw(x)])


def recv_request(sock: socket.socket) -> Frame:
    magic, seq, layer, n, rows, cols, code = REQUEST.unpack(recv_exact(sock, REQUEST.size))
    if magic != MAGIC or code >= len(DTYPES) or rows > MAX_ROWS or cols > MAX_ROWS or n > MAX_ROWS:
        raise WireError("not a moe-serve shard request")
    ids = torch.frombuffer(recv_exact(sock, 8 * n), dtype=torch.int32) if n else torch.empty(0, dtype=torch.int32)
    x = _recv_rows(sock, rows, cols, DTYPES[code])
    return Frame(seq, ShardRequest(layer, ids[:n].tolist(), ids[n:].tolist(), x))


def send_response(sock: socket.socket, seq: int, y: torch.Tensor) -> None:
    y = y.contiguous().cpu()
    send_parts(sock, [RESPONSE.pack(MAGIC, seq, OK, y.shape[0], y.shape[1]), _raw(y)])


def send_error(sock: socket.socket, seq: int, message: str) -> None:
    data = message.encode("utf-8", "replace")[:4096]
    send_parts(sock, [RESPONSE.pack(MAGIC, seq, ERROR, len(data), 0), data])


def recv_response(sock: socket.socket, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """The answer to request `seq` ([R, D] in `dtype`); a shard-side error raises RuntimeError."""
    magic, got_seq, status, rows, cols = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
    if magic != MAGIC or got_seq != seq or rows > MAX_ROWS or cols > MAX_ROWS:
        raise WireError(f"unexpected answer (seq {got_seq}, waiting for {seq})")
    if status == ERROR:
        raise RuntimeError("shard failed: " + recv_exact(sock, rows).decode("utf-8", "replace"))
    return _recv_rows(sock, rows, cols, dtype)
