"""Weight-only INT8 / INT4 experts: error matches the rounding model, both matmul paths agree, and a
quantized backend stands in for the float one on a real (tiny, random-weight) checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve_app.model import ModelLoadError, load_model
from serve_app.model.moe import ExpertFFN, route
from serve_app.model.quant import QuantConfigError, QuantLinear, pack_int4, quantize_int4, unpack_int4
from serve_app.model.quant_experts import QuantizedExpertBackend, QuantizedExpertFFN
from serve_app.model.quant_io import load_quantized, save_quantized
from tests.helpers.checkpoints import build_checkpoint

INT4_CASES = [("int4", 32), ("int4", 64), ("int4", 128)]
ALL_CASES = [("int8", 64)] + INT4_CASES


def _weight_and_input(n: int = 256, k: int = 256, rows: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.08, torch.randn(rows, k, generator=gen)   # [N, K], [R, K]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _rounding_model_error(layer: QuantLinear, w: torch.Tensor) -> float:
    """Predicted relative error: round-to-nearest leaves each weight off by U(-s/2, s/2) (std s/√12),
    independent of x, so ‖x(W-Ŵ)ᵀ‖/‖xWᵀ‖ ≈ rms(s)/√12 / std(w) for random x."""
    return float((layer.scales.float().pow(2).mean() / 12).sqrt() / w.std())


def test_error_follows_rounding_model_and_shrinks_with_group_size():
    w, x = _weight_and_input()
    ref = x @ w.T                                                           # [R, N]
    errors = {}
    for mode, group in ALL_CASES:
        layer = QuantLinear.from_weight(w, mode, group, path="dequant")
        errors[(mode, group)] = err = _rel(layer(x), ref)
        # Measured 1.01-1.04 × the prediction; the max of each group errs by exactly half a step.
        assert err < 1.1 * _rounding_model_error(layer, w), (mode, group, err)
    # Absolute bounds for Gaussian weights: E[max|w|] over a group of 32/64/128 is about
    # 2.5/2.7/2.95 σ (over a row of 256: 3.1 σ), step = max/7.5 (int4) or max/127 (int8),
    # error ≈ step/√12/σ → 0.096/0.104/0.114 and 0.007; 5% margin.
    bounds = {("int8", 64): 0.0074, ("int4", 32): 0.101, ("int4", 64): 0.109, ("int4", 128): 0.12}
    for case, err in errors.items():
        assert err < bounds[case], (case, err)
    assert errors[("int4", 32)] < errors[("int4", 64)] < errors[("int4", 128)]
    assert errors[("int8", 64)] < errors[("int4", 32)] / 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,group", ALL_CASES)
@pytest.mark.parametrize("k", [256, 48])      # 48: not a multiple of any group, so groups are padded
def test_kernel_path_equals_dequant_path(mode, group, k, dtype):
    w, x = _weight_and_input(n=96, k=k, rows=8)
    kernel = QuantLinear.from_weight(w, mode, group, dtype=dtype, path="kernel")
    plain = QuantLinear.from_weight(w, mode, group, dtype=dtype, path="dequant")
    y, ref = kernel(x.to(dtype)), plain(x.to(dtype))
    assert y.shape == ref.shape == (8, 96) and y.dtype == dtype
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # Both paths hold the same codes and scales; the kernel's layout reads back exactly.
    for a, b in zip(kernel.codes(), plain.codes()):
        assert torch.equal(a, b)
    assert torch.equal(kernel.dequantize(), plain.dequantize())


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 64)])
def test_a_row_computes_alike_whatever_the_calls_row_count(mode, group):
    """A decode step (one row), a verification of drafts and a prefill chunk (many rows: above
    row_limit the dense copy) multiply with the same scale values, so a row's bf16 output does not
    depend on how many rows share the call, up to float32 summation order. Before: the fused
    kernels took float32 scales and the dense copy bf16-rounded ones, and 30% of the outputs were
    a bf16 step apart (typing-through drafts then changed greedy text in the quantized lanes)."""
    w, x = _weight_and_input(n=768, k=192, rows=17)
    layer = QuantLinear.from_weight(w, mode, group, dtype=torch.bfloat16, path="kernel", row_limit=1)
    layer.materialize()
    scales = layer.codes()[1]
    assert torch.equal(scales, scales.bfloat16().float())          # values of the lane's dtype
    xb = x.bfloat16()
    many = layer(xb)                                                 # 17 rows: the dense copy
    one = torch.cat([layer(xb[i:i + 1]) for i in range(17)])         # 1 row each: the packed kernel
    from serve_app.model import cpu_kernels
    from tests.unit.test_cpu_kernels import ROW_INVARIANT_ISAS
    ops = cpu_kernels.ops()
    if ops is not None and ops.int8_linear_supported() and ops.quant_gemm_isa() not in ROW_INVARIANT_ISAS:
        # The AVX512-BF16 / AMX kernels do not sum a row as the dense copy does (ROW_INVARIANT_ISAS):
        # 38-42% of the outputs a bf16 step apart on the Zen 4 (2026-12-04, int8 and int4), so
        # only the error bound holds there; the typing-through test xfails on those builds.
        assert _rel(many, one) < 1e-2
        return
    assert (many != one).float().mean() < 0.005, (many != one).float().mean()


def test_int4_codes_pack_two_per_byte_and_round_trip():
    w, _ = _weight_and_input(n=32, k=100)
    v, scales = quantize_int4(w, 32)
    assert v.shape == (32, 128) and scales.shape == (32, 4)                 # K padded to 4 groups
    assert int(v.min()) >= -8 and int(v.max()) <= 7 and (v[:, 100:] == 0).all()
    packed = pack_int4(v)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), v)


def test_default_path_follows_the_measured_choice_on_cpu():
    w, _ = _weight_and_input(n=64, k=64)
    for mode in ("int8", "int4"):
        assert QuantLinear.from_weight(w, mode).path == "dequant"           # float32: kernels are slow
        assert QuantLinear.from_weight(w.bfloat16(), mode).path == "kernel"  # bf16: kernels win
    # The CPU int4 packer tiles rows by 16: 40 rows cannot use it and fall back.
    assert QuantLinear.from_weight(w[:40].bfloat16(), "int4").path == "dequant"


def test_bad_mode_group_size_and_path_are_named():
    w, _ = _weight_and_input(n=32, k=64)
    with pytest.raises(QuantConfigError, match="'int3'"):
        QuantLinear.from_weight(w, "int3")
    with pytest.raises(QuantConfigError, match="group size 48"):
        QuantLinear.from_weight(w, "int4", 48)
    with pytest.raises(QuantConfigError, match="'fast'"):
        QuantLinear.from_weight(w, "int8", path="fast")


def test_bytes_per_expert_quarter_for_int8_and_eighth_plus_scales_for_int4():
    ffn = ExpertFFN(256, 512)                                               # the default model's expert
    torch.nn.init.normal_(ffn.gate_up, std=0.08)
    torch.nn.init.normal_(ffn.down, std=0.08)
    weights = 3 * 256 * 512
    assert sum(p.numel() * 4 for p in ffn.parameters()) == 4 * weights
    int8 = QuantizedExpertFFN.from_float(ffn, "int8")
    assert int8.nbytes() == weights + 4 * (1024 + 256)                      # + one fp32 scale per row
    groups = 1024 * 256 // 64 + 256 * 512 // 64
    assert QuantizedExpertFFN.from_float(ffn, "int4", 64, path="dequant").nbytes() == weights // 2 + 4 * groups
    # The int4 kernel takes a (scale, zero) pair per group; zero is always 0 but must be there.
    assert QuantizedExpertFFN.from_float(ffn, "int4", 64, path="kernel").nbytes() == weights // 2 + 8 * groups


# --- on a real tiny checkpoint ----------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("q8"), "mixtral", num_local_experts=8)
    return load_model(ckpt.path)


# Calibrated on this checkpoint (random weights, std 0.08, D=64, F=48); measured: int8 cos 0.99994;
# int4 G=32 min cos 0.985 (mean 0.987), G=64 and G=128 0.983 (at K=48 and 64 both are one group).
EXPERT_COSINE = {("int8", 64): 0.999, ("int4", 32): 0.975, ("int4", 64): 0.97, ("int4", 128): 0.97}


@pytest.mark.parametrize("mode,group", ALL_CASES)
def test_quantized_backend_outputs_close_to_float_backend(model, mode, group):
    local = model.local_experts
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 64, generator=gen)                                  # [T, D]
    plan = route(x, torch.randn(8, 64, generator=gen), top_k=2, normalize=True, layer=1)
    xs = torch.randn(64, 64, generator=gen)
    want = local.run_experts(x, plan)
    for path in ("kernel", "dequant"):
        qbackend = QuantizedExpertBackend.from_backend(local, mode, group, path=path)
        assert qbackend.holds() == local.holds()
        got = qbackend.run_experts(x, plan)
        assert sorted(got) == sorted(want) == plan.experts
        for a in plan.assignments:
            assert got[a.expert].shape == want[a.expert].shape == (len(a.rows), 64)   # [R, D]
        for name, ffn in local.ffn.items():
            cos = F.cosine_similarity(qbackend.ffn[name](xs).flatten(), ffn(xs).flatten(), dim=0)
            assert cos > EXPERT_COSINE[(mode, group)], (path, name, float(cos))


# Agreement of next-token argmax over 8×32 random token positions. Measured: int8 99.2%, int4 G=32
# 90.6%, G=64 88.7%. Random weights are harsher than trained ones: their logits are close together,
# so small perturbations flip the argmax more often.
ARGMAX_AGREEMENT = {"int8": 0.97, "int4": 0.85}


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32)])
def test_model_with_quantized_experts_keeps_next_token_argmax(model, mode, group):
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)                                                   # [B, S, V]
        model.set_expert_backend(QuantizedExpertBackend.from_backend(model.local_experts, mode, group))
        try:
            got = model(ids)
        finally:
            model.set_expert_backend(None)
    assert got.shape == want.shape
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agreement >= ARGMAX_AGREEMENT[mode], agreement


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32)])
def test_saved_backend_loads_with_identical_outputs(model, tmp_path, mode, group):
    # Saved from the kernel layout (read back through the kernel), loaded in both layouts.
    qbackend = QuantizedExpertBackend.from_backend(model.local_experts, mode, group, path="kernel")
    save_quantized(qbackend, tmp_path / "experts.safetensors")
    same = load_quantized(tmp_path / "experts.safetensors", path="kernel")
    plain = load_quantized(tmp_path / "experts.safetensors")                # float32 CPU → dequant
    assert plain.ffn["0_0"].down.path == "dequant"
    assert same.holds() == plain.holds() == qbackend.holds()
    assert (same.mode, same.group_size) == (mode, group)
    assert same.bytes_per_expert() == qbackend.bytes_per_expert()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for name, ffn in qbackend.ffn.items():
        assert torch.equal(same.ffn[name](x), ffn(x))
        assert _rel(plain.ffn[name](x), ffn(x)) < 1e-5


def test_loading_a_float_checkpoint_as_quantized_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "float.safetensors"))
    with pytest.raises(ModelLoadError, match="format None"):
        load_quantized(tmp_path / "float.safetensors")


def test_materialized_copies_keep_quantized_numerics(tmp_path):
    from serve_app.model import load_model
    from serve_app.model.quant_experts import quantized_copies
    from tests.helpers.checkpoints import build_checkpoint

    local = load_model(build_checkpoint(tmp_path, "mixtral", num_local_experts=8).path).local_experts
    plain = quantized_copies(local, ("int8", "int4"), 32, materialize=False)
    kept = quantized_copies(local, ("int8", "int4"), 32, materialize=True)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for mode in ("int8", "int4"):
        a, b = plain[mode].ffn["1_3"](x), kept[mode].ffn["1_3"](x)
        assert torch.allclose(a, b, atol=1e-5)                       # same numbers, computed once
        assert not torch.allclose(b, local.ffn["1_3"](x), atol=1e-4)  # and still not the float expert
