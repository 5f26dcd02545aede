"""ServeTransport over real Serve deployments whose answers are delayed on purpose.

One layer's shard calls share one deadline (a layer waits at most `timeout_s`, not `timeout_s`
per shard), each shard's recorded round trip is its own (not its own plus the slower shards'
before it), and a failed layer cancels the calls still running.
"""
from __future__ import annotations

import time

import pytest
import torch

from serve_app.model import ModelConfig
from serve_app.model.moe import DispatchPlan, ExpertAssignment
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.transport import ServeTransport, ShardUnavailableError

pytestmark = pytest.mark.integration
D = 8


def _cfg() -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="mixtral", vocab_size=10, hidden_size=D, num_hidden_layers=1,
                                    num_attention_heads=2, num_experts_per_tok=1, num_local_experts=3,
                                    intermediate_size=4))


@pytest.fixture(scope="module")
def slow_shards(ray_cluster):
    """Three deployments speaking ExpertShard's `run` protocol: shard i answers its rows × 2 after
    delays[i] seconds, and counts the calls it finished."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.1})
    class DelayedShard:
        def __init__(self, delay_s: float):
            self.delay_s, self.finished = delay_s, 0

        async def run(self, req):
            import asyncio
            await asyncio.sleep(self.delay_s)
            self.finished += 1
            return req.x * 2

        def count(self) -> int:
            return self.finished

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Holder:                      # the app's ingress: it takes the session's direct-ingress port
        def __init__(self, *shards):
            from serve_app.deployments.direct_ingress import allow_rebind

            allow_rebind()             # as the Ingress does, or a port in TIME_WAIT is lost to later modules
            self.shards = shards

    shards = [DelayedShard.options(name=f"DelayedShard{i}").bind(delay) for i, delay in enumerate((0.6, 0.0, 1.6))]
    serve.run(Holder.bind(*shards), name="delayed-shards", route_prefix=None)
    handles = [serve.get_deployment_handle(f"DelayedShard{i}", app_name="delayed-shards") for i in range(3)]
    # A new handle's first call waits ~1 s to learn the replicas: one warm-up layer first.
    ServeTransport(handles, PlacementPlan.round_robin(_cfg(), 3), timeout_s=30).run_experts(*_plan([0, 1, 2]))
    yield handles
    serve.delete("delayed-shards")


def _plan(shards: list[int]) -> tuple[torch.Tensor, DispatchPlan]:
    x = torch.arange(len(shards) * D, dtype=torch.float32).reshape(len(shards), D)
    assignments = [ExpertAssignment(e, torch.tensor([row]), torch.ones(1)) for row, e in enumerate(shards)]
    ids = torch.tensor([[e] for e in shards])
    return x, DispatchPlan(0, len(shards), ids, torch.ones(len(shards), 1), torch.zeros(len(shards), 3), assignments)


def test_each_shard_is_timed_on_its_own(slow_shards):
    records = []
    transport = ServeTransport(slow_shards, PlacementPlan.round_robin(_cfg(), 3), timeout_s=10,
                               on_dispatch=records.append)
    x, plan = _plan([0, 1])                 # the slow shard 0 is asked first
    out = transport.run_experts(x, plan)
    assert torch.equal(out[0], x[:1] * 2) and torch.equal(out[1], x[1:] * 2)
    seconds = {r.shard: r.seconds for r in records}
    assert seconds[1] < 0.4 < 0.6 <= seconds[0]     # shard 1 did not wait for shard 0


def test_a_layer_waits_at_most_the_timeout_in_all_and_cancels_the_rest(slow_shards):
    transport = ServeTransport(slow_shards, PlacementPlan.round_robin(_cfg(), 3), timeout_s=1.0)
    x, plan = _plan([0, 1, 2])              # 0.6 s and 1.6 s: each under 1 s alone after the first
    before = slow_shards[2].count.remote().result(timeout_s=10)
    started = time.perf_counter()
    with pytest.raises(ShardUnavailableError, match="expert shard 2") as exc:
        transport.run_experts(x, plan)
    assert 0.9 < time.perf_counter() - started < 1.5     # one deadline, not 0.6 + 1.0
    assert exc.value.shard == 2
    time.sleep(1.0)                                      # past shard 2's delay: had it run, it would be done
    assert slow_shards[2].count.remote().result(timeout_s=10) == before      # its call was cancelled
