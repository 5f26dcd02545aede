"""Placement plans: round-robin and explicit layouts cover every expert exactly once."""
import pytest
import torch

from serve_app.model import ModelConfig, PartitionedBackend, load_expert_weights, load_model
from serve_app.parallel.placement import PlacementError, PlacementPlan
from serve_app.parallel.transport import Replies, ShardRequest, build_requests, run_shard_request
from tests.helpers.checkpoints import build_checkpoint


def _cfg(num_experts=8, layers=2):
    return ModelConfig.from_hf(dict(model_type="mixtral", vocab_size=10, hidden_size=8, num_hidden_layers=layers,
                                    num_attention_heads=2, num_experts_per_tok=2, num_local_experts=num_experts,
                                    intermediate_size=4))


def test_round_robin_spreads_experts_evenly_in_every_layer():
    plan = PlacementPlan.round_robin(_cfg(), 4)
    assert [s.experts for s in plan.shards][1] == ((0, 1), (0, 5), (1, 1), (1, 5))
    owner = plan.owner()
    assert len(owner) == 16 and set(owner.values()) == {0, 1, 2, 3}
    assert plan.local == ()


def test_zero_shards_keeps_everything_local():
    plan = PlacementPlan.round_robin(_cfg(), 0)
    assert plan.num_shards == 0 and len(plan.local) == 16


def test_more_shards_than_experts_is_rejected():
    with pytest.raises(PlacementError, match="exceeds"):
        PlacementPlan.round_robin(_cfg(num_experts=4), 5)


def test_explicit_layout_with_local_experts():
    plan = PlacementPlan.from_layout(_cfg(), {"0": [0, 1, 2], "1": [[0, 3], [1, 3], 4, 5], "local": [6, 7]})
    assert plan.num_shards == 2
    assert (1, 3) in plan.shards[1].experts and (0, 4) in plan.shards[1].experts
    assert set(plan.local) == {(0, 6), (0, 7), (1, 6), (1, 7)}


def test_an_expert_on_several_shards_is_replicated_there():
    plan = PlacementPlan.from_layout(_cfg(), {"0": list(range(8)), "1": [3, [1, 5]]})
    holders = plan.holders()
    assert holders[(0, 3)] == (0, 1) and holders[(1, 3)] == (0, 1) and holders[(1, 5)] == (0, 1)
    assert holders[(0, 5)] == (0,) and plan.owner()[(0, 3)] == 0
    assert PlacementPlan.from_holders(holders, 2) == plan


@pytest.mark.parametrize("layout, message", [
    ({"0": [0, 1, 2, 3, 4, 5, 6]}, "not placed"),
    ({"0": list(range(8)) + [3]}, "placed twice"),
    ({"0": list(range(8)), "local": [3]}, "placed twice"),
    ({"0": list(range(8)), "2": []}, "0..N-1"),
    ({"a": list(range(8))}, "not an integer"),
    ({"0": list(range(8)) + [[5, 0]]}, "does not exist"),
])
def test_bad_layouts_are_rejected_with_reasons(layout, message):
    with pytest.raises(PlacementError, match=message):
        PlacementPlan.from_layout(_cfg(), layout)


def test_shard_requests_round_trip_equals_local_experts(tmp_path):
    ckpt = build_checkpoint(tmp_path, "mixtral", num_local_experts=8)
    whole = load_model(ckpt.path)
    plan = PlacementPlan.round_robin(whole.config, 3)
    shards = [load_expert_weights(ckpt.path, s.experts) for s in plan.shards]
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    dispatch = whole.layers[1].mlp.plan(x)
    expected = whole.local_experts.run_experts(x, dispatch)
    replies = Replies()
    for shard, (req, assigns) in build_requests(x, dispatch, plan.holders()).items():
        assert isinstance(req, ShardRequest) and req.x.shape == (sum(req.counts), 64)
        replies.add(run_shard_request(shards[shard], req), assigns)
    got = replies.outputs()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[e], expected[e]) for e in got)
    assert PartitionedBackend(shards).holds() == whole.local_experts.holds()
