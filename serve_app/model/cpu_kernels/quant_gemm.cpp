// W8A16 / W4A16 linears and whole-layer quantized experts on AVX512-BF16.
#include "common.h"

namespace {
using namespace moe_serve_kernels;

// --- W8A16 linear: int8 weights, bf16 activations, float32 accumulation --------------------------
//
// torch's CPU int8 kernel (_weight_int8pack_mm) is a GEMV: 13 µs at one row for 768x192 and 45 µs
// at eight. Here the weight is repacked once into AVX512-BF16's pair layout, [N/16, K/2, 16, 2]
// (16 output rows x 2 inputs per 32-byte group), each group converted to bf16 in registers (int8
// values are exact in bf16) and multiplied with `vdpbf16ps` against broadcast pairs of x, up to 8
// rows of x per pass over the weight. Numerics: bf16 x bf16 products summed in float32, times the
// row's scale, rounded once to bf16 — what the torch kernel computes, in another summation order.

// w [N, K] int8 -> [ceil(N/16), ceil(K/2), 16, 2] int8, zero-padded.
at::Tensor int8_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_pack: w must be [N, K] int8");
  const int64_t N = w.size(0), K = w.size(1), Nb = (N + 15) / 16, Kp = (K + 1) / 2;
  auto wc = w.contiguous();
  auto out = at::zeros({Nb, Kp, 16, 2}, wc.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) dst[(((n / 16) * Kp + k / 2) * 16 + n % 16) * 2 + k % 2] = src[n * K + k];
  return out;
}

bool int8_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
inline __m512bh int8_group_to_bf16(const int8_t* w) {      // 32 int8 (16 rows x 2 inputs) -> bf16 pairs
  const __m256i w8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(w8)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(w8, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// MB rows of x against one 16-row group of the weight. Why kSplit accumulators per row: a
// vdpbf16ps waits ~6 cycles for the previous one into the same register, so with one or two rows
// the loop is latency-bound (12 µs for 768x192 at one row, the torch kernel's speed); kSplit x MB
// independent chains (>= 8) keep the FMA units busy.
template <int MB>
void int8_block(const c10::BFloat16* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale,
                c10::BFloat16* out, int64_t ldo, int64_t valid) {
  constexpr int kSplit = MB >= 8 ? 1 : (8 + MB - 1) / MB;
  __m512 acc[kSplit][MB];
  for (int s = 0; s < kSplit; ++s)
    for (int m = 0; m < MB; ++m) acc[s][m] = _mm512_setzero_ps();
  const int64_t full = K / 2;                    // pairs with both inputs inside K
  int64_t kp = 0;
  for (; kp + kSplit <= full; kp += kSplit) {
    for (int s = 0; s < kSplit; ++s) {
      const __m512bh wb = int8_group_to_bf16(w + (kp + s) * 32);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * ldx + 2 * (kp + s), 4);
        acc[s][m] = _mm512_dpbf16_ps(acc[s][m], wb, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
      }
    }
  }
  for (; kp < full; ++kp) {
    const __m512bh wb = int8_group_to_bf16(w + kp * 32);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * kp, 4);
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], wb, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
    }
  }
  if (K % 2) {                                   // a last input without a partner: pair it with 0
    const __m512bh wb = int8_group_to_bf16(w + full * 32);
    for (int m = 0; m < MB; ++m) {
      const int32_t pair = static_cast<int32_t>(x[m * ldx + K - 1].x);      // high half (input K) = 0
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], wb, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
    }
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  const __mmask16 keep = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  for (int m = 0; m < MB; ++m) {
    __m512 sum = acc[0][m];
    for (int s = 1; s < kSplit; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
    const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(sum, sc)));
    _mm256_mask_storeu_epi16(out + m * ldo, keep, y);
  }
}
#endif

#if defined(__AVX512BF16__)
// f(std::integral_constant<int, MB>{}) for MB = rows (1..8): the row count a template argument,
// so each block keeps its accumulators in registers.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// y [M, N] = x [M, K] @ dequant(packed)^T, all raw pointers (int8_linear and the fused experts).
void int8_gemm(const c10::BFloat16* xp, int64_t M, int64_t K, const int8_t* wp, int64_t N, const float* sp,
               c10::BFloat16* op, bool parallel) {
  const int64_t Nb = (N + 15) / 16, Kp = (K + 1) / 2;
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mb = M - m0 < 8 ? M - m0 : 8;
        const auto* xb = xp + m0 * K;
        auto* ob = op + m0 * N + nb * 16;
        const int8_t* wb = wp + nb * Kp * 32;
        with_rows(mb, [&](auto rows) { int8_block<rows>(xb, K, wb, K, sp + nb * 16, ob, N, valid); });
      }
    }
  };
  if (parallel) at::parallel_for(0, Nb, 8, body);
  else body(0, Nb);
}

// --- W4A16: the same pair layout with 4-bit codes and a float32 scale per (row, group of G inputs)

inline __m512bh int4_group_to_bf16(const uint8_t* w) {    // 16 bytes: value i in byte i's low nibble, i+16 high
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi32(8);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)), eight));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), eight));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// As int8_block, with the scale applied per group: each group's sums (kSplit chains) are folded
// into the total with one FMA by the group's 16 row scales.
template <int MB>
void int4_block(const c10::BFloat16* x, int64_t ldx, const uint8_t* w, int64_t K, int64_t G, const float* scales,
                c10::BFloat16* out, int64_t ldo, int64_t valid) {
  constexpr int kSplit = MB >= 8 ? 1 : (8 + MB - 1) / MB;
  const int64_t pairs = (K + 1) / 2, per_group = G / 2;
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t q = 0, kp0 = 0; kp0 < pairs; ++q, kp0 += per_group) {
    const int64_t kp_end = kp0 + per_group < pairs ? kp0 + per_group : pairs;
    const int64_t kp_full = kp_end < K / 2 ? kp_end : K / 2;     // pairs with both inputs inside K
    __m512 acc[kSplit][MB];
    for (int s = 0; s < kSplit; ++s)
      for (int m = 0; m < MB; ++m) acc[s][m] = _mm512_setzero_ps();
    int64_t kp = kp0;
    for (; kp + kSplit <= kp_full; kp += kSplit) {
      for (int s = 0; s < kSplit; ++s) {
        const __m512bh wb = int4_group_to_bf16(w + (kp + s) * 16);
        for (int m = 0; m < MB; ++m) {
          int32_t pair;
          std::memcpy(&pair, x + m * ldx + 2 * (kp + s), 4);
          acc[s][m] = _mm512_dpbf16_ps(acc[s][m], wb, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
        }
      }
    }
    for (; kp < kp_end; ++kp) {
      const __m512bh wb = int4_group_to_bf16(w + kp * 16);
      for (int m = 0; m < MB; ++m) {
        int32_t pair = static_cast<int32_t>(x[m * ldx + 2 * kp].x);          // an odd K's last input: partner 0
        if (2 * kp + 1 < K) std::memcpy(&pair, x + m * ldx + 2 * kp, 4);
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], wb, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
      }
    }
    const __m512 sc = _mm512_loadu_ps(scales + q * 16);
    for (int m = 0; m < MB; ++m) {
      __m512 sum = acc[0][m];
      for (int s = 1; s < kSplit; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      total[m] = _mm512_fmadd_ps(sum, sc, total[m]);
    }
  }
  const __mmask16 keep = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  for (int m = 0; m < MB; ++m) {
    const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(total[m]));
    _mm256_mask_storeu_epi16(out + m * ldo, keep, y);
  }
}

// A quantized weight as the kernels read it. group == 0: INT8, packed [Nb, Kp, 16, 2] int8 and
// scales [Nb * 16]; group > 0: INT4, packed [Nb, Kp, 16] bytes and scales [Nb, Q, 16].
struct QuantWeight {
  const void* packed;
  const float* scales;
  int64_t group;
};

// y [M, N] = x [M, K] @ dequant(w)^T (int8_linear, int4_linear and the fused experts).
void quant_gemm(const c10::BFloat16* xp, int64_t M, int64_t K, QuantWeight w, int64_t N, c10::BFloat16* op,
                bool parallel) {
  if (w.group == 0) return int8_gemm(xp, M, K, static_cast<const int8_t*>(w.packed), N, w.scales, op, parallel);
  const int64_t Nb = (N + 15) / 16, Kp = (K + 1) / 2, Q = (K + w.group - 1) / w.group;
  const auto* wp = static_cast<const uint8_t*>(w.packed);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mb = M - m0 < 8 ? M - m0 : 8;
        const auto* xb = xp + m0 * K;
        auto* ob = op + m0 * N + nb * 16;
        const uint8_t* wb = wp + nb * Kp * 16;
        const float* sb = w.scales + nb * Q * 16;
        with_rows(mb, [&](auto rows) { int4_block<rows>(xb, K, wb, K, w.group, sb, ob, N, valid); });
      }
    }
  };
  if (parallel) at::parallel_for(0, Nb, 8, body);
  else body(0, Nb);
}
#endif

// v [N, Kp] int8 in [-8, 7] (unpacked INT4 codes), scales [N, Q] float32 -> (packed [Nb, Kp/2, 16]
// uint8, value i of each 32-value group in byte i's low nibble and value i+16 in byte i's high;
// scales [Nb, Q, 16] float32, zero-padded rows).
std::vector<at::Tensor> int4_pack(const at::Tensor& v, const at::Tensor& scales) {
  TORCH_CHECK(v.dim() == 2 && v.scalar_type() == at::kChar && scales.dim() == 2 && scales.size(0) == v.size(0),
              "int4_pack: v [N, Kp] int8, scales [N, Q]");
  const int64_t N = v.size(0), K = v.size(1), Nb = (N + 15) / 16, Kp = (K + 1) / 2, Q = scales.size(1);
  auto vc = v.contiguous();
  auto sc = scales.to(at::kFloat).contiguous();
  auto out = at::full({Nb, Kp, 16}, 0x88, v.options().dtype(at::kByte));   // code 8 = value 0 (padding)
  auto so = at::zeros({Nb, Q, 16}, sc.options());
  const int8_t* src = vc.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = (n % 16) * 2 + k % 2;                               // position in the 32-value group
      uint8_t& byte = dst[((n / 16) * Kp + k / 2) * 16 + i % 16];
      const uint8_t code = static_cast<uint8_t>(src[n * K + k] + 8);
      byte = i < 16 ? static_cast<uint8_t>((byte & 0xF0) | code) : static_cast<uint8_t>((byte & 0x0F) | (code << 4));
    }
  const float* s = sc.data_ptr<float>();
  float* sd = so.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < Q; ++q) sd[((n / 16) * Q + q) * 16 + n % 16] = s[n * Q + q];
  return {out, so};
}

// x [M, K] bf16; (packed, scales) from int4_pack with group size G -> [M, N] bf16.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N, int64_t G) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_linear: x must be [M, K] bf16");
  TORCH_CHECK(G > 0 && G % 2 == 0, "int4_linear: group size must be even");
  const int64_t K = x.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(0) == (N + 15) / 16
              && packed.size(1) >= (K + 1) / 2 && packed.size(2) == 16 && packed.is_contiguous(), "int4_linear: packed layout");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.size(1) * G >= K && scales.is_contiguous(),
              "int4_linear: scales [Nb, Q, 16] float32");
  TORCH_CHECK(packed.size(1) == (K + 1) / 2, "int4_linear: x must have the weight's in_features (pad it)");
  auto xc = x.contiguous();
  auto out = at::empty({x.size(0), N}, xc.options());
  quant_gemm(xc.data_ptr<c10::BFloat16>(), x.size(0), K, {packed.data_ptr(), scales.data_ptr<float>(), G}, N,
             out.data_ptr<c10::BFloat16>(), true);
  return out;
#else
  TORCH_CHECK(false, "int4_linear needs AVX512-BF16 (check int8_linear_supported())");
#endif
}

void check_packed(const at::Tensor& packed, const at::Tensor& scales, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.scalar_type() == at::kChar
              && packed.is_contiguous(), what, ": not an int8_pack layout");
  TORCH_CHECK(packed.size(1) == (K + 1) / 2 && packed.size(0) == (N + 15) / 16, what, ": input does not match the weight");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == packed.size(0) * 16 && scales.is_contiguous(),
              what, ": scales [Nb*16] float32");
}

// x [M, K] bf16; packed from int8_pack; scales [ceil(N/16)*16] float32 (zero-padded) -> [M, N] bf16.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be [M, K] bf16");
  check_packed(packed, scales, x.size(1), N, "int8_linear");
  auto xc = x.contiguous();
  auto out = at::empty({x.size(0), N}, xc.options());
  int8_gemm(xc.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), packed.data_ptr<int8_t>(), N, scales.data_ptr<float>(),
            out.data_ptr<c10::BFloat16>(), true);
  return out;
#else
  TORCH_CHECK(false, "int8_linear needs AVX512-BF16 (check int8_linear_supported())");
#endif
}

void check_quant(const at::Tensor& packed, const at::Tensor& scales, int64_t K, int64_t N, int64_t group, const char* what) {
  if (group == 0) return check_packed(packed, scales, K, N, what);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(0) == (N + 15) / 16
              && packed.size(1) == (K + 1) / 2 && packed.is_contiguous(), what, ": not an int4_pack layout");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.size(1) * group >= K
              && scales.is_contiguous(), what, ": scales [Nb, Q, 16] float32");
}

// A whole MoE layer's quantized experts in one call (group 0: INT8, else INT4 with that group):
// for each expert i (in the order given, ascending id), its rows rows[i] of x [T, D] go through
// down(silu(gate) * up) with the packed gate_up [2F, D] and down [D, F] weights, and
// weights[i] * output is summed per token in float32, rounded once -> [T, D]. The same numerics as
// int8_linear -> silu_mul -> int8_linear -> moe_combine, without the per-expert gathers,
// temporaries and ~10 dispatched ops an expert.
at::Tensor moe_quant_experts(const at::Tensor& x, at::TensorList rows, at::TensorList weights, at::TensorList gate_up,
                             at::TensorList gate_up_scales, at::TensorList down, at::TensorList down_scales, int64_t F,
                             int64_t group) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "moe_quant_experts: x [T, D] bf16");
  const size_t E = rows.size();
  TORCH_CHECK(weights.size() == E && gate_up.size() == E && gate_up_scales.size() == E && down.size() == E
              && down_scales.size() == E, "moe_quant_experts: one entry per expert in every list");
  const int64_t T = x.size(0), D = x.size(1);
  for (size_t i = 0; i < E; ++i) {
    check_quant(gate_up[i], gate_up_scales[i], D, 2 * F, group, "moe_quant_experts gate_up");
    check_quant(down[i], down_scales[i], F, D, group, "moe_quant_experts down");
    TORCH_CHECK(rows[i].scalar_type() == at::kLong && rows[i].is_contiguous() && weights[i].numel() == rows[i].numel()
                && weights[i].scalar_type() == at::kBFloat16 && weights[i].is_contiguous(), "moe_quant_experts: rows/weights");
    const int64_t* r = rows[i].data_ptr<int64_t>();
    for (int64_t j = 0; j < rows[i].numel(); ++j) TORCH_CHECK(r[j] >= 0 && r[j] < T, "moe_quant_experts: row out of range");
  }
  const auto* xp = x.data_ptr<c10::BFloat16>();
  std::vector<float> acc(T * D, 0.f);
  std::vector<c10::BFloat16> xs, h, a, y;
  for (size_t i = 0; i < E; ++i) {
    const int64_t R = rows[i].numel();
    if (R == 0) continue;
    const int64_t* r = rows[i].data_ptr<int64_t>();
    xs.resize(R * D);
    h.resize(R * 2 * F);
    a.resize(R * F);
    y.resize(R * D);
    for (int64_t j = 0; j < R; ++j) std::memcpy(xs.data() + j * D, xp + r[j] * D, D * sizeof(c10::BFloat16));
    quant_gemm(xs.data(), R, D, {gate_up[i].data_ptr(), gate_up_scales[i].data_ptr<float>(), group}, 2 * F, h.data(), false);
    silu_mul_impl(h.data(), a.data(), R, F);
    quant_gemm(a.data(), R, F, {down[i].data_ptr(), down_scales[i].data_ptr<float>(), group}, D, y.data(), false);
    const auto* w = weights[i].data_ptr<c10::BFloat16>();
    for (int64_t j = 0; j < R; ++j) {
      const float wj = to_f(w[j]);
      float* dst = acc.data() + r[j] * D;
      const c10::BFloat16* src = y.data() + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] += wj * to_f(src[d]);
    }
  }
  auto out = at::empty({T, D}, x.options());
  auto* op = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < T * D; ++i) op[i] = from_f<c10::BFloat16>(acc[i]);
  return out;
#else
  TORCH_CHECK(false, "moe_quant_experts needs AVX512-BF16 (check int8_linear_supported())");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_serve, m) {
  m.def("int8_pack(Tensor w) -> Tensor", &int8_pack);
  m.def("int8_linear_supported() -> bool", &int8_linear_supported);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, int N) -> Tensor", &int8_linear);
  m.def("int4_pack(Tensor v, Tensor scales) -> Tensor[]", &int4_pack);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int N, int G) -> Tensor", &int4_linear);
  m.def("moe_quant_experts(Tensor x, Tensor[] rows, Tensor[] weights, Tensor[] gate_up, Tensor[] gate_up_scales, "
        "Tensor[] down, Tensor[] down_scales, int F, int group) -> Tensor", &moe_quant_experts);
}
