"""`build_app(config)`: the Serve application graph — Ingress → Router → ExpertShard0..N-1.

Usable from Python (`serve.run(build_app({...}))`), from `serve run serve_app:build_app key=value`
and from a Serve config YAML (`import_path: serve_app.deployments.app:build_app`, `args: {...}`).
"""
from __future__ import annotations

from typing import Any, Mapping

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppConfig
from serve_app.deployments.expert_shard import ExpertShard
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.prefix_routing import PrefixAffinityRouter
from serve_app.deployments.router import Router
from serve_app.hosting.spec import RouterEngineSpec
from serve_app.model import ModelConfig
from serve_app.model.loader import resolve_dtype
from serve_app.parallel.placement import PlacementPlan


def placement_for(config: AppConfig) -> PlacementPlan:
    cfg = ModelConfig.from_dir(config.model)
    if config.placement is not None:
        return PlacementPlan.from_layout(cfg, config.placement)
    return PlacementPlan.round_robin(cfg, config.expert_shards)


def _gpus(value: float | str) -> float:
    """A GPU ask: explicit, or for "auto" one GPU when the cluster has any (so the Router and each
    shard land on GPUs of their own), else none."""
    if value != "auto":
        return float(value)
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if has_gpus else 0.0


def router_actor_options(config: AppConfig) -> dict:
    gpus = _gpus(config.router_num_gpus)
    return {"num_cpus": 0.1, **({"num_gpus": gpus} if gpus else {})}


def router_routing(config: AppConfig) -> dict:
    """`Deployment.options` for how the Ingress picks among Router replicas (Serve's default for
    'power_of_two'); the affinity is by the engine's KV block size, the unit its cache reuses."""
    if config.router_routing == "power_of_two":
        return {}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"block_size": config.engine_config().block_size})}


def build_app(config: AppConfig | Mapping[str, Any] | None = None) -> Application:
    config = config if isinstance(config, AppConfig) else AppConfig(**(config or {}))
    plan = placement_for(config)
    gpus = _gpus(config.shard_num_gpus)
    # CPU shards ask for a fraction of a CPU: on a laptop the whole graph must fit on 2 cores.
    shard_resources = {"num_gpus": gpus} if gpus else {"num_cpus": 0.1}
    if config.shard_resources:
        shard_resources["resources"] = dict(config.shard_resources)
    # "auto" is resolved once, here, so the router and every shard compute full precision in the
    # same dtype (shards also cast what they receive, so a mismatch is slow, never wrong).
    dtype = str(resolve_dtype(config.dtype, config.model)).removeprefix("torch.")
    shards = [ExpertShard.options(name=f"ExpertShard{spec.index}", ray_actor_options=shard_resources,
                                  **config.replicas("expert_shard"))
              .bind(config.model, spec, dtype, config.process_settings()) for spec in plan.shards]
    spec = RouterEngineSpec(
        config.model, plan, config.engine_config(), config.process_settings(), dtype, config.dispatch_timeout_s,
        tuple(config.quantized_precisions), config.int4_group_size, config.fast_lane_kv_fraction,
        config.quant_materialize, config.full_lane_max_defer_s, config.fast_dtype)
    router = Router.options(ray_actor_options=router_actor_options(config), **config.replicas("router"),
                            **router_routing(config)).bind(
        spec, shards, config.expert_transport, config.resolved_engine_host(), config.single_replicas())
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}, **config.replicas("ingress")).bind(router, config)
