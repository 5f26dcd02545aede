"""Precision lanes: two engine loops over one model, the fast one first.

The *fast* lane serves quantized requests (INT4/INT8 experts held in this process: inline
completions), the *full* lane full-precision ones (experts on the shards under Ray: complex
requests). Separate batches keep a simple request out of a step that waits on shard round trips or
prefills a long prompt; the `LaneGate` keeps the full lane from taking the CPU/GPU while the fast
lane has work (engine/priority.py). Without quantized precisions there is one lane, "full".

`Lanes` looks like one `AsyncEngine` to its callers (generate / abort / alive / shutdown), so the
Ray Router and the embedded server run the same lanes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

from serve_app.config import EngineConfig
from serve_app.engine.async_engine import AsyncEngine
from serve_app.engine.core import EngineCore
from serve_app.engine.priority import LaneGate
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import RequestOutput


def lane_configs(cfg: EngineConfig, fast_fraction: float, with_fast_lane: bool) -> dict[str, EngineConfig]:
    """Split the KV blocks between the lanes (exactly: the totals add up to cfg.num_kv_blocks)."""
    if not with_fast_lane:
        return {"full": cfg}
    fast = max(1, int(cfg.num_kv_blocks * fast_fraction))
    return {"fast": replace(cfg, num_kv_blocks=fast), "full": replace(cfg, num_kv_blocks=cfg.num_kv_blocks - fast)}


class Lanes:
    def __init__(self, model, cfg: EngineConfig, tokenizer, observer=None, fast_kv_fraction: float = 0.5,
                 full_lane_max_defer_s: float = 1.0):
        """`observer`: an EngineMetricsObserver (its per-lane view is used) or None."""
        configs = lane_configs(cfg, fast_kv_fraction, with_fast_lane=len(model.precisions) > 1)
        self.gate = LaneGate(full_lane_max_defer_s) if len(configs) > 1 and full_lane_max_defer_s > 0 else None
        # The fast lane computes in the dtype its quantized weights were packed for (bf16 where the
        # packed kernels are fast); the full lane in the weights' own dtype.
        dtypes = {"fast": model.reduced_dtype, "full": None}
        self.engines = {name: AsyncEngine(EngineCore(model, lane_cfg, tokenizer,
                                                     observer=observer.lane(name) if observer else None,
                                                     dtype=dtypes[name]),
                                          gate=self.gate, priority=name == "fast")
                        for name, lane_cfg in configs.items()}

    def engine_for(self, precision: str) -> AsyncEngine:
        # Without a fast lane a quantized request goes to the full lane, whose engine rejects it (400).
        return self.engines.get("full" if precision == "full" else "fast", self.engines["full"])

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       tag: str = "", precision: str = "full", stream: bool = True) -> AsyncIterator[RequestOutput]:
        async for out in self.engine_for(precision).generate(request_id, prompt_token_ids, params, tag, precision,
                                                             stream):
            yield out

    async def abort(self, request_id: str) -> None:
        for engine in self.engines.values():     # ids are unique across lanes; unknown ids are ignored
            await engine.abort(request_id)

    @property
    def max_model_len(self) -> int:
        return self.engines["full"].core.max_model_len

    @property
    def alive(self) -> bool:
        return all(engine.alive for engine in self.engines.values())

    def dead_lanes(self) -> list[str]:
        return [name for name, engine in self.engines.items() if not engine.alive]

    def snapshot(self, fn) -> list:
        """fn(core) under each lane's lock, one result per lane."""
        return [engine.snapshot(fn) for engine in self.engines.values()]

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()
