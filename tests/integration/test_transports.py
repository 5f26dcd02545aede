"""Every expert transport over real ExpertShard replicas equals the local experts in float32,
with 1, 2 and 4 shards: the socket data plane and Serve handles, from the driver."""
from __future__ import annotations

import pytest
import torch

from serve_app.config import AppConfig
from serve_app.model import load_model
from serve_app.parallel.placement import PlacementPlan
from tests.helpers.cluster_transports import compare_transports
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
        assert compare_transports(whole, handles, plan, seed=num_shards, rows=(1, 7, 64)) == \
            {"socket": True, "serve": True}
    finally:
        torch.set_num_threads(threads)
        serve.delete(name)
