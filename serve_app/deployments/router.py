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

Expert placement while serving (`apply_placement`, `rebalance`: parallel/eplb.py): experts move
between the shards, and the hottest may be replicated, without failing a request in flight.

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
from serve_app.model import ModelConfig
from serve_app.parallel.eplb import Balanced, balance, imbalance
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.replacement import apply_placement
from serve_app.parallel.socket_plane import PlaneAddress, SocketTransport
from serve_app.parallel.transport import ServeTransport, ShardTransport


@serve.deployment(name="Router", max_ongoing_requests=1024, health_check_period_s=2,
                  health_check_timeout_s=10)
class Router:
    def __init__(self, spec: RouterEngineSpec, shards: list, expert_transport: str = "socket",
                 engine_host: str = "replica", replaceable: bool = True):
        """`replaceable`: one replica of this Router and of each shard, so `apply_placement` reaches
        every transport and every shard replica (build_app says)."""
        spec.process.apply()
        # A Router given a GPU by Ray runs its dense layers, KV cache and quantized experts there.
        spec = replace(spec, device="cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.shards = shards
        self.host: EngineHost | None = None
        self.lanes = None
        self.spec = spec
        self.transports: list[ShardTransport] = []
        self.replaceable = replaceable
        self._placing = asyncio.Lock()          # one re-placement at a time
        if engine_host == "process":
            self.host = EngineHost(spec, shards, Metrics("ray"), ray.util.get_node_ip_address())
            return
        self.observer = EngineMetricsObserver(Metrics("ray"))
        kind = SocketTransport if expert_transport == "socket" else ServeTransport

        def transport(on_dispatch):
            self.transports.append(kind(shards, spec.placement, timeout_s=spec.dispatch_timeout_s,
                                        on_dispatch=on_dispatch))
            return self.transports[-1]
        self.lanes = build_router_lanes(spec, self.observer, transport)

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

    async def apply_placement(self, layout: dict) -> dict:
        """Serve by a new placement of the same remote experts (`AppConfig.placement`'s layout; an
        expert on several shards is replicated and its rows split between them), with requests in
        flight (parallel/replacement.py). Returns what each shard read and dropped."""
        return await self._apply(PlacementPlan.from_layout(ModelConfig.from_dir(self.spec.model_dir), layout))

    async def _apply(self, new: PlacementPlan) -> dict:
        if not self.transports:
            raise RuntimeError("re-placement needs expert shards and engine_host 'replica'")
        if not self.replaceable:
            # The other Routers would route by the old placement to experts the shards dropped, and
            # a shard call reaches one of its replicas only.
            raise RuntimeError("re-placement needs one Router replica and one replica of each shard")
        async with self._placing:
            return await apply_placement(self.transports, new,
                                         prefetch=lambda shard, keys: self.shards[shard].prefetch.remote(keys),
                                         release=lambda shard, keys: self.shards[shard].release.remote(keys))

    async def rebalance(self, spare_slots: int = 0) -> dict:
        """EPLB from the load the full-precision lane measured since start (its rows are the ones
        that cross to the shards): the placement that evens each layer's tokens per shard
        (`spare_slots` more experts a shard for replicas of the hottest), applied."""
        load = self.observer.expert_load("full") if self.lanes is not None else None
        if load is None or not self.transports:
            raise RuntimeError("rebalancing needs expert shards, engine_host 'replica' and measured load")
        old = self.transports[0].placement
        if old.local:
            raise ValueError("rebalancing places every expert on the shards; this placement keeps some local")
        layers = list(ModelConfig.from_dir(self.spec.model_dir).moe_layers)
        load = load[layers]
        balanced = balance(load, layers, old.num_shards, spare_slots)
        before = imbalance(Balanced(old.holders(), old.num_shards).shard_load(load, layers)).max().item()
        await self._apply(PlacementPlan.from_holders(balanced.holders, old.num_shards))
        return {"max_imbalance_before": before,
                "max_imbalance_after": imbalance(balanced.shard_load(load, layers)).max().item()}

    async def kv_usage(self) -> dict:
        """KV blocks and live requests, summed over the lanes."""
        if self.host is not None:
            return await asyncio.to_thread(self.host.kv_usage)
        return kv_usage(self.lanes)

    def __del__(self):
        if getattr(self, "host", None) is not None:
            self.host.close()

