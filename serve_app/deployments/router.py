"""Router deployment: one replica = the engines (continuous batching, KV cache, dense layers and
every MoE gate) and the routing of each token's rows to the experts the gate picked.

Tiered placement (adaptive precision meets expert parallelism, DESIGN.md §3): the router holds
quantized copies (INT8/INT4) of all experts, so simple and medium requests never leave this
process; full-precision experts live on the ExpertShard deployments (and any the placement keeps
local), so complex requests use expert parallelism.

Two lanes, two engines over one model (engine/lanes.py): the "fast" lane serves quantized
requests, the "full" lane full-precision ones, so a simple request never waits in a batch that
waits on shard round trips, and the full lane yields the CPU/GPU to the fast one
(`full_lane_max_defer_s` bounds how long).

Where the engine runs (`engine_host`, serve_app/hosting): by default inside this replica; with
`engine_host: process` in a child process of it, which this replica then only starts and
supervises (it tells clients where the engine listens and relays metrics and the shards' control
plane).
"""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator

import ray
import torch
from ray import serve

from serve_app.engine import RequestOutput, SamplingParams
from serve_app.hosting.host import EngineHost
from serve_app.hosting.spec import RouterEngineSpec, build_router_lanes, kv_usage
from serve_app.metrics import EngineMetricsObserver, Metrics
from serve_app.parallel.socket_plane import PlaneAddress, SocketTransport
from serve_app.parallel.transport import ServeTransport


@serve.deployment(name="Router", max_ongoing_requests=1024, health_check_period_s=2,
                  health_check_timeout_s=10)
class Router:
    def __init__(self, spec: RouterEngineSpec, shards: list, expert_transport: str = "socket",
                 engine_host: str = "replica"):
        spec.process.apply()
        # A Router given a GPU by Ray runs its dense layers, KV cache and quantized experts there.
        spec = replace(spec, device="cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.shards = shards
        self.host: EngineHost | None = None
        self.lanes = None
        if engine_host == "process":
            self.host = EngineHost(spec, shards, Metrics("ray"), ray.util.get_node_ip_address())
            return
        observer = EngineMetricsObserver(Metrics("ray"))
        kind = SocketTransport if expert_transport == "socket" else ServeTransport
        self.lanes = build_router_lanes(spec, observer, lambda on_dispatch: kind(
            shards, spec.placement, timeout_s=spec.dispatch_timeout_s, on_dispatch=on_dispatch))

    def engine_address(self) -> PlaneAddress:
        """Where this replica's engine process listens (the control plane of hosting.client)."""
        if self.host is None:
            raise RuntimeError("this Router runs its engine in the replica (engine_host 'replica')")
        return self.host.address

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        """engine_host 'replica' only. stream=False yields only the finished output: one Ray message
        per request instead of one per token (measured in docs/benchmarks.md, "final-only")."""
        if self.lanes is None:
            raise RuntimeError("this Router's engine runs in its own process: connect to engine_address()")
        async for out in self.lanes.generate(request_id, prompt_token_ids, params, tag, precision, stream):
            yield out

    async def abort(self, request_id: str) -> None:
        if self.lanes is not None:
            await self.lanes.abort(request_id)

    def check_health(self) -> None:
        """Serve's own health check: only this replica's engines. A dead shard is Serve's job to
        restart; restarting the router for it would kill every request in flight."""
        if self.host is not None:
            self.host.raise_if_down()
        elif dead := self.lanes.dead_lanes():
            raise RuntimeError(f"engine loop not running in lanes {dead}")

    async def health(self, timeout_s: float = 5.0) -> list[dict]:
        """For /health: the engines run and every shard answers within timeout_s."""
        self.check_health()
        return list(await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self.shards)),
                                           timeout=timeout_s))

    async def kv_usage(self) -> dict:
        """KV blocks and live requests, summed over the lanes."""
        if self.host is not None:
            return await asyncio.to_thread(self.host.kv_usage)
        return kv_usage(self.lanes)

    def __del__(self):
        if getattr(self, "host", None) is not None:
            self.host.close()
