"""Router deployment: one replica = one engine (continuous batching, KV cache, dense layers and
every MoE gate). Experts the placement keeps local run in-process; the rest are reached through
the `serve` transport, one concurrent call per shard per MoE layer."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve

from serve_app.config import EngineConfig
from serve_app.engine import AsyncEngine, EngineCore, RequestOutput, SamplingParams
from serve_app.metrics import EngineMetricsObserver, Metrics
from serve_app.model import PartitionedBackend, load_model
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.transport import ServeTransport
from serve_app.tokenizer import CodeTokenizer


@serve.deployment(name="Router", max_ongoing_requests=1024, health_check_period_s=2,
                  health_check_timeout_s=10)
class Router:
    def __init__(self, model_dir: str, placement: PlacementPlan, engine_config: EngineConfig,
                 shards: list, dtype: str = "float32", dispatch_timeout_s: float = 10.0):
        model = load_model(model_dir, dtype=dtype, expert_ids=placement.local)
        observer = EngineMetricsObserver(Metrics("ray"))
        if placement.num_shards:
            transport = ServeTransport(shards, placement, timeout_s=dispatch_timeout_s,
                                       on_dispatch=observer.on_dispatch)
            model.set_expert_backend(PartitionedBackend([model.local_experts, transport]))
        self.shards = shards
        core = EngineCore(model, engine_config, CodeTokenizer.from_dir(model_dir), observer=observer)
        self.engine = AsyncEngine(core)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, tag: str = "") -> AsyncIterator[RequestOutput]:
        async for out in self.engine.generate(request_id, prompt_token_ids, params, tag):
            yield out

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def check_health(self) -> None:
        """Serve's own health check: only this replica's engine. A dead shard is Serve's job to
        restart; restarting the router for it would kill every request in flight."""
        if not self.engine.alive:
            raise RuntimeError("engine loop is not running")

    async def health(self, timeout_s: float = 5.0) -> list[dict]:
        """For /health: the engine runs and every shard answers within timeout_s."""
        self.check_health()
        return list(await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self.shards)),
                                           timeout=timeout_s))

    def kv_usage(self) -> dict:
        return self.engine.snapshot(lambda core: {"used_blocks": core.blocks.num_used_blocks,
                                                  "free_blocks": core.blocks.num_free_blocks,
                                                  "requests": len(core.requests)})
