"""The fast lane as served: bf16 activations on packed-kernel weights, every dense linear quantized,
agreement with float32 on the default model, and the measured kernel choices."""
from __future__ import annotations

import pytest
import torch

from serve_app.config import EngineConfig, default_model_dir
from serve_app.engine import EngineCore
from serve_app.model import load_model
from serve_app.model.kernels import attention_dtype, fast_lane_dtype, full_precision_dtype, quant_path
from serve_app.model.precision import DENSE_MODE, Linear, add_quantized_lanes
from serve_app.model.quant import QuantLinear
from tests.helpers.checkpoints import build_checkpoint
from tests.helpers.engines import greedy

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("fast"), "qwen2_moe")     # shared expert, qkv bias


def _lanes(path, dtype=BF16):
    model = load_model(path)
    add_quantized_lanes(model, model.local_experts, ("int8", "int4"), 32, dtype)
    return model


@pytest.mark.parametrize("mode,group,bound", [("int8", 64, 0.012), ("int4", 32, 0.105), ("int4", 64, 0.112),
                                              ("int4", 128, 0.123)])
def test_kernel_path_with_bf16_activations_is_within_rounding_of_float(mode, group, bound):
    # Bounds: the float32 rounding-model errors of test_quant (0.0074 / 0.101 / 0.109 / 0.12) plus
    # what bf16 activations and outputs add (~0.4% each).
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 256, generator=gen) * 0.08, torch.randn(16, 256, generator=gen)
    layer = QuantLinear.from_weight(w, mode, group, BF16, path="kernel")
    y, ref = layer(x.to(BF16)), x @ w.T
    assert y.dtype == BF16 and y.shape == (16, 256)
    assert float((y.float() - ref).norm() / ref.norm()) < bound


def test_every_dense_linear_gets_a_copy_per_lane_in_its_dense_format(ckpt):
    model = _lanes(ckpt.path)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert model.lm_head in linears and len(linears) >= 4 * model.config.num_layers + 1
    for lin in linears:
        assert set(lin.reduced) == {"int8", "int4"}
        for lane, copy in lin.reduced.items():
            assert copy.mode == DENSE_MODE[lane]
            assert copy.path == "kernel" or getattr(copy, "dense", None) is not None   # never rebuilt per call
    assert model.reduced_dtype == BF16
    # Checkpoints see the float layers only.
    assert not any("reduced" in k for k in model.state_dict())


def test_fast_lane_never_reads_a_float_dense_or_expert_weight(ckpt):
    """Poison every float weight the fast lane must not touch: its logits stay the same."""
    model = _lanes(ckpt.path)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = {p: model(ids, p) for p in ("int8", "int4")}
        for lin in (m for m in model.modules() if isinstance(m, Linear)):
            if lin is not model.lm_head:            # tied to the embedding, which the lane does read
                lin.weight.fill_(float("nan"))
        for p in model.local_experts.parameters():
            p.fill_(float("nan"))
        for precision, logits in before.items():
            after = model(ids, precision)
            assert after.dtype == BF16 and torch.isfinite(after).all()
            assert torch.equal(after, logits)
        assert torch.isnan(model(ids)).all()        # while full precision reads them


def test_bf16_lane_of_a_float32_model_is_close_to_float(ckpt):
    model = _lanes(ckpt.path)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model(ids)
        for precision, floor in (("int8", 0.995), ("int4", 0.97)):
            got = model(ids, precision).float()
            assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > floor


def test_engine_mixed_int8_int4_batch_equals_each_request_alone(ckpt):
    # float32 lanes: bf16 matmuls are not batch-invariant (a kernel call of 9 rows and a dense
    # GEMM of 20 round differently), and what this checks is that precisions never mix.
    model = _lanes(ckpt.path, torch.float32)
    cfg = EngineConfig(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64)
    prompts = {f"r{i}": torch.randint(0, 320, (9 + i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(4)}
    lanes = {rid: ("int8", "int4")[i % 2] for i, rid in enumerate(prompts)}

    def run(ids):
        core = EngineCore(model, cfg, dtype=model.reduced_dtype)
        assert core.runner.kv.k.dtype == attention_dtype("cpu", model.reduced_dtype)
        for rid in ids:
            core.add_request(rid, prompts[rid], greedy(8), precision=lanes[rid])
        return {rid: o.outputs[0].token_ids for rid, o in core.run_until_done(list(ids)).items()}
    together = run(prompts)
    assert together == {rid: run([rid])[rid] for rid in prompts}


def test_measured_choices_are_valid_and_quantlinear_follows_them():
    assert fast_lane_dtype("cpu") in (torch.float32, BF16)
    assert attention_dtype("cpu", torch.float32) == torch.float32      # float32 never changes
    assert full_precision_dtype("cpu", torch.float32) == torch.float32
    assert full_precision_dtype("cpu", torch.float16) == torch.float32  # float16 on CPU: never faster
    w = torch.randn(64, 64) * 0.08
    for mode in ("int8", "int4"):
        for dtype in (torch.float32, BF16):
            assert QuantLinear.from_weight(w.to(dtype), mode).path == quant_path("cpu", mode, dtype)
    # The CPU int4 packer tiles rows by 16: 40 rows cannot use it and fall back.
    assert QuantLinear.from_weight(w[:40].to(BF16), "int4").path == "dequant"


def test_default_model_lanes_agree_with_float32_on_held_out_code():
    """The targets of the fast-path issue: INT8 >= 97%, INT4 >= 90% next-token agreement."""
    from bench.precision import heldout_windows, quality, served_model
    from serve_app.tokenizer import CodeTokenizer

    model_dir = default_model_dir()
    windows = heldout_windows(CodeTokenizer.from_dir(model_dir), 8, 256)
    assert windows.shape == (8, 256)
    q = quality(load_model(model_dir, dtype="float32"), served_model(model_dir, 64), windows)
    assert q["int8"]["agreement"] >= 0.97, q
    assert q["int4"]["agreement"] >= 0.90, q
    assert q["full"]["agreement"] >= 0.97, q


def test_row_limit_is_measured_on_each_weights_own_shape(monkeypatch):
    """The kernel/dense crossover differs between a model's shapes (the LM head against an expert's
    down projection), so each QuantLinear asks for its own [out, in]."""
    from serve_app.model import kernels, quant
    asked = []
    monkeypatch.setattr(quant, "kernel_row_limit", lambda dev, mode, dtype, n, k: asked.append((n, k)) or n // 16)
    for n, k in ((64, 128), (256, 64)):
        layer = QuantLinear.from_weight(torch.randn(n, k), "int8", 64, BF16, path="kernel")
        assert layer.row_limit == n // 16
    assert asked == [(64, 128), (256, 64)]
    kernels.kernel_row_limit.cache_clear()
    assert kernels.kernel_row_limit("cpu", "int8", BF16, 64, 128) in (0, *kernels._PROBE_ROWS)
    assert kernels.kernel_row_limit.cache_info().currsize == 1       # one probe per (mode, dtype, shape)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_layers_multiply_prefill_chunks_with_their_dense_copy(mode):
    """The packed CPU kernels are GEMVs: above row_limit rows a GEMM on the same dequantized weight runs."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen) * 0.08
    layer = QuantLinear.from_weight(w, mode, 64, BF16, path="kernel", row_limit=4)
    layer.materialize()
    few, many = torch.randn(2, 128, generator=gen).to(BF16), torch.randn(16, 128, generator=gen).to(BF16)
    plain = QuantLinear.from_weight(w, mode, 64, BF16, path="dequant")
    for x in (few, many):
        ref = plain(x).float()
        assert float((layer(x).float() - ref).norm() / ref.norm()) < 1e-2
    layer.dense.zero_()                                 # which path ran is now visible
    assert layer(few).abs().sum() > 0 and layer(many).abs().sum() == 0


@pytest.mark.parametrize("bf16_units", [False, True])
def test_dense_copies_are_float32_where_bf16_matmuls_are_slow(monkeypatch, bf16_units):
    """A bf16 lane's dense copy (prefill chunks) is float32 on a CPU without bf16 units: x is cast
    up, the GEMM runs in float32, the result comes back in bf16; with bf16 units it stays bf16."""
    from serve_app.model import kernels
    monkeypatch.setattr(kernels, "has_bf16_units", lambda: bf16_units)
    kernels.full_precision_dtype.cache_clear()
    try:
        gen = torch.Generator().manual_seed(2)
        w = torch.randn(64, 128, generator=gen) * 0.08
        layer = QuantLinear.from_weight(w, "int8", 64, BF16, path="kernel", row_limit=4)
        layer.materialize()
        assert layer.dense.dtype == (BF16 if bf16_units else torch.float32)
        x = torch.randn(16, 128, generator=gen).to(BF16)
        out = layer(x)
        exact = x.float() @ layer.dequantize(torch.float32).t()
        assert out.dtype == BF16 and float((out.float() - exact).norm() / exact.norm()) < 5e-3
    finally:
        kernels.full_precision_dtype.cache_clear()


def test_fixed_kernel_choices_skip_the_timing_and_follow_the_cpu_features():
    """MOE_SERVE_KERNELS=fixed: reproducible choices for debugging, from the CPU flags alone."""
    import os
    import subprocess
    import sys

    from serve_app.model.kernels import cpu_features

    code = ("import torch; from serve_app.model import kernels as k; "
            "print(k.fast_lane_dtype('cpu'), k.kernel_row_limit('cpu', 'int8', torch.bfloat16), "
            "k.kernel_row_limit('cpu', 'int8', torch.float32), k.attention_dtype('cpu', torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MOE_SERVE_KERNELS": "fixed"}).stdout.split()
    bf16_cpu = bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()))
    assert out == ["torch.bfloat16" if bf16_cpu else "torch.float32", "8", "0", "torch.float32"]
