// Fused CPU kernels for the decode step (issue 14, "a lean decode step"): the op library `moe_serve`.
//
// Why C++: a decode step of the bundled model is ~360 small aten ops, each costing 2-20 µs of
// dispatch and temporaries on this CPU, ~30x the bytes floor. These kernels each replace a chain
// of them with one loop over the data, computing in float32 and rounding once to the output dtype:
//   paged_attention         attention of every query row (decode or prefill) against its sequence's
//                           keys where they lie in the paged cache (no [B, L] gather copy, no mask);
//   add_rms_norm            residual add + RMSNorm (torch's CPU rms_norm is 7 ops);
//   silu_mul                SwiGLU's silu(gate) * up on the fused [R, 2F] projection;
//   rotary_                 RoPE in place on q and k of the fused qkv projection;
//   int8/int4_linear        W8A16 / W4A16 matmuls (AVX512-BF16, or AVX2 + FMA float32 FMAs);
//   moe_quant_experts       a layer's quantized experts (gather, gate_up, silu*up, down, combine) in one call;
//   moe_route, moe_combine  the router's gate -> top-k -> grouping, and the weighted sum back.
// The pure-torch path (model/attention.py, transformer.py) stays the reference: float32 steps
// never come here, and tests hold these kernels to it.
//
// Legend: B=sequences, H=query heads, G=kv heads, R=H/G query heads per kv head, Dh=head dim,
// N=cache blocks, S=block size, W=blocks per table, L=context length, T=rows, D=hidden, F=width.

//
// Files: attention.cpp (paged_attention), pointwise.cpp (add_rms_norm, silu_mul, rotary_),
// quant_gemm.cpp (int8/int4 pack and linear, moe_quant_experts), moe.cpp (moe_route, moe_combine),
// common.h (conversions, exp). Each registers its ops as a fragment of the library defined here.
#include <torch/library.h>

TORCH_LIBRARY(moe_serve, m) {}
