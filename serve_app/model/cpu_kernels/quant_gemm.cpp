// W8A16 / W4A16 linears and whole-layer quantized experts: AVX512-BF16 (Zen 4, Sapphire Rapids)
// or AVX2 + FMA (Zen 2/3, Haswell and later), on one packed layout.
#include "common.h"

// Which implementation this build has (none: int8_linear_supported() is false, torch's kernels run).
#if defined(__AVX512BF16__)
#define MOE_QGEMM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define MOE_QGEMM_AVX2 1
#endif
#if defined(MOE_QGEMM_AVX512) || defined(MOE_QGEMM_AVX2)
#define MOE_QGEMM 1
#endif

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
#if defined(MOE_QGEMM)
  return true;
#else
  return false;
#endif
}

#if defined(MOE_QGEMM_AVX512)
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

#if defined(MOE_QGEMM)
// f(std::integral_constant<int, MB>{}) for MB = rows (1..kMaxRows): the row count a template
// argument, so each block keeps its accumulators in registers.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
#if defined(MOE_QGEMM_AVX512)
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
#else
    default: f(std::integral_constant<int, 3>{}); break;
#endif
  }
}
#endif

#if defined(MOE_QGEMM_AVX512)
constexpr int64_t kMaxRows = 8;        // 8 rows x 1 accumulator (or fewer rows x kSplit) of 32 zmm

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

#endif

#if defined(MOE_QGEMM_AVX2)
// --- AVX2 + FMA: the same packed layouts, float32 FMAs --------------------------------------------
//
// Without bf16 dot products each 32-byte group of the pair layout (16 rows x 2 inputs) becomes four
// 8-float vectors, lanes (row, input parity): [r0k0 r0k1 r1k0 r1k1 ... r3k1], and is multiplied with
// the pair (x_k, x_k+1) broadcast to all four lane pairs; each row's two parities are added at the
// end. x is read as float32 pairs (converted once per call, zero-padded to an even K). Numerics: a
// bf16 x int8 (or int4) product is exact in float32, summed in float32 — as the AVX512-BF16 path,
// in another order. Up to 3 rows of x per pass (12 accumulators + 4 weight vectors of 16 ymm).
// Every way a row is computed (1, 2 or 3 rows a pass, the scratch below for more) sums it in the
// same order, so a row's output does not depend on how many rows share the call: a verification
// of drafts computes what one-row decode steps compute (engine/speculative.py, "Exactness"). One
// chain per lane vector: a second chain for odd pairs at one row (8 FMAs in flight instead of 4)
// was the only difference between the row counts, and cost nothing measurable to drop (int8
// 768x192 at one row 47 -> 47 us on the AVX2 VM, 2026-12-04; the conversions bound it, not FMAs).

inline __m256 bytes8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

// The pair broadcast: (x[k], x[k+1]) in every lane pair.
inline __m256 pair_ps(const float* x) { return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x))); }

// Lanes (row, parity) of four vectors -> the 16 rows' sums: hadd adds each parity pair, within
// 128-bit halves, so rows come out as (0 1 4 5 2 3 6 7); a 64-bit permute puts them in order.
inline void pair_sums(const __m256 acc[4], float* rows16) {
  const __m256 lo = _mm256_hadd_ps(acc[0], acc[1]), hi = _mm256_hadd_ps(acc[2], acc[3]);
  _mm256_storeu_ps(rows16, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lo), 0xD8)));
  _mm256_storeu_ps(rows16 + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(hi), 0xD8)));
}

// 32 int8 codes of one pair group -> its four lane vectors.
inline void int8_group_to_ps(const int8_t* g, __m256 wv[4]) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16));
  wv[0] = bytes8_to_ps(lo);
  wv[1] = bytes8_to_ps(_mm_unpackhi_epi64(lo, lo));
  wv[2] = bytes8_to_ps(hi);
  wv[3] = bytes8_to_ps(_mm_unpackhi_epi64(hi, hi));
}

// Four rows' scales (s0 s1 s2 s3) in the lane layout: (s0 s0 s1 s1 s2 s2 s3 s3).
inline __m256 pair_scales(const float* s4) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s4)), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

inline void store_rows(const float* rows16, const float* scale, c10::BFloat16* out, int64_t valid) {
  for (int64_t j = 0; j < valid; ++j) out[j] = from_f<c10::BFloat16>(scale ? rows16[j] * scale[j] : rows16[j]);
}

// One pair group (32 int8 codes) against MB rows' broadcast pairs, into acc[MB][4]. The four
// lane vectors are converted and used one at a time, so 4*MB accumulators + MB pairs + 1 weight
// vector fit the 16 ymm registers at MB = 3.
template <int MB>
inline void int8_pair_group(const int8_t* g, const __m256 xv[MB], __m256 acc[MB][4]) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 16));
  const __m128i part[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m256 wv = bytes8_to_ps(part[j]);
#pragma GCC unroll 3
    for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(wv, xv[m], acc[m][j]);
  }
}

template <int MB>
void int8_block(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale,
                c10::BFloat16* out, int64_t ldo, int64_t valid) {
  const int64_t pairs = (K + 1) / 2;
  __m256 acc[MB][4];
#pragma GCC unroll 3
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  __m256 xv[MB];
  for (int64_t kp = 0; kp < pairs; ++kp) {
#pragma GCC unroll 3
    for (int m = 0; m < MB; ++m) xv[m] = pair_ps(x + m * ldx + 2 * kp);
    int8_pair_group<MB>(w + kp * 32, xv, acc);
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float rows16[16];
    pair_sums(acc[m], rows16);
    store_rows(rows16, scale, out + m * ldo, valid);
  }
}

// INT4 codes of one pair group -> the four lane vectors, values centred (code - 8). Byte i holds
// value i (low nibble) and value i + 16 (high): values 0-15 are rows 0-7, 16-31 rows 8-15.
inline void int4_group_to_ps(const uint8_t* g, __m256 wv[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g));
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
  const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
  wv[0] = bytes8_to_ps(lo);
  wv[1] = bytes8_to_ps(_mm_unpackhi_epi64(lo, lo));
  wv[2] = bytes8_to_ps(hi);
  wv[3] = bytes8_to_ps(_mm_unpackhi_epi64(hi, hi));
}

// As int8_block, with the scale per (row, group): each group's lane sums are folded into the
// total with one FMA by the rows' scales, duplicated per parity lane.
template <int MB>
void int4_block(const float* x, int64_t ldx, const uint8_t* w, int64_t K, int64_t G, const float* scales,
                c10::BFloat16* out, int64_t ldo, int64_t valid) {
  const int64_t pairs = (K + 1) / 2, per_group = G / 2;
  __m256 total[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) total[m][j] = _mm256_setzero_ps();
  for (int64_t q = 0, kp0 = 0; kp0 < pairs; ++q, kp0 += per_group) {
    const int64_t kp_end = kp0 + per_group < pairs ? kp0 + per_group : pairs;
    __m256 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t kp = kp0; kp < kp_end; ++kp) {
      __m256 wv[4], xv[MB];
      int4_group_to_ps(w + kp * 16, wv);
#pragma GCC unroll 3
      for (int m = 0; m < MB; ++m) xv[m] = pair_ps(x + m * ldx + 2 * kp);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 3
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(wv[j], xv[m], acc[m][j]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256 sc = pair_scales(scales + q * 16 + 4 * j);
      for (int m = 0; m < MB; ++m) total[m][j] = _mm256_fmadd_ps(acc[m][j], sc, total[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float rows16[16];
    pair_sums(total[m], rows16);
    store_rows(rows16, nullptr, out + m * ldo, valid);
  }
}

// More rows than one pass takes: the block's codes are converted to float32 once, into an
// L1/L2-resident scratch in the same lane layout ([Kp][4][8], the values unscaled, exactly), and
// every 3-row pass is plain loads + FMAs on it, in int8_block's / int4_block's order. Why: converting a group costs 8 uops
// against 4 FMAs a row; re-converting per pass, 64 rows took 1.3-1.5x as long as with the scratch
// (Zen 3: 768x192 1,101 vs 856 µs, 8192x192 11.2 vs 8.5 ms; equal at 8 rows).
void dequant_block(const void* packed, int64_t nb, int64_t Kp, float* dst, int64_t group) {
  for (int64_t kp = 0; kp < Kp; ++kp) {
    __m256 wv[4];
    if (group == 0)
      int8_group_to_ps(static_cast<const int8_t*>(packed) + (nb * Kp + kp) * 32, wv);
    else
      int4_group_to_ps(static_cast<const uint8_t*>(packed) + (nb * Kp + kp) * 16, wv);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + kp * 32 + 8 * j, wv[j]);
  }
}

// group == 0 (INT8): one chain over all pairs, the rows' scales applied at the end (int8_block);
// group > 0 (INT4): a chain per group folded into the total by the group's scales (int4_block).
template <int MB>
void float_block(const float* x, int64_t ldx, const float* wf, int64_t Kp, int64_t group, const float* scales,
                 c10::BFloat16* out, int64_t ldo, int64_t valid) {
  const int64_t per_group = group ? group / 2 : Kp;
  __m256 total[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) total[m][j] = _mm256_setzero_ps();
  for (int64_t q = 0, kp0 = 0; kp0 < Kp; ++q, kp0 += per_group) {
    const int64_t kp_end = kp0 + per_group < Kp ? kp0 + per_group : Kp;
    __m256 acc[MB][4];
#pragma GCC unroll 3
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t kp = kp0; kp < kp_end; ++kp) {
      __m256 xv[MB];
#pragma GCC unroll 3
      for (int m = 0; m < MB; ++m) xv[m] = pair_ps(x + m * ldx + 2 * kp);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 wv = _mm256_loadu_ps(wf + kp * 32 + 8 * j);
#pragma GCC unroll 3
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(wv, xv[m], acc[m][j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      if (group == 0) {
        for (int m = 0; m < MB; ++m) total[m][j] = acc[m][j];
        continue;
      }
      const __m256 sc = pair_scales(scales + q * 16 + 4 * j);
      for (int m = 0; m < MB; ++m) total[m][j] = _mm256_fmadd_ps(acc[m][j], sc, total[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float rows16[16];
    pair_sums(total[m], rows16);
    store_rows(rows16, group ? nullptr : scales, out + m * ldo, valid);
  }
}

constexpr int64_t kMaxRows = 3;
#endif

#if defined(MOE_QGEMM)
// A quantized weight as the kernels read it. group == 0: INT8, packed [Nb, Kp, 16, 2] int8 and
// scales [Nb * 16]; group > 0: INT4, packed [Nb, Kp, 16] bytes and scales [Nb, Q, 16].
struct QuantWeight {
  const void* packed;
  const float* scales;
  int64_t group;
};

#include "quant_gemm_amx.h"       // the AMX-BF16 tiles, where this CPU has them

// y [M, N] = x [M, K] @ dequant(w)^T, all raw pointers (int8_linear, int4_linear and the fused
// experts): 16 output rows at a time (in parallel when asked), kMaxRows rows of x per pass.
void quant_gemm(const c10::BFloat16* xp, int64_t M, int64_t K, QuantWeight w, int64_t N, c10::BFloat16* op,
                bool parallel) {
  const int64_t Nb = (N + 15) / 16, Kp = (K + 1) / 2, Q = w.group ? (K + w.group - 1) / w.group : 0;
#if defined(MOE_QGEMM_AMX)
  if (amx_ready() && K % 32 == 0 && (w.group == 0 || (w.group % 32 == 0 && K % w.group == 0))) {
    auto tiles = [&](int64_t begin, int64_t end) { amx_gemm(xp, M, K, w, N, op, begin, end); };
    if (parallel) at::parallel_for(0, Nb, 8, tiles);
    else tiles(0, Nb);
    return;
  }
#endif
#if defined(MOE_QGEMM_AVX2)
  std::vector<float> xf(M * 2 * Kp, 0.f);              // float32 pairs, an odd K's last one with 0
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * 2 * Kp + k] = to_f(xp[m * K + k]);
  const float* xs = xf.data();
  const int64_t ldx = 2 * Kp;
#else
  const c10::BFloat16* xs = xp;
  const int64_t ldx = K;
#endif
  auto body = [&](int64_t begin, int64_t end) {
#if defined(MOE_QGEMM_AVX2)
    if (M > kMaxRows) {
      std::vector<float> wf(Kp * 32);
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
        dequant_block(w.packed, nb, Kp, wf.data(), w.group);
        const float* sc = w.scales + nb * (w.group == 0 ? 16 : Q * 16);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int64_t mb = M - m0 < kMaxRows ? M - m0 : kMaxRows;
          with_rows(mb, [&](auto rows) { float_block<rows>(xs + m0 * ldx, ldx, wf.data(), Kp, w.group, sc, op + m0 * N + nb * 16, N, valid); });
        }
      }
      return;
    }
#endif
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t mb = M - m0 < kMaxRows ? M - m0 : kMaxRows;
        const auto* xb = xs + m0 * ldx;
        auto* ob = op + m0 * N + nb * 16;
        with_rows(mb, [&](auto rows) {
          if (w.group == 0)
            int8_block<rows>(xb, ldx, static_cast<const int8_t*>(w.packed) + nb * Kp * 32, K, w.scales + nb * 16, ob, N, valid);
          else
            int4_block<rows>(xb, ldx, static_cast<const uint8_t*>(w.packed) + nb * Kp * 16, K, w.group,
                             w.scales + nb * Q * 16, ob, N, valid);
        });
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
#if defined(MOE_QGEMM)
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
  TORCH_CHECK(false, "int4_linear needs AVX512-BF16 or AVX2+FMA (check int8_linear_supported())");
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
#if defined(MOE_QGEMM)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be [M, K] bf16");
  check_packed(packed, scales, x.size(1), N, "int8_linear");
  auto xc = x.contiguous();
  auto out = at::empty({x.size(0), N}, xc.options());
  quant_gemm(xc.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), {packed.data_ptr(), scales.data_ptr<float>(), 0}, N,
             out.data_ptr<c10::BFloat16>(), true);
  return out;
#else
  TORCH_CHECK(false, "int8_linear needs AVX512-BF16 or AVX2+FMA (check int8_linear_supported())");
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
#if defined(MOE_QGEMM)
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
  TORCH_CHECK(false, "moe_quant_experts needs AVX512-BF16 or AVX2+FMA (check int8_linear_supported())");
#endif
}

// Which instructions quant_gemm multiplies with in this process: "amx", "avx512_bf16", "avx2" or
// "none" (for benchmarks and tests: AMX also needs the kernel's permission and MOE_SERVE_AMX != 0).
std::string quant_gemm_isa() {
#if defined(MOE_QGEMM_AMX)
  if (amx_ready()) return "amx";
#endif
#if defined(MOE_QGEMM_AVX512)
  return "avx512_bf16";
#elif defined(MOE_QGEMM_AVX2)
  return "avx2";
#else
  return "none";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_serve, m) {
  m.def("int8_pack(Tensor w) -> Tensor", &int8_pack);
  m.def("int8_linear_supported() -> bool", &int8_linear_supported);
  m.def("quant_gemm_isa() -> str", &quant_gemm_isa);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, int N) -> Tensor", &int8_linear);
  m.def("int4_pack(Tensor v, Tensor scales) -> Tensor[]", &int4_pack);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int N, int G) -> Tensor", &int4_linear);
  m.def("moe_quant_experts(Tensor x, Tensor[] rows, Tensor[] weights, Tensor[] gate_up, Tensor[] gate_up_scales, "
        "Tensor[] down, Tensor[] down_scales, int F, int group) -> Tensor", &moe_quant_experts);
}
