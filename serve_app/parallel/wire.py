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
import time
from dataclasses import dataclass

import torch

from serve_app.parallel.transport import ShardRequest

MAGIC = 0x4D6F4531                                   # "MoE1": a stray connection fails fast
# magic, seq, layer, experts N, rows R, cols D, dtype code
REQUEST = struct.Struct("<IQiIIIB")
# magic, seq, status, rows R (or message bytes), cols D, dtype code
RESPONSE = struct.Struct("<IQBIIB")
OK, ERROR = 0, 1
TOKEN_BYTES = 16                                     # the hello a client sends first (shard's secret)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
# Sanity bounds on a header read from the wire (a frame is allocated before it is read).
MAX_ELEMENTS = 1 << 26                              # 256 MB of float32 rows
MAX_EXPERTS = 1 << 16


class WireError(Exception):
    """The peer sent something that is not a frame of this protocol (not retried: asking again
    would get the same). A peer that closed mid-frame raises ConnectionResetError."""


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


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), deadline)
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view`; with a `deadline` (time.perf_counter()) the whole frame must arrive by then,
    not each piece within a timeout of its own."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError("the frame did not arrive before the layer's deadline")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("connection closed by the peer")
        got += n


def _recv_rows(sock: socket.socket, rows: int, cols: int, dtype: torch.dtype,
               deadline: float | None = None) -> torch.Tensor:
    out = torch.empty(rows, cols, dtype=dtype)      # [R, D]
    if out.numel():
        recv_into_exact(sock, _raw(out), deadline)
    return out


def send_request(sock: socket.socket, seq: int, req: ShardRequest) -> None:
    x = req.x.contiguous().cpu()                     # a Router on GPU: the rows cross through the host
    ids = torch.tensor(list(req.experts) + list(req.counts), dtype=torch.int32)     # [2N]
    head = REQUEST.pack(MAGIC, seq, req.layer, len(req.experts), x.shape[0], x.shape[1], CODE[x.dtype])
    send_parts(sock, [head, _raw(ids), _raw(x)])


def recv_request(sock: socket.socket) -> Frame:
    magic, seq, layer, n, rows, cols, code = REQUEST.unpack(recv_exact(sock, REQUEST.size))
    if magic != MAGIC or code >= len(DTYPES) or rows * cols > MAX_ELEMENTS or n > MAX_EXPERTS:
        raise WireError("not a moe-serve shard request")
    ids = torch.frombuffer(recv_exact(sock, 8 * n), dtype=torch.int32) if n else torch.empty(0, dtype=torch.int32)
    experts, counts = ids[:n].tolist(), ids[n:].tolist()
    if sum(counts) != rows or min(counts, default=0) < 0:
        raise WireError(f"the request's counts {counts} do not add up to its {rows} rows")
    return Frame(seq, ShardRequest(layer, experts, counts, _recv_rows(sock, rows, cols, DTYPES[code])))


def send_response(sock: socket.socket, seq: int, y: torch.Tensor) -> None:
    y = y.contiguous().cpu()
    send_parts(sock, [RESPONSE.pack(MAGIC, seq, OK, y.shape[0], y.shape[1], CODE[y.dtype]), _raw(y)])


def send_error(sock: socket.socket, seq: int, message: str) -> None:
    data = message.encode("utf-8", "replace")[:4096]
    send_parts(sock, [RESPONSE.pack(MAGIC, seq, ERROR, len(data), 0, 0), data])


def recv_response(sock: socket.socket, seq: int, like: torch.Tensor, deadline: float) -> torch.Tensor:
    """The answer to request `seq`, shaped and typed like its rows `like` [R, D], whole by
    `deadline`; a shard-side error raises RuntimeError."""
    magic, got_seq, status, rows, cols, code = RESPONSE.unpack(recv_exact(sock, RESPONSE.size, deadline))
    if magic != MAGIC or got_seq != seq:
        raise WireError(f"unexpected answer (seq {got_seq}, waiting for {seq})")
    if status == ERROR:
        raise RuntimeError("shard failed: " + recv_exact(sock, min(rows, 4096), deadline).decode("utf-8", "replace"))
    if (rows, cols) != tuple(like.shape) or code != CODE[like.dtype]:
        raise WireError(f"the answer is [{rows}, {cols}] of dtype code {code}, the request was "
                        f"{list(like.shape)} {like.dtype}")
    return _recv_rows(sock, rows, cols, like.dtype, deadline)
