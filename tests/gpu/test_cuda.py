"""On a CUDA machine (skipped where torch sees no GPU, as on the 2-core CI box): the model and the
engine on the GPU agree with the CPU float32 reference, speculative decoding stays exact there,
and the socket data plane carries rows from a GPU Router bit for bit.

Run them where a GPU is lent: `.venv/bin/python -m pytest tests/gpu -q` (with
`bench/gpu_flash5b.py` for the speed side).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.engine import EngineCore, SamplingParams
from serve_app.model import load_expert_weights, load_model
from serve_app.model.precision import add_quantized_lanes
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.socket_plane import ShardServer, SocketTransport
from serve_app.parallel.transport import run_shard_request
from tests.helpers.checkpoints import build_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENGINE = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64, long_prefill_chunk=16)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def ckpt(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gpu"), request.param)


def _greedy(model, prompts, k=0):
    engine = EngineCore(model, EngineConfig(**ENGINE, speculative_tokens=k))
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    final = engine.run_until_done()
    return [final[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]


def test_float32_logits_on_the_gpu_match_the_transformers_reference(ckpt):
    model = load_model(ckpt.path, dtype=torch.float32, device="cuda")
    ids = torch.randint(1, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = ckpt.reference.float()(ids).logits
        ours = model(ids.cuda()).float().cpu()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)


def test_greedy_engine_output_on_the_gpu_equals_the_cpu_and_speculation_keeps_it(ckpt):
    prompts = [[(7 * i + j) % 300 + 1 for j in range(5 + i)] for i in range(6)]
    cpu = _greedy(load_model(ckpt.path, dtype=torch.float32), prompts)
    gpu_model = load_model(ckpt.path, dtype=torch.float32, device="cuda")
    assert _greedy(gpu_model, prompts) == cpu
    add_quantized_lanes(gpu_model, gpu_model.local_experts, ("int8",), 32, torch.float32)
    assert _greedy(gpu_model, prompts, k=4) == cpu


def test_the_socket_plane_carries_a_gpu_routers_rows_bit_for_bit(ckpt):
    whole = load_model(ckpt.path, dtype=torch.float32, device="cuda")
    plan = PlacementPlan.round_robin(whole.config, 2)
    # Shards on the GPU as well (ExpertShard._compute does the same: rows to its device and back).
    servers = [ShardServer(lambda req, b=load_expert_weights(ckpt.path, s.experts, device="cuda"):
                           run_shard_request(b, dataclasses.replace(req, x=req.x.cuda())), "127.0.0.1", 0)
               for s in plan.shards]

    class Control:
        def __init__(self, server):
            self.server, self.data_plane = server, self

        def remote(self):
            return self

        def result(self, timeout_s=None):
            return self.server.address
    transport = SocketTransport([Control(s) for s in servers], plan)
    x = torch.randn(9, whole.config.hidden_size, device="cuda")
    layer = next(l for l in whole.layers if hasattr(l.mlp, "plan"))
    dispatch = layer.mlp.plan(x)
    got, want = transport.run_experts(x, dispatch), whole.local_experts.run_experts(x, dispatch)
    assert all(got[e].device.type == "cuda" and torch.equal(got[e], want[e]) for e in want)
