"""Kernel and dtype choices, measured on the machine that serves, once per process.

Three choices decide how fast a step runs, and each depends on the hardware, not on the model:
1. the activation dtype of the quantized (fast) lane: bf16 where the fused cpu_kernels run
   (AVX512-BF16 or AVX2 + FMA builds: they take bf16 and compute in float32) or where torch's
   packed integer kernels are fast in it (CUDA; measured elsewhere), float32 otherwise;
2. per (device, mode, dtype), whether a quantized linear multiplies with a packed kernel (the fused
   cpu_kernels one with bf16 activations, else torch's) or with a dequantized copy — and that
   copy's dtype for prefill chunks (float32 where bf16 GEMMs are slow: `dense_copy_dtype`);
3. the dtype SDPA computes its score/value products in where the fused decode kernel (cpu_kernels)
   does not run — prefill chunks, a GPU, a CPU without the build (bf16 SDPA at one query row
   is 4x slower than float32 on a Zen 4 CPU: 184 vs 42 µs, see docs/benchmarks.md).

Why measured here and not typed into a table: the last table in the source recorded a Zen 4 as
"AVX2 only" and sent the fast lane down float32 dequantized copies, 4x slower than the kernel it
had ruled out. Each choice below times the candidates on a shape like the bundled model's (a few
ms at start-up, interleaved so a burst of load hits every candidate alike) and keeps the faster;
`bench/quant_kernels.py` prints the same measurement with the CPU's features next to it.
`MOE_SERVE_KERNELS=fixed` skips the timing and takes the documented defaults (reproducible tests).

Legend: M=rows, N=out features, K=in features, L=context length, H=heads, Dh=head dim.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A linear of the bundled model's widest dense shape (the fused expert gate_up, 768 x 192), and
# enough distinct weights (8 MB in float32) that they do not all sit in L2, as in a decode step.
_PROBE_N, _PROBE_K, _PROBE_WEIGHTS = 768, 192, 12


def cpu_features() -> list[str]:
    """The CPU flags that matter to these choices, read from the machine (Linux /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx512_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [w for w in wanted if w in flags]


def has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 natively."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()))


def _median_us(fns: dict, rounds: int = 7, inner: int = 20) -> dict[str, float]:
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def _fixed() -> bool:
    return os.environ.get("MOE_SERVE_KERNELS", "measure") == "fixed"


@dataclass(frozen=True)
class LinearTimes:
    """µs per M-row matmul on the probe shape, cycling over distinct weights."""
    float32: float
    bfloat16: float
    int8_kernel_bf16: float
    int8_kernel_f32: float


@torch.inference_mode()
def time_linears(rows: int = 1, device: str = "cpu", weights: int = _PROBE_WEIGHTS, inner: int = 20) -> LinearTimes:
    """`weights` distinct weights are cycled: their total size decides which cache level feeds the
    matmul (12: 7 MB in float32, inside L3; 64: 38 MB, the bundled model's float32 size, outside)."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(_PROBE_N, _PROBE_K, generator=gen).to(device) for _ in range(weights)]
    qs = [(torch.randint(-127, 128, (_PROBE_N, _PROBE_K), generator=gen, dtype=torch.int8).to(device),
           torch.rand(_PROBE_N, generator=gen).to(device)) for _ in range(weights)]
    wb = [w.bfloat16() for w in ws]
    x = torch.randn(rows, _PROBE_K, generator=gen).to(device)
    xb = x.bfloat16()
    sb = [s.bfloat16() for _, s in qs]

    def cycle(f):
        return lambda: [f(i) for i in range(weights)]
    t = _median_us(inner=inner, fns={
        "float32": cycle(lambda i: F.linear(x, ws[i])),
        "bfloat16": cycle(lambda i: F.linear(xb, wb[i])),
        "int8_kernel_bf16": cycle(lambda i: torch._weight_int8pack_mm(xb, qs[i][0], sb[i])),
        "int8_kernel_f32": cycle(lambda i: torch._weight_int8pack_mm(x, qs[i][0], qs[i][1])),
    })
    return LinearTimes(**{k: v / weights for k, v in t.items()})


@functools.lru_cache(maxsize=None)
def fast_lane_dtype(device_type: str) -> torch.dtype:
    """Activation dtype of the quantized lane: bf16 if the int8 kernel with bf16 activations beats
    a float32 matmul at one row (decode) on this device, else float32."""
    if device_type == "cuda":
        return torch.bfloat16           # tinygemm (int4) takes bf16 only; int8 mm is bf16-native
    if _fixed():
        return torch.bfloat16 if has_bf16_units() else torch.float32
    from serve_app.model import cpu_kernels
    ops = cpu_kernels.ops(device_type)
    if ops is not None and ops.int8_linear_supported():
        # The fused kernels take bf16 activations and compute in float32 (AVX512-BF16 or AVX2
        # FMAs). One linear at one row is a close call on an AVX2 CPU (768x192: 31 vs 48 µs, and
        # torch's int8 kernel 38), and a loaded machine can tip it; the step is not: int8 decode at
        # batch 1 took 3.9 ms in bf16 with the fused kernels against 9.0 ms for a float32 step on
        # the Zen 3 (bench/decode_step.py, docs/benchmarks.md 2026-12-02).
        return torch.bfloat16
    try:
        t = time_linears(1, device_type)
    except (RuntimeError, NotImplementedError):
        return torch.float32
    return torch.bfloat16 if t.int8_kernel_bf16 < 0.8 * t.float32 else torch.float32


# Row counts probed for the kernel/dense crossover, and the fixed defaults (MOE_SERVE_KERNELS=fixed).
# Doubling steps up to 64: the crossover moves with the CPU and the shape (on a Xeon with AMX,
# before the AMX kernel: 768x192 int8 at 8 rows, kernel 53 µs vs bf16 dense 63, at 16 rows 86 vs 74;
# the 8192x192 LM head a close call at 8 rows), and a limit probed at 1, 4, 16 only could not say 8.
_PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64)
_FIXED_ROW_LIMIT = {torch.bfloat16: 8}
_PROBE_BYTES = 8 << 20          # weights cycled per probe: past L2, as a model's many linears are
NO_LIMIT = 1 << 30


# A step that verifies drafts multiplies on the packed kernels up to this many rows, above its
# row limit (precision.RowPrecision.packed: a row then computes what a one-row step computes).
# What it costs, measured on the AVX2 VM (2026-12-04, int8 768x192 / 8192x192, 1 thread, µs):
# packed kernel vs dense float32 copy at 17 rows 368 / 282 and 3,811 / 3,196, at 64 rows
# 1,101 / 649 and 11,633 / 7,858: 1.2-1.7x on the linears of a step that replaces up to 17 decode
# steps; above 64 rows (a prefill chunk beside the drafts) the dense copies are kept.
PACKED_VERIFY_MAX_ROWS = 64


def quant_path(device_type: str, mode: str, dtype: torch.dtype) -> str:
    """'kernel' or 'dequant' (a cached float copy) for quantized linears of `mode` at `dtype`:
    'kernel' where the packed kernel beats the float matmul at one row (decode)."""
    return "kernel" if kernel_row_limit(device_type, mode, dtype) >= 1 else "dequant"


@functools.lru_cache(maxsize=None)
def kernel_row_limit(device_type: str, mode: str, dtype: torch.dtype, out_features: int = _PROBE_N,
                     in_features: int = _PROBE_K) -> int:
    """Up to how many rows the packed kernel beats F.linear on the dequantized weight (0: never),
    measured on the weight's own shape [out_features, in_features] (one probe per distinct shape:
    a model has a handful — attention, experts, LM head — and the crossover differs between them).

    Why a limit: the packed CPU kernels are GEMV-shaped, their time grows linearly with the rows
    (768x192, bf16: 12 µs at 1 row, 1.5 ms at 256), while a bf16 GEMM reuses each weight across
    rows (42 µs at 1 row, 0.4 ms at 256). So decode steps read the packed codes and a prefill
    chunk multiplies a dense copy of the same dequantized weights: same numerics, the right kernel
    for each shape. CUDA: the kernels there are tiled, no limit.
    """
    if device_type != "cpu":
        return NO_LIMIT
    if _fixed():
        return _FIXED_ROW_LIMIT.get(dtype, 0)
    from serve_app.model.quant import QuantLinear      # quant imports this module
    gen = torch.Generator().manual_seed(0)
    count = max(2, min(_PROBE_WEIGHTS // 2, -(-_PROBE_BYTES // (out_features * in_features * 2))))
    try:
        layers = {}
        for path in ("kernel", "dequant"):
            mods = [QuantLinear.from_weight(torch.randn(out_features, in_features, generator=gen), mode, 64, dtype,
                                            "cpu", path=path, row_limit=NO_LIMIT) for _ in range(count)]
            if path == "dequant":
                for m in mods:
                    m.materialize()
            layers[path] = mods
        limit = 0
        with torch.inference_mode():
            for rows in _PROBE_ROWS:
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                t = _median_us({p: (lambda ms=ms: [m(x) for m in ms]) for p, ms in layers.items()}, rounds=3, inner=4)
                if t["kernel"] >= t["dequant"]:
                    break
                limit = rows
    except (RuntimeError, NotImplementedError):
        return 0
    return limit


@functools.lru_cache(maxsize=None)
def attention_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype decode attention computes in for activations of `dtype`: `dtype` itself, or
    float32 when this device's SDPA is faster there (Q/K/V are cast, the output cast back)."""
    if dtype == torch.float32 or device_type != "cpu":
        return dtype
    if _fixed():
        return torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 32, generator=gen)                   # [B, H, 1, Dh]
    k, v = torch.randn(1, 3, 512, 32, generator=gen), torch.randn(1, 3, 512, 32, generator=gen)  # [B, G, L, Dh]
    low = [t.to(dtype) for t in (q, k, v)]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, enable_gqa=True)
    with torch.inference_mode():
        t = _median_us({"native": lambda: sdpa(*low),
                        "float32": lambda: sdpa(*(x.float() for x in low)).to(dtype)})
    return torch.float32 if t["float32"] < t["native"] else dtype


@functools.lru_cache(maxsize=None)
def full_precision_dtype(device_type: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """What "full precision" computes in: the checkpoint's own dtype (a bf16 checkpoint is served
    in bf16, a float32 one in float32), unless this device's matmuls are slower in it than in
    float32 (CPUs without bf16 units; float16 on any CPU), where float32 is both faster and exact."""
    if checkpoint_dtype == torch.float32 or device_type == "cuda":
        return checkpoint_dtype
    if checkpoint_dtype == torch.float16:
        return torch.float32
    # Decided by the CPU's features, not by a timing at start-up: the full lane's numerics must not
    # flip with a noisy measurement. `time_linears(1, weights=64)` (a model-sized working set) is
    # the measurement behind it, printed by bench/quant_kernels.py: on a Zen 4 with AVX512-BF16,
    # bf16 45 µs against float32 88 µs per 768x192 matmul at one row (docs/benchmarks.md).
    return torch.bfloat16 if has_bf16_units() else torch.float32


def dense_copy_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a quantized weight's dense copy (prefill-sized calls, see kernel_row_limit) for
    activations of `dtype`: float32 where this device's 16-bit matmuls are slower than float32's
    (the full_precision_dtype rule: CPUs without bf16 units), else `dtype`. Such a call then runs
    x.float() @ dense -> x's dtype: on a Zen 3 (AVX2) a bf16 GEMM of 32 rows x 192 -> 768 took
    8.8 ms against 1.7 ms in float32 (bench/quant_kernels.py, docs/benchmarks.md 2026-12-02)."""
    if dtype == torch.float32:
        return dtype
    return torch.float32 if full_precision_dtype(device_type, dtype) == torch.float32 else dtype


def forget_choices() -> None:
    """Drop this process's measured choices, so the next call measures (or, with
    MOE_SERVE_KERNELS=fixed, reads the fixed table) again. For tests that compare two processes'
    numerics: each measures on its own, and a loaded machine can tip a close measurement."""
    for choice in (fast_lane_dtype, kernel_row_limit, attention_dtype, full_precision_dtype):
        choice.cache_clear()
