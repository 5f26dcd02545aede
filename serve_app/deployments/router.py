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
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import ray
import torch
from ray import serve

from serve_app.config import AppConfig, EngineConfig, ProcessSettings
from serve_app.engine import RequestOutput, SamplingParams
from serve_app.engine.lanes import Lanes
from serve_app.metrics import EngineMetricsObserver, Metrics
from serve_app.model import PartitionedBackend, load_expert_weights, load_model
from serve_app.model.precision import add_quantized_lanes, fast_dtype
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.socket_plane import SocketTransport
from serve_app.parallel.transport import ServeTransport
from serve_app.tokenizer import CodeTokenizer


@serve.deployment(name="Router", max_ongoing_requests=1024, health_check_period_s=2,
                  health_check_timeout_s=10)
class Router:
    def __init__(self, model_dir: str, placement: PlacementPlan, engine_config: EngineConfig,
                 shards: list, dtype: str = "float32", dispatch_timeout_s: float = 10.0,
                 expert_transport: str = "socket",
                 quantized_precisions: tuple[str, ...] = (), int4_group_size: int = 64,
                 fast_lane_kv_fraction: float = 0.5, quant_materialize: bool | str = "auto",
                 full_lane_max_defer_s: float = 1.0, fast_lane_dtype: str = "auto",
                 process: ProcessSettings | None = None):
        (process or AppConfig().process_settings()).apply()
        # A Router given a GPU by Ray runs its dense layers, KV cache and quantized experts there.
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        model = load_model(model_dir, dtype=dtype, expert_ids=placement.local, device=device)
        observer = EngineMetricsObserver(Metrics("ray"))
        if placement.num_shards:
            kind = SocketTransport if expert_transport == "socket" else ServeTransport
            transport = kind(shards, placement, timeout_s=dispatch_timeout_s, on_dispatch=observer.on_dispatch)
            model.set_expert_backend(PartitionedBackend([model.local_experts, transport]))
        if quantized_precisions:
            # Quantized at load time from the checkpoint's float experts, which are then dropped.
            every_expert = load_expert_weights(model_dir, None, dtype=dtype, device=device)
            add_quantized_lanes(model, every_expert, quantized_precisions, int4_group_size,
                                fast_dtype(fast_lane_dtype), quant_materialize)
            del every_expert
        tokenizer = CodeTokenizer.from_dir(model_dir)
        self.lanes = Lanes(model, engine_config, tokenizer, observer, fast_lane_kv_fraction, full_lane_max_defer_s)
        self.shards = shards

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        """stream=False yields only the finished output: one Ray message per request instead of
        one per token (measured in docs/benchmarks.md, "final-only")."""
        async for out in self.lanes.generate(request_id, prompt_token_ids, params, tag, precision, stream):
            yield out

    async def abort(self, request_id: str) -> None:
        await self.lanes.abort(request_id)

    def check_health(self) -> None:
        """Serve's own health check: only this replica's engines. A dead shard is Serve's job to
        restart; restarting the router for it would kill every request in flight."""
        if dead := self.lanes.dead_lanes():
            raise RuntimeError(f"engine loop not running in lanes {dead}")

    async def health(self, timeout_s: float = 5.0) -> list[dict]:
        """For /health: the engines run and every shard answers within timeout_s."""
        self.check_health()
        return list(await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self.shards)),
                                           timeout=timeout_s))

    def kv_usage(self) -> dict:
        """KV blocks and live requests, summed over the lanes."""
        per_lane = self.lanes.snapshot(lambda core: (core.blocks.num_used_blocks, core.blocks.num_free_blocks,
                                                     len(core.requests)))
        return {"used_blocks": sum(p[0] for p in per_lane), "free_blocks": sum(p[1] for p in per_lane),
                "requests": sum(p[2] for p in per_lane)}
