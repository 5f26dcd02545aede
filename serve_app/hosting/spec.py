"""What a Router's engine is built from, and the one builder both hostings use.

`RouterEngineSpec` crosses from `build_app` to the Router replica (through Serve) and from the
replica to its engine process (pickled over the control pipe); `build_router_lanes` turns it into
the precision lanes wherever the engine runs — the replica itself (`engine_host: replica`, the
Serve-handle data plane needs Ray in the engine's process) or its child (`engine_host: process`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from serve_app.config import EngineConfig, ProcessSettings
from serve_app.engine.lanes import Lanes
from serve_app.model import PartitionedBackend, load_expert_weights, load_model
from serve_app.model.precision import add_quantized_lanes, fast_dtype
from serve_app.parallel.placement import PlacementPlan


@dataclass
class RouterEngineSpec:
    """The Router's engine: model, placement and engine knobs (AppConfig's fields of the same names)."""
    model_dir: str
    placement: PlacementPlan                # which experts are local, which shard owns the rest
    engine_config: EngineConfig
    process: ProcessSettings                # threads and GIL switch interval of the engine's process
    dtype: str = "float32"                  # full precision ("auto" already resolved by build_app)
    dispatch_timeout_s: float = 10.0
    quantized_precisions: tuple[str, ...] = ()
    int4_group_size: int = 64
    fast_lane_kv_fraction: float = 0.5
    quant_materialize: bool | str = "auto"
    full_lane_max_defer_s: float = 1.0
    fast_lane_dtype: str = "auto"
    device: str = "cpu"                     # set by the replica: "cuda" when Ray gave it a GPU


# on_dispatch → the ExpertBackend that reaches the shards (a transport of serve_app/parallel).
TransportFactory = Callable[[Callable], object]


def build_router_lanes(spec: RouterEngineSpec, observer, transport_for: TransportFactory) -> Lanes:
    """Tiered placement (DESIGN.md §3): quantized copies (INT8/INT4) of every expert stay here, so
    simple requests never leave this process; full-precision experts are the local ones plus the
    shards' (reached by `transport_for(observer.on_dispatch)`)."""
    from serve_app.tokenizer import CodeTokenizer

    model = load_model(spec.model_dir, dtype=spec.dtype, expert_ids=spec.placement.local, device=spec.device)
    if spec.placement.num_shards:
        model.set_expert_backend(PartitionedBackend([model.local_experts, transport_for(observer.on_dispatch)]))
    if spec.quantized_precisions:
        # Quantized at load time from the checkpoint's float experts, which are then dropped.
        every_expert = load_expert_weights(spec.model_dir, None, dtype=spec.dtype, device=spec.device)
        add_quantized_lanes(model, every_expert, spec.quantized_precisions, spec.int4_group_size,
                            fast_dtype(spec.fast_lane_dtype), spec.quant_materialize)
        del every_expert
    return Lanes(model, spec.engine_config, CodeTokenizer.from_dir(spec.model_dir), observer,
                 spec.fast_lane_kv_fraction, spec.full_lane_max_defer_s)


def kv_usage(lanes: Lanes) -> dict:
    """KV blocks and live requests, summed over the lanes."""
    per_lane = lanes.snapshot(lambda core: (core.blocks.num_used_blocks, core.blocks.num_free_blocks,
                                            len(core.requests)))
    return {"used_blocks": sum(p[0] for p in per_lane), "free_blocks": sum(p[1] for p in per_lane),
            "requests": sum(p[2] for p in per_lane)}
