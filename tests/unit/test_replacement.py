"""Re-placing experts on running shards (issue 18, EPLB applied): shards read and drop experts on
the way, replicated experts split their rows, and requests decoding while the placement changes
keep their float32 outputs bit for bit."""
from __future__ import annotations

import asyncio

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.engine import AsyncEngine, EngineCore, SamplingParams
from serve_app.model import load_model
from serve_app.model.moe import PartitionedBackend
from serve_app.parallel.eplb import balance
from serve_app.parallel.expert_store import ExpertStore
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.replacement import apply_placement
from serve_app.parallel.socket_plane import ShardServer, SocketTransport
from serve_app.parallel.transport import ShardRequest
from tests.helpers.checkpoints import build_checkpoint
from tests.helpers.engines import threads_of_a_new_thread
from tests.unit.test_socket_plane import ControlPlane

@pytest.fixture(autouse=True)
def same_gemm_split():
    with threads_of_a_new_thread():    # outputs are compared with the shard and engine threads' sums, bit for bit
        yield


ENGINE = dict(block_size=4, num_kv_blocks=512, max_num_batched_tokens=64, long_prefill_chunk=16,
              speculative_tokens=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("replace"), "mixtral", num_local_experts=8).path


@pytest.fixture(scope="module")
def whole(ckpt):
    return load_model(ckpt)


def shards_for(ckpt, plan: PlacementPlan):
    stores = [ExpertStore(str(ckpt), s.experts, torch.float32, "cpu") for s in plan.shards]
    servers = [ShardServer(store.compute, "127.0.0.1", 0) for store in stores]
    return stores, servers


def test_a_store_reads_what_it_is_asked_for_and_drops_what_it_is_told(ckpt, whole):
    store = ExpertStore(str(ckpt), [(0, 1)], torch.float32, "cpu")
    layer = whole.config.moe_layers[0]
    x = torch.randn(3, whole.config.hidden_size)
    want = whole.local_experts.ffn[f"{layer}_5"](x)
    assert torch.equal(store.compute(ShardRequest(layer, [5], [3], x)), want)   # not held: read on demand
    assert store.loaded_on_demand == 1 and (layer, 5) in store.holds()
    assert store.prefetch([(layer, 5), (layer, 6)]) == 1                         # only what is missing
    assert store.release([(layer, 6)]) == 2 and store.holds() == {(layer, 6)}


def test_replicated_experts_split_their_rows_between_holders(ckpt, whole):
    layers = list(whole.config.moe_layers)
    hot = torch.tensor([[900, 5, 5, 5, 5, 5, 5, 5]] * len(layers))
    balanced = balance(hot, layers, 2, spare_slots=1)
    assert all(balanced.holders[(layer, 0)] == (0, 1) for layer in layers)       # the hot expert on both
    plan = PlacementPlan.from_holders(balanced.holders, 2)
    stores, servers = shards_for(ckpt, plan)
    transport = SocketTransport([ControlPlane(s) for s in servers], plan, timeout_s=10)
    x = torch.randn(40, whole.config.hidden_size, generator=torch.Generator().manual_seed(1))
    try:
        for layer in layers:
            dispatch = whole.layers[layer].mlp.plan(x)
            rows = {a.expert: len(a.rows) for a in dispatch.assignments}
            got, want = transport.run_experts(x, dispatch), whole.local_experts.run_experts(x, dispatch)
            assert got.keys() == want.keys()
            # Each part is its own matrix product: equal up to the float sums' order.
            assert all(torch.allclose(got[e], want[e], atol=1e-6, rtol=1e-5) for e in got)
            assert all(got[e].shape[0] == rows[e] for e in got)
    finally:
        transport.close()
        for server in servers:
            server.close()


def test_the_rows_of_a_replicated_expert_take_turns_between_its_holders(whole):
    from serve_app.model.moe import DispatchPlan, ExpertAssignment
    from serve_app.parallel.transport import build_requests

    layer = whole.config.moe_layers[0]
    x = torch.randn(1, whole.config.hidden_size)
    one_row = DispatchPlan(layer, 1, torch.tensor([[2]]), torch.ones(1, 1), torch.zeros(1, 8),
                           [ExpertAssignment(2, torch.tensor([0]), torch.ones(1))])
    holders = {(layer, 2): (0, 1)}
    assert [list(build_requests(x, one_row, holders, turn)) for turn in range(4)] == [[0], [1], [0], [1]]
    three = DispatchPlan(layer, 3, torch.tensor([[2]] * 3), torch.ones(3, 1), torch.zeros(3, 8),
                         [ExpertAssignment(2, torch.arange(3), torch.ones(3))])
    parts = build_requests(torch.randn(3, whole.config.hidden_size), three, holders, 1)
    assert {s: [p.part for p in pieces] for s, (_, pieces) in parts.items()} == {1: [0], 0: [1]}


def _engine(whole_or_path, transport=None) -> EngineCore:
    if transport is None:
        return EngineCore(whole_or_path, EngineConfig(**ENGINE))
    model = load_model(whole_or_path, expert_ids=())                             # every expert remote
    model.set_expert_backend(PartitionedBackend([model.local_experts, transport]))
    return EngineCore(model, EngineConfig(**ENGINE))


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(4, 30, (6,), generator=gen)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_decoding_through_a_re_placement_keep_their_outputs_bit_for_bit(ckpt, whole, anyio_backend):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = _prompts(whole.config.vocab_size)
    reference = _engine(whole)
    for i, p in enumerate(prompts):
        reference.add_request(f"r{i}", p, params)
    want = reference.run_until_done()

    before = PlacementPlan.round_robin(whole.config, 2)
    layers = list(whole.config.moe_layers)
    moved = balance(torch.tensor([[40, 1, 2, 3, 50, 6, 7, 8]] * len(layers)), layers, 2)
    after = PlacementPlan.from_holders(moved.holders, 2)
    assert after.owner() != before.owner()
    stores, servers = shards_for(ckpt, before)
    transport = SocketTransport([ControlPlane(s) for s in servers], before, timeout_s=10)
    engine = AsyncEngine(_engine(ckpt, transport))

    async def run(i: int, prompt: list[int]):
        final = None
        async for final in engine.generate(f"r{i}", prompt, params):
            pass
        return final

    async def prefetch(shard, keys):
        return stores[shard].prefetch(keys)

    async def release(shard, keys):
        return stores[shard].release(keys)

    try:
        tasks = [asyncio.ensure_future(run(i, p)) for i, p in enumerate(prompts)]
        while engine.core.num_steps < 8:                          # mid-decode
            await asyncio.sleep(0.005)
        report = await apply_placement([transport], after, prefetch, release)
        steps_at_switch = engine.core.num_steps
        got = await asyncio.gather(*tasks)
    finally:
        engine.shutdown()
        transport.close()
        for server in servers:
            server.close()
    assert steps_at_switch < engine.core.num_steps               # decoding went on under the new placement
    assert sum(report["read"]) > 0 and sum(report["dropped"]) == sum(report["read"])
    assert [s.holds() for s in stores] == [frozenset(s.experts) for s in after.shards]
    assert all(s.loaded_on_demand == 0 for s in stores)          # nothing was waited for inside a layer
    for i, out in enumerate(got):
        ref = want[f"r{i}"].outputs[0]
        assert out.outputs[0].token_ids == ref.token_ids
        assert out.outputs[0].cumulative_logprob == ref.cumulative_logprob   # float32, bit for bit
