"""The engine process: the Router's lanes in a process of their own, serving request connections.

Started by `host.EngineHost` as `python -m serve_app.hosting.engine_process <fd>`, fd = its end of
the control pipe. The first message on the pipe is the spec; the process builds the lanes, listens
on a port of its node, answers ("ready", PlaneAddress) and then serves until the pipe closes (the
Router replica is gone: so is everything it started).

Threads here: the engines' step loops, this asyncio loop (request connections: a few frames per
request) and the control pipe's reader — no Ray machinery, so the steps have the GIL to themselves
as in the embedded server.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import sys
import traceback
from contextlib import aclosing
from multiprocessing.connection import Connection

from serve_app.engine.lanes import Lanes
from serve_app.engine.sequence import RequestRejectedError
from serve_app.hosting.channel import Channel, ChannelClosedError
from serve_app.hosting.frames import FrameError, encode, no_delay, read_frame, wire_error
from serve_app.hosting.spec import RouterEngineSpec, build_router_lanes, kv_usage
from serve_app.metrics import EngineMetricsObserver, MetricsRelay
from serve_app.parallel.socket_plane import HELLO_TIMEOUT_S, PlaneAddress
from serve_app.parallel.wire import TOKEN_BYTES

log = logging.getLogger(__name__)

TICK_S = 0.25       # how often metrics and the lanes' health go to the replica


class EngineServer:
    """Request connections → the lanes. One task per request; a connection that closes aborts its
    requests (their KV is freed), as a client that goes away does."""

    def __init__(self, lanes: Lanes, channel: Channel, relay: MetricsRelay):
        self.lanes, self.channel, self.relay = lanes, channel, relay
        self.token = secrets.token_bytes(TOKEN_BYTES)

    async def run(self, conn: Connection, host: str) -> None:
        server = await asyncio.start_server(self._serve, host, 0)
        port = server.sockets[0].getsockname()[1]
        conn.send(("ready", PlaneAddress(host, port, self.token, os.getpid())))
        self.channel.start()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                self.channel.notify("tick", self.relay.drain(), self.lanes.dead_lanes())
        except ChannelClosedError:
            pass                                    # the replica is gone; main() exits
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        no_delay(writer)
        tasks: dict[str, asyncio.Task] = {}
        try:
            hello = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), HELLO_TIMEOUT_S)
            if not hmac.compare_digest(hello, self.token):
                return
            while True:
                message = await read_frame(reader)
                if message[0] == "gen" and len(message) == 7:
                    self._start(tasks, writer, *message[1:])
                elif message[0] == "abort" and len(message) == 2:
                    if (task := tasks.get(message[1])) is not None:
                        task.cancel()
                else:
                    raise FrameError(f"unknown message {message[0]!r}")
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass                                    # the client went away
        except Exception:                           # noqa: BLE001 - a frame that unpickles to nonsense
            log.exception("request connection dropped")
        finally:
            for task in list(tasks.values()):
                task.cancel()                       # their generators abort the requests
            writer.close()

    def _start(self, tasks: dict, writer, request_id, prompt_token_ids, params, tag, precision, stream) -> None:
        if request_id in tasks:
            writer.write(encode(("err", request_id,
                                 RequestRejectedError(f"request id {request_id!r} is already in use"))))
            return
        task = asyncio.create_task(self._generate(writer, request_id, prompt_token_ids, params, tag, precision,
                                                  stream))
        tasks[request_id] = task
        task.add_done_callback(lambda t: tasks.pop(request_id, None) if tasks.get(request_id) is t else None)

    async def _generate(self, writer, request_id, prompt_token_ids, params, tag, precision, stream) -> None:
        # aclosing: a cancel or a dead connection while this task waits on drain() must still close the
        # generator now, which aborts the request and frees its KV.
        try:
            async with aclosing(self.lanes.generate(request_id, prompt_token_ids, params, tag, precision,
                                                    stream)) as outputs:
                async for out in outputs:
                    writer.write(encode(("out", request_id, out)))
                    await writer.drain()
        except ConnectionError:
            pass                                    # nobody to tell; the generator aborted the request
        except Exception as exc:                    # noqa: BLE001 - the client gets every error
            writer.write(encode(("err", request_id, wire_error(exc))))


def _build(spec: RouterEngineSpec, channel: Channel, relay: MetricsRelay) -> Lanes:
    from serve_app.parallel.socket_plane import SocketTransport

    def resolve(shard: int, timeout_s: float):
        # The replica asks the shard's Serve handle (Ray lives there, not here).
        return channel.call("data_plane", shard, timeout_s, timeout=timeout_s + 1.0)

    def transport_for(on_dispatch):
        return SocketTransport((), spec.placement, timeout_s=spec.dispatch_timeout_s, on_dispatch=on_dispatch,
                               resolve=resolve)

    return build_router_lanes(spec, EngineMetricsObserver(relay), transport_for)


def main(fd: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    conn = Connection(fd)
    _, spec, host = conn.recv()
    handlers: dict = {}
    # Pipe EOF = the Router replica died or shut down: nothing may outlive it.
    channel = Channel(conn, handlers, on_close=lambda: os._exit(0), name="engine")
    relay = MetricsRelay()
    try:
        spec.process.apply()
        lanes = _build(spec, channel, relay)
    except BaseException:                           # noqa: BLE001 - the replica raises it
        conn.send(("failed", traceback.format_exc()))
        return
    handlers["kv_usage"] = lambda: kv_usage(lanes)
    asyncio.run(EngineServer(lanes, channel, relay).run(conn, host))
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
