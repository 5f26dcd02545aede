"""Expert placement by measured load (parallel/eplb.py): shards even out, every expert is held, and
serving under a new placement gives the same float32 outputs bit for bit."""
from __future__ import annotations

import pytest
import torch

from serve_app.model import load_model
from serve_app.parallel.eplb import balance, imbalance, round_robin
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.socket_plane import SocketTransport
from tests.helpers.checkpoints import build_checkpoint
from tests.helpers.engines import threads_of_a_new_thread
from tests.unit.test_socket_plane import ControlPlane, _servers

@pytest.fixture(autouse=True)
def same_gemm_split():
    with threads_of_a_new_thread():    # outputs are compared with the shard servers' threads' sums, bit for bit
        yield


SKEWED = torch.tensor([[100, 1, 1, 1, 100, 1, 1, 1], [5, 5, 5, 5, 5, 5, 5, 5]])


def test_a_skew_that_round_robin_stacks_on_one_shard_is_split_evenly():
    layers = [0, 1]
    before = imbalance(round_robin(layers, 8, 2).shard_load(SKEWED, layers))
    after = imbalance(balance(SKEWED, layers, 2).shard_load(SKEWED, layers))
    assert before[0] > 1.9 and after[0] == pytest.approx(1.0)       # e0 and e4 both landed on shard 0
    assert after[1] == pytest.approx(1.0)


def test_every_expert_is_held_within_the_slots_and_spare_slots_replicate_the_hottest():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        num_experts = int(torch.randint(2, 13, (1,), generator=gen))
        shards = int(torch.randint(1, num_experts + 1, (1,), generator=gen))
        spare = int(torch.randint(0, 3, (1,), generator=gen))
        load = (torch.rand(3, num_experts, generator=gen) ** 3 * 1000).round()
        plan = balance(load, [0, 1, 2], shards, spare)
        slots = -(-num_experts // shards) + spare
        for layer in range(3):
            held = [plan.holders[(layer, e)] for e in range(num_experts)]
            assert all(h and len(set(h)) == len(h) for h in held)
            per_shard = [sum(s in h for h in held) for s in range(shards)]
            assert max(per_shard) <= slots
        assert torch.allclose(plan.shard_load(load, [0, 1, 2]).sum(1), load.sum(1).double())
    hot = torch.tensor([[1000, 1, 1, 1]])
    assert balance(hot, [0], 2, spare_slots=1).holders[(0, 0)] == (0, 1)
    with pytest.raises(ValueError, match="replicated"):
        balance(hot, [0], 2, spare_slots=1).layout()


def test_serving_under_the_balanced_placement_is_bit_identical(tmp_path):
    ckpt = build_checkpoint(tmp_path, "mixtral", num_local_experts=8)
    whole = load_model(ckpt.path)
    layers = list(whole.config.moe_layers)
    load = torch.tensor([[40, 1, 2, 3, 50, 6, 7, 8]] * len(layers))
    plan = PlacementPlan.from_layout(whole.config, balance(load, layers, 2).layout())
    assert plan.owner() != PlacementPlan.round_robin(whole.config, 2).owner()     # a real re-placement
    servers = _servers(ckpt.path, plan)
    transport = SocketTransport([ControlPlane(s) for s in servers], plan, timeout_s=10)
    x = torch.randn(37, whole.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in layers:
        dispatch = whole.layers[layer].mlp.plan(x)
        got, want = transport.run_experts(x, dispatch), whole.local_experts.run_experts(x, dispatch)
        assert got.keys() == want.keys() and all(torch.equal(got[e], want[e]) for e in got)
    transport.close()
