"""The fused CPU decode kernels (serve_app/model/cpu_kernels) against the pure-torch path.

Each kernel computes in float32 and rounds once, so it sits within a bf16 rounding step or two of
the torch ops it replaces (which round after every op); a float32 step never uses them. The
kernels are built on this machine (g++ and ninja are installed with the project); a build that
fails is a failed test here, not a skip, unless MOE_SERVE_CPU_KERNELS=0 asks for the torch path.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from serve_app.model import cpu_kernels
from serve_app.model.attention import AttentionMetadata, _attend_group, apply_rotary, rotary
from serve_app.model.quant import QuantLinear

pytestmark = pytest.mark.skipif(os.environ.get("MOE_SERVE_CPU_KERNELS") == "0",
                                reason="MOE_SERVE_CPU_KERNELS=0: the pure-torch path is what runs")


@pytest.fixture(scope="module")
def ops():
    fused = cpu_kernels.ops()
    assert fused is not None, "the CPU kernels did not build (see the warning logged by serve_app.model.cpu_kernels)"
    return fused


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_kernels_apply_to_16_bit_inference_only(ops):
    x = torch.randn(2, 8)
    with torch.inference_mode():
        assert cpu_kernels.for_tensor(x) is None                        # float32: the parity lane
        assert cpu_kernels.for_tensor(x.bfloat16()) is ops
        with cpu_kernels.disabled():
            assert cpu_kernels.for_tensor(x.bfloat16()) is None
    with torch.enable_grad():
        assert cpu_kernels.for_tensor(x.bfloat16()) is None             # training needs gradients


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 3, 32), (8, 2, 64), (4, 4, 128), (4, 2, 48)])
def test_paged_attention_of_decodes_matches_sdpa(ops, kv_dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    block, blocks = 16, 48
    k_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=gen).to(kv_dtype)
    v_cache = torch.randn(blocks, block, kv_heads, head_dim, generator=gen).to(kv_dtype)
    lengths = [1, 15, 16, 17, 100, 33 * 16 - 3]                        # block edges, a partial last block
    tables = [torch.randperm(blocks, generator=gen)[:-(-n // block)].tolist() for n in lengths]   # scattered blocks
    meta = AttentionMetadata.build([[n - 1] for n in lengths], tables, block, "cpu", torch.float32)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).bfloat16()
    scale = head_dim ** -0.5
    with torch.inference_mode():
        with cpu_kernels.disabled():
            ref = _attend_group(q, k_cache, v_cache, meta.groups[0], scale, torch.float32)
        tables, token_seq = meta.fused_tables()
        out = ops.paged_attention(q, k_cache, v_cache, tables, token_seq, meta.positions, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    for b in range(len(lengths)):                                       # every sequence, not just on average
        assert rel(out[b], ref[b]) < 8e-3, (b, lengths[b])


def test_paged_attention_ignores_keys_past_the_position(ops):
    """Garbage beyond a sequence's position (a reused block's old K/V) must not leak in."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(4, 16, 2, 32, generator=gen).bfloat16()
    v = torch.randn(4, 16, 2, 32, generator=gen).bfloat16()
    q = torch.randn(1, 4, 32, generator=gen).bfloat16()
    tables, pos = torch.tensor([[2, 0]]), torch.tensor([20])
    with torch.inference_mode():
        before = ops.paged_attention(q, k, v, tables, torch.tensor([0]), pos, 0.2)
        k[0, 5:], v[0, 5:] = 1e4, -1e4                                  # keys 21.. of the sequence
        k[1], v[1] = 1e4, 1e4                                           # a block not in its table
        after = ops.paged_attention(q, k, v, tables, torch.tensor([0]), pos, 0.2)
    assert torch.equal(before, after)


def test_paged_attention_of_prefill_chunks_matches_masked_sdpa_and_does_not_depend_on_the_batch(ops):
    """Chunks of several rows per sequence (causal by position) next to decodes: each row as the
    masked SDPA of its group computes it, and bit-identical to the same row attended alone — a
    request's tokens must not change with how its prompt was chunked or what it was batched with."""
    gen = torch.Generator().manual_seed(3)
    block, blocks, heads, kv, dh = 16, 40, 6, 3, 32
    k_cache = torch.randn(blocks, block, kv, dh, generator=gen).bfloat16()
    v_cache = torch.randn(blocks, block, kv, dh, generator=gen).bfloat16()
    positions = [list(range(30, 70)), [12], list(range(0, 9)), [200]]     # a chunk, a decode, a first chunk, a decode
    tables = [torch.randperm(blocks, generator=gen)[:-(-(p[-1] + 1) // block)].tolist() for p in positions]
    meta = AttentionMetadata.build(positions, tables, block, "cpu", torch.float32)
    q = torch.randn(len(meta.positions), heads, dh, generator=gen).bfloat16()
    with torch.inference_mode():
        tabs, seqs = meta.fused_tables()
        out = ops.paged_attention(q, k_cache, v_cache, tabs, seqs, meta.positions, dh ** -0.5)
        with cpu_kernels.disabled():
            ref = torch.empty_like(out, dtype=torch.float32)
            for g in meta.groups:
                ref[g.token_index] = _attend_group(q.index_select(0, g.token_index), k_cache, v_cache, g,
                                                   dh ** -0.5, torch.float32)
        for t in range(len(meta.positions)):
            assert rel(out[t], ref[t]) < 8e-3, t
            alone = ops.paged_attention(q[t:t + 1], k_cache, v_cache, tabs, seqs[t:t + 1], meta.positions[t:t + 1],
                                        dh ** -0.5)
            assert torch.equal(alone[0], out[t]), t


def test_paged_attention_refuses_indices_outside_the_cache(ops):
    k = torch.zeros(2, 16, 1, 32).bfloat16()
    q = torch.zeros(1, 2, 32).bfloat16()
    with pytest.raises(RuntimeError, match="outside"):
        ops.paged_attention(q, k, k, torch.tensor([[5]]), torch.tensor([0]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="outside its table"):
        ops.paged_attention(q, k, k, torch.tensor([[0]]), torch.tensor([0]), torch.tensor([16]), 1.0)
    with pytest.raises(RuntimeError, match="names sequence"):
        ops.paged_attention(q, k, k, torch.tensor([[0]]), torch.tensor([1]), torch.tensor([3]), 1.0)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])   # float32: a bf16 lane over a float32 model
@pytest.mark.parametrize("rows", [1, 8])
def test_add_rms_norm_matches_torch(ops, rows, weight_dtype):
    gen = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 192, generator=gen).bfloat16() for _ in range(2))
    w = (torch.rand(192, generator=gen) + 0.5).to(weight_dtype)
    with torch.inference_mode():
        h, y = ops.add_rms_norm(x, res, w, 1e-6)
        only, y2 = ops.add_rms_norm(x, None, w, 1e-6)
    assert torch.equal(h, x + res)                                      # the residual stream, bf16 as torch rounds it
    assert rel(y, F.rms_norm((x + res).float(), (192,), w.float(), 1e-6)) < 4e-3
    assert only is x and rel(y2, F.rms_norm(x.float(), (192,), w.float(), 1e-6)) < 4e-3


def test_rms_norm_module_takes_the_kernel_with_a_float32_weight_and_matches_its_fallback(ops):
    from serve_app.model.transformer import RMSNorm
    norm = RMSNorm(192, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(192, generator=torch.Generator().manual_seed(3)) + 0.5)   # float32
    x, res = (torch.randn(4, 192, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (4, 5))
    with torch.inference_mode():
        fused_h, fused_y = norm.add_forward(x, res)
        fused_only = norm(x)
    # The fallback (no kernels: grad mode on) computes the same in float32, rounded once to bf16.
    h, y = norm.add_forward(x, res)
    assert fused_h.dtype == fused_y.dtype == fused_only.dtype == torch.bfloat16
    assert torch.equal(fused_h, h)
    assert rel(fused_y, y) < 4e-3 and rel(fused_only, norm(x)) < 4e-3
    assert (fused_y != y).float().mean() < 0.05          # the same rounding almost everywhere


def test_silu_mul_matches_torch(ops):
    gu = (torch.randn(5, 2 * 384, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    with torch.inference_mode():
        out = ops.silu_mul(gu)
    ref = F.silu(gu[:, :384].float()) * gu[:, 384:].float()
    assert out.shape == (5, 384) and rel(out, ref) < 4e-3


def test_rotary_in_place_on_the_fused_projection(ops):
    """q and k rotated in place inside the [T, (H+2G)·Dh] projection; v untouched."""
    gen = torch.Generator().manual_seed(2)
    heads, kv, dh, t = 6, 3, 32, 4
    qkv = torch.randn(t, (heads + 2 * kv) * dh, generator=gen).bfloat16()
    cos, sin = rotary(torch.tensor([0, 7, 100, 1000]), dh, 10000.0, torch.bfloat16)
    cos, sin = cos[:, None], sin[:, None]
    view = qkv[:, :(heads + kv) * dh].view(t, heads + kv, dh)
    ref = apply_rotary(view.float(), cos.float(), sin.float())
    v_before = qkv[:, (heads + kv) * dh:].clone()
    with torch.inference_mode():
        ops.rotary_(view, cos, sin)
    assert rel(view, ref) < 4e-3
    assert torch.equal(qkv[:, (heads + kv) * dh:], v_before)


@pytest.mark.parametrize("n,k", [(384, 192), (8192, 192), (100, 64), (100, 77), (17, 3)])
def test_int8_linear_matches_the_dequantized_matmul(ops, n, k):
    if not ops.int8_linear_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2+FMA: QuantLinear keeps torch's int8 kernel")
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen)
    layer = QuantLinear.from_weight(w, "int8", dtype=torch.bfloat16, path="kernel")
    assert "packed" in layer._buffers and "packed" not in layer.state_dict()   # derived, never saved
    ref_w = layer.dequantize(torch.float32)
    for rows in (1, 3, 8, 9, 20):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        with torch.inference_mode():
            out = ops.int8_linear(x, layer.packed, layer.packed_scales, n)
            via_module = layer(x)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        assert rel(out, x.float() @ ref_w.t()) < 5e-3, rows
        assert torch.equal(via_module, out)


@pytest.mark.parametrize("n,k,group", [(768, 192, 64), (192, 384, 64), (112, 128, 32), (32, 100, 32), (8192, 192, 128)])
def test_int4_linear_matches_the_dequantized_matmul(ops, n, k, group):
    if not ops.int8_linear_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2+FMA: QuantLinear keeps torch's int4 kernel")
    gen = torch.Generator().manual_seed(n + k + group)
    w = torch.randn(n, k, generator=gen)
    layer = QuantLinear.from_weight(w, "int4", group, dtype=torch.bfloat16, path="kernel")
    assert "packed" in layer._buffers and "packed" not in layer.state_dict()
    ref_w = layer.dequantize(torch.float32)
    for rows in (1, 5, 8, 17):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        with torch.inference_mode():
            out = layer(x)
            with cpu_kernels.disabled():
                torch_kernel = layer(x)                                 # torch's int4 kernel, same codes
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        assert rel(out, x.float() @ ref_w.t()) < 5e-3, rows
        assert rel(out, torch_kernel) < 1e-2, rows


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_experts_equal_the_expert_by_expert_path(ops, mode):
    """moe_quant_experts = run_experts + combine on the same plan (one kernel instead of ~10 ops an expert)."""
    from serve_app.model.moe import LocalExpertBackend, combine, route
    from serve_app.model.quant_experts import QuantizedExpertBackend
    if not ops.int8_linear_supported():
        pytest.skip("neither AVX512-BF16 nor AVX2+FMA")
    torch.manual_seed(0)
    local = LocalExpertBackend([(0, e) for e in range(8)], 192, 384)
    for p in local.parameters():
        torch.nn.init.normal_(p, std=0.05)
    backend = QuantizedExpertBackend.from_backend(local, mode, 64, dtype=torch.bfloat16)
    gate = torch.randn(8, 192)
    for tokens in (1, 8, 13):
        x = torch.randn(tokens, 192).bfloat16()
        with torch.inference_mode():
            plan = route(x, gate, 2, True, 0)
            fused = backend.run_combined(x, plan)
            with cpu_kernels.disabled():
                plain = combine(plan, backend.run_experts(x, plan), like=x)
        assert fused is not None and fused.shape == x.shape
        assert rel(fused, plain) < 1e-2, tokens


# Builds whose quantized matmuls sum a row in one order whatever the rows beside it. The
# AVX512-BF16 and AMX builds do not yet: their chains per row (kSplit) follow the rows of a pass.
ROW_INVARIANT_ISAS = ("avx2",)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 64), ("int4", 32)])
def test_a_row_computes_the_same_whatever_the_rows_beside_it(ops, mode, group):
    """A verification of 16 drafts must compute what 16 one-row decode steps compute, bit for bit,
    or a draft can change a greedy token (engine/speculative.py, "Exactness"): every row count
    (1-3 rows a pass, the converted scratch above) sums in int8_block's / int4_block's order."""
    from serve_app.model.moe import LocalExpertBackend, route
    from serve_app.model.quant_experts import QuantizedExpertBackend
    if not ops.int8_linear_supported():
        pytest.skip("this CPU has neither AVX512-BF16 nor AVX2+FMA: QuantLinear keeps torch's kernels")
    exact = ops.quant_gemm_isa() in ROW_INVARIANT_ISAS
    gen = torch.Generator().manual_seed(7)
    layer = QuantLinear.from_weight(torch.randn(768, 192, generator=gen), mode, group or 64,
                                    dtype=torch.bfloat16, path="kernel")
    x = torch.randn(40, 192, generator=gen).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1], packed=True) for i in range(40)])
        for rows in (2, 3, 4, 7, 17, 40):
            together = layer(x[:rows], packed=True)
            if exact:
                assert torch.equal(together, alone[:rows]), (rows, int((together != alone[:rows]).sum()))
            else:
                assert rel(together, alone[:rows]) < 1e-2, rows
    local = LocalExpertBackend([(0, e) for e in range(8)], 192, 384)
    for p in local.parameters():
        torch.nn.init.normal_(p, std=0.05)
    backend = QuantizedExpertBackend.from_backend(local, mode, group or 64, dtype=torch.bfloat16)
    gate = torch.randn(8, 192, generator=gen)
    with torch.inference_mode():
        plan = route(x, gate, 2, True, 0)          # 40 tokens: ~10 rows an expert
        together = backend.run_combined(x, plan, packed=True)
        alone = torch.cat([backend.run_combined(x[i:i + 1], route(x[i:i + 1], gate, 2, True, 0), packed=True)
                           for i in range(40)])
    assert torch.equal(together, alone) if exact else rel(together, alone) < 1e-2


def test_rotary_table_lookup_is_the_rotary_computation():
    """The decode step reads cos/sin from a cached table; it must hold exactly rotary's values,
    also after growing past its first size and for [B, S] (training) positions."""
    from serve_app.model.attention import rotary_lookup
    for dtype in (torch.float32, torch.bfloat16):
        for positions in (torch.tensor([0, 5, 1023]), torch.tensor([[3, 4097], [0, 1]]), torch.tensor([70000])):
            cos, sin = rotary_lookup(positions, 32, 10000.0, dtype)
            ref_cos, ref_sin = rotary(positions, 32, 10000.0, dtype)
            assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.integration
def test_quant_gemm_uses_amx_where_the_cpu_has_it(ops):
    from serve_app.model.kernels import cpu_features
    if not ops.int8_linear_supported():
        pytest.skip("no quantized matmuls in this build")
    features = set(cpu_features()) if cpu_kernels.march() == "native" else {"avx2"}   # the v3 build: AVX2
    expected = ("amx" if "amx_bf16" in features and os.environ.get("MOE_SERVE_AMX") != "0"
                else "avx512_bf16" if "avx512_bf16" in features else "avx2")
    assert ops.quant_gemm_isa() == expected


@pytest.mark.parametrize("march,quant_gemm", [("x86-64-v3", True), ("x86-64-v2", False), ("native-no-amx", True)])
def test_the_builds_for_other_cpus_pass_these_tests(tmp_path, march, quant_gemm):
    """Each CPU generation runs its own code: build the kernels for one in a fresh cache and run
    this file against that build, in a subprocess (one process holds one `moe_serve` op library).
    x86-64-v3 (AVX2 + FMA, e.g. Zen 3): the AVX2 quantized matmuls and the portable loops;
    x86-64-v2 (SSE4.2): no quantized matmuls (QuantLinear keeps torch's kernels), portable loops;
    native-no-amx (a CPU with AMX): this build with MOE_SERVE_AMX=0, the AVX512-BF16 matmuls."""
    import subprocess
    import sys

    from serve_app.model.kernels import cpu_features
    if march == "x86-64-v3" and "avx512f" not in cpu_features():
        pytest.skip("this CPU has no AVX-512: its native build is the AVX2 build, which this file's own run tests")
    if march == "native-no-amx" and "amx_bf16" not in cpu_features():
        pytest.skip("this CPU has no AMX: its native build is the one this file's own run tests")
    env = dict(os.environ, MOE_SERVE_KERNEL_MARCH=march, MOE_SERVE_KERNEL_CACHE=str(tmp_path))
    if march == "native-no-amx":
        env.update(MOE_SERVE_KERNEL_MARCH="native", MOE_SERVE_AMX="0")
    probe = subprocess.run([sys.executable, "-c", "from serve_app.model import cpu_kernels as k; o = k.ops(); "
                            "print(o is not None, o is not None and o.int8_linear_supported())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.split() == ["True", str(quant_gemm)], probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not builds_for_other_cpus"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
