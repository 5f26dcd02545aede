"""Every expert transport over real ExpertShard replicas equals the local experts in float32,
with 1, 2 and 4 shards: the socket data plane and Serve handles, from the driver."""
from __future__ import annotations

import pytest
import torch

from serve_app.config import AppConfig
from serve_app.model import load_model
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.socket_plane import SocketTransport
from serve_app.parallel.transport import ServeTransport
from tests.helpers.checkpoints import build_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("transports"), "qwen2_moe", num_local_experts=8).path


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_socket_and_serve_transports_equal_local_experts(ray_cluster, checkpoint, num_shards):
    from ray import serve

    from serve_app.deployments.expert_shard import ExpertShard

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Holder:                      # the app's ingress: it takes the session's direct-ingress port
        def __init__(self, *shards):
            from serve_app.deployments.direct_ingress import allow_rebind

            allow_rebind()             # as the Ingress does, or a port in TIME_WAIT is lost to later modules
            self.shards = shards

    whole = load_model(checkpoint)
    # The shards compute with the serving processes' thread count; a GEMM's float sums depend on
    # how it is split over threads, so the reference runs with the same count.
    threads = torch.get_num_threads()
    torch.set_num_threads(AppConfig().torch_threads)
    plan = PlacementPlan.round_robin(whole.config, num_shards)
    name = f"transports-{num_shards}"
    shards = [ExpertShard.options(name=f"ExpertShard{s.index}", ray_actor_options={"num_cpus": 0.1})
              .bind(str(checkpoint), s, "float32") for s in plan.shards]
    serve.run(Holder.bind(*shards), name=name, route_prefix=None)
    try:
        handles = [serve.get_deployment_handle(f"ExpertShard{i}", app_name=name) for i in range(num_shards)]
        transports = {"socket": SocketTransport(handles, plan, timeout_s=60),
                      "serve": ServeTransport(handles, plan, timeout_s=60)}
        gen = torch.Generator().manual_seed(num_shards)
        for rows in (1, 7, 64):
            x = torch.randn(rows, whole.config.hidden_size, generator=gen)
            for layer in (l for l in whole.layers if hasattr(l.mlp, "plan")):
                dispatch = layer.mlp.plan(x)
                want = whole.local_experts.run_experts(x, dispatch)
                for kind, transport in transports.items():
                    got = transport.run_experts(x, dispatch)
                    assert got.keys() == want.keys(), kind
                    assert all(torch.equal(got[e], want[e]) for e in want), f"{kind}, {num_shards} shards"
        transports["socket"].close()
    finally:
        torch.set_num_threads(threads)
        serve.delete(name)
