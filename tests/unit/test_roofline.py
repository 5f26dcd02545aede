"""The compute floor behind the engine benchmark's "best possible ratio" (bench/roofline.py)."""
from __future__ import annotations

import pytest

from bench.roofline import ModelShape, peak_gflops, workload_floor

TINY = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, experts=4, top_k=2, ffn=16, vocab=32)


def test_token_flops_counts_each_matmul_by_hand():
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8 -> 2*(64+32+32+64) = 384; router 2*8*4 = 64;
    # 2 experts x 3 matmuls x 8x16 -> 2*2*3*128 = 1536; attention over 5 keys: 2*2*5*8 = 160.
    assert TINY.token_flops(5) == 2 * (384 + 64 + 1536 + 160)


@pytest.mark.parametrize(("prompt", "new"), [(1, 1), (7, 3), (130, 16)])
def test_request_flops_equals_the_sum_over_positions(prompt, new):
    by_position = sum(TINY.token_flops(context) for context in range(1, prompt + new))
    assert TINY.request_flops(prompt, new) == pytest.approx(by_position + new * 2 * 8 * 32)


def test_from_hf_reads_mixtral_config_names():
    shape = ModelShape.from_hf(dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                    num_experts_per_tok=2, intermediate_size=512))
    assert (shape.head_dim, shape.kv_heads, shape.ffn, shape.top_k) == (32, 4, 512, 2)


def test_floor_bounds_every_ratio_by_the_peers_time():
    floor = workload_floor(TINY, [(16, 4), (32, 8)])
    assert floor.peak_gflops > 0 and floor.seconds == pytest.approx(floor.gflop / floor.peak_gflops)
    assert floor.best_ratio(10 * floor.seconds) == pytest.approx(10)
    assert floor.efficiency(4 * floor.seconds) == pytest.approx(0.25)
    assert peak_gflops(TINY, rows=16, repeats=1) > 0
