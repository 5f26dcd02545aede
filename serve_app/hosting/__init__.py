"""The engine in a process of its own (the Router replica's child), reached over a socket.

Why (docs/benchmarks.md, "Editor load through Ray"): inside a Ray Serve replica four Ray/Serve
threads (Serve's asyncio loop, the output serializer pool, the user-code loop, the core worker)
take ~0.5 of a core and, through the GIL, stretched the engine step from 0.81 ms (embedded) to
3.0 ms under the editor load; and each request paid a Serve handle hop (~5 ms). Here the Router
replica only starts and supervises an engine process; the Ingress reaches that process over one
TCP connection, the same pattern as the expert data plane (Serve tells where it listens and a
random token, the bytes go straight).

- `channel.py`: the parent ⇄ child control pipe (calls both ways, one-way notices).
- `frames.py`: length-prefixed frames on the request connection; the address a client is told.
- `spec.py`: what the engine is built from (crosses the process boundary) and the one builder
  the replica-hosted and process-hosted Router share.
- `engine_process.py`: the child: builds the lanes, serves request connections.
- `host.py`: the parent side, in the Router replica: start, supervise, relay metrics and the
  shards' control plane.
- `client.py`: the Ingress side: an `EngineClient` over the connection.
"""
