// Fused CPU kernels for the decode step (issue 14, "a lean decode step").
//
// Why C++: a decode step of the bundled model is ~360 small aten ops, each costing 2-20 µs of
// dispatch and temporaries on this CPU, ~30x the bytes floor. These kernels each replace a chain
// of them with one loop over the data, computing in float32 and rounding once to the output dtype:
//   paged_decode_attention  SDPA of one query row per sequence, reading K/V where they lie in
//                           the paged cache (no [B, L] gather copy, no mask);
//   add_rms_norm            residual add + RMSNorm (torch's CPU rms_norm is 7 ops);
//   silu_mul                SwiGLU's silu(gate) * up on the fused [R, 2F] projection;
//   rotary_                 RoPE in place on q and k of the fused qkv projection.
// The pure-torch path (model/attention.py, transformer.py) stays the reference: float32 steps
// never come here, and tests hold these kernels to it.
//
// Legend: B=sequences, H=query heads, G=kv heads, R=H/G query heads per kv head, Dh=head dim,
// N=cache blocks, S=block size, W=blocks per table, L=context length, T=rows, D=hidden, F=width.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) {             // bf16 -> f32 is a shift; written out so it vectorises
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(c10::Half x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }   // c10 rounds to nearest even

// exp for the softmax and silu: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~2 ulp),
// written so that GCC vectorises the loops that call it (std::exp stays a scalar libm call).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

#if defined(__AVX512F__)
// AVX-512 path of attend_one for Dh a multiple of 16 (32, 64, 128: every supported family). Why
// intrinsics: the portable loops below are latency-bound (a horizontal sum per key and an
// accumulator kept in memory: ~80 cycles per key and head); here each query row stays in
// registers, the value accumulators too, and keys alternate between two accumulator sets.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename QT, typename KT, int64_t kDh>
void attend_one_avx512(const QT* q, const KT* kc, const KT* vc, const int64_t* table, int64_t len, int64_t S,
                       int64_t G, int64_t g, int64_t R, float scale, QT* out, std::vector<float>& scores) {
  constexpr int64_t V = kDh / 16;                // vectors per head
  scores.resize(R * len);
  const int64_t row = G * kDh, blocks = (len + S - 1) / S;
  for (int64_t r = 0; r < R; ++r) {
    __m512 qv[V];
    alignas(64) float qf[kDh];
    for (int64_t d = 0; d < kDh; ++d) qf[d] = to_f(q[r * kDh + d]) * scale;
    for (int64_t i = 0; i < V; ++i) qv[i] = _mm512_load_ps(qf + 16 * i);
    float* sr = scores.data() + r * len;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t base = b * S, n = len - base < S ? len - base : S;
      const KT* kb = kc + table[b] * S * row + g * kDh;
      for (int64_t o = 0; o < n; ++o) {
        const KT* k = kb + o * row;
        __m512 acc = _mm512_mul_ps(qv[0], load16(k));
        for (int64_t i = 1; i < V; ++i) acc = _mm512_fmadd_ps(qv[i], load16(k + 16 * i), acc);
        sr[base + o] = _mm512_reduce_add_ps(acc);
      }
    }
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) m = sr[j] > m ? sr[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      sr[j] = fast_exp(sr[j] - m);
      sum += sr[j];
    }
    __m512 a0[V], a1[V];
    for (int64_t i = 0; i < V; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t base = b * S, n = len - base < S ? len - base : S;
      const KT* vb = vc + table[b] * S * row + g * kDh;
      int64_t o = 0;
      for (; o + 1 < n; o += 2) {
        const __m512 p0 = _mm512_set1_ps(sr[base + o]), p1 = _mm512_set1_ps(sr[base + o + 1]);
        for (int64_t i = 0; i < V; ++i) {
          a0[i] = _mm512_fmadd_ps(p0, load16(vb + o * row + 16 * i), a0[i]);
          a1[i] = _mm512_fmadd_ps(p1, load16(vb + (o + 1) * row + 16 * i), a1[i]);
        }
      }
      if (o < n) {
        const __m512 p0 = _mm512_set1_ps(sr[base + o]);
        for (int64_t i = 0; i < V; ++i) a0[i] = _mm512_fmadd_ps(p0, load16(vb + o * row + 16 * i), a0[i]);
      }
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    alignas(64) float res[kDh];
    for (int64_t i = 0; i < V; ++i) _mm512_store_ps(res + 16 * i, _mm512_mul_ps(_mm512_add_ps(a0[i], a1[i]), inv));
    for (int64_t d = 0; d < kDh; ++d) out[r * kDh + d] = from_f<QT>(res[d]);
  }
}
#endif

#if defined(__AVX512BF16__)
// Lane i of the result = the sum of the 16 lanes of a[i]: a transposing tree of shuffles and adds
// (~3 instructions a key, against ~9 for a horizontal sum per key).
inline __m512 sum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)       // b[i]: lanes 0-7 partials of a[2i], 8-15 of a[2i+1]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)       // c[i]: 128-bit chunk j = 4 partials of a[4i + j]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)       // d[i]: chunk j = [a[8i+j] x2 partials, a[8i+4+j] x2], interleaved
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  // chunk j = [a[j], a[4+j], a[8+j], a[12+j]]: lane 4j+t holds key 4t+j; permute back to lane = key.
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

// bf16 q and bf16 K/V, Dh a multiple of 32: q·k by vdpbf16ps on the stored pairs (exact products,
// float32 sums: no conversion of K at all), 16 keys reduced at once; values as in attend_one_avx512.
template <int64_t kDh>
void attend_one_bf16(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const int64_t* table,
                     int64_t len, int64_t S, int64_t G, int64_t g, int64_t R, float scale, c10::BFloat16* out,
                     std::vector<float>& scores) {
  constexpr int64_t P = kDh / 32;                // bf16 pair vectors per head
  constexpr int64_t V = kDh / 16;
  scores.resize(R * len + 16);
  const int64_t row = G * kDh;
  for (int64_t r = 0; r < R; ++r) {
    __m512bh qv[P];
    for (int64_t i = 0; i < P; ++i)
      qv[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + r * kDh + 32 * i));
    float* sr = scores.data() + r * len;
    const __m512 sc = _mm512_set1_ps(scale);
    int64_t j = 0, blk = 0, off = 0;             // key j lies at (table[blk], off): no division per key
    for (; j + 16 <= len; j += 16) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) {
        const c10::BFloat16* k = kc + (table[blk] * S + off) * row + g * kDh;
        if (++off == S) { off = 0; ++blk; }
        acc[t] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k)));
        for (int64_t i = 1; i < P; ++i)
          acc[t] = _mm512_dpbf16_ps(acc[t], qv[i], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 32 * i)));
      }
      _mm512_storeu_ps(sr + j, _mm512_mul_ps(sum16(acc), sc));
    }
    for (; j < len; ++j) {
      const c10::BFloat16* k = kc + (table[blk] * S + off) * row + g * kDh;
      if (++off == S) { off = 0; ++blk; }
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < P; ++i)
        acc = _mm512_dpbf16_ps(acc, qv[i], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + 32 * i)));
      sr[j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  float inv[64];
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores.data() + r * len;
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) m = sr[j] > m ? sr[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      sr[j] = fast_exp(sr[j] - m);
      sum += sr[j];
    }
    inv[r] = 1.f / sum;
  }
  // Values: each row of V converted once and used by all R query rows.
  constexpr int kMaxR = 8;
  for (int64_t r0 = 0; r0 < R; r0 += kMaxR) {
    const int64_t rn = R - r0 < kMaxR ? R - r0 : kMaxR;
    __m512 acc[kMaxR][V];
    for (int64_t r = 0; r < rn; ++r)
      for (int64_t i = 0; i < V; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t b = 0, base = 0; base < len; ++b, base += S) {
      const int64_t n = len - base < S ? len - base : S;
      const c10::BFloat16* vb = vc + table[b] * S * row + g * kDh;
      for (int64_t o = 0; o < n; ++o) {
        __m512 v[V];
        for (int64_t i = 0; i < V; ++i) v[i] = load16(vb + o * row + 16 * i);
        for (int64_t r = 0; r < rn; ++r) {
          const __m512 p = _mm512_set1_ps(scores[(r0 + r) * len + base + o]);
          for (int64_t i = 0; i < V; ++i) acc[r][i] = _mm512_fmadd_ps(p, v[i], acc[r][i]);
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      const __m512 iv = _mm512_set1_ps(inv[r0 + r]);
      for (int64_t i = 0; i < V; ++i) {
        const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][i], iv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r0 + r) * kDh + 16 * i), y);
      }
    }
  }
}
#endif

// One (sequence, kv head): R query rows against the sequence's first `len` keys, walked block by
// block (no per-key division: a 64-bit div costs ~40 cycles, more than the key's dot product).
template <typename QT, typename KT, int64_t kDh>
void attend_one(const QT* q, const KT* kc, const KT* vc, const int64_t* table, int64_t len, int64_t S,
                int64_t G, int64_t g, int64_t R, int64_t dh, float scale, QT* out, std::vector<float>& scores,
                std::vector<float>& acc, std::vector<float>& qf) {
  // kDh > 0: the head dim known at compile time, so each dot product unrolls into a few FMAs (a
  // runtime trip count costs a vector prologue/epilogue per key: 2x slower at Dh = 32).
  const int64_t Dh = kDh > 0 ? kDh : dh;
  scores.resize(R * len);
  acc.assign(R * Dh, 0.f);
  qf.resize(R * Dh);
  for (int64_t i = 0; i < R * Dh; ++i) qf[i] = to_f(q[i]) * scale;
  const int64_t row = G * Dh;                    // elements between consecutive keys of a block
  const int64_t blocks = (len + S - 1) / S;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t base = b * S, n = len - base < S ? len - base : S;
    const KT* kb = kc + table[b] * S * row + g * Dh;
    for (int64_t o = 0; o < n; ++o) {
      const KT* k = kb + o * row;
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = qf.data() + r * Dh;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < Dh; ++d) s += qr[d] * to_f(k[d]);
        scores[r * len + base + o] = s;
      }
    }
  }
  float inv[64];
  for (int64_t r = 0; r < R; ++r) {
    float* sr = scores.data() + r * len;
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) m = sr[j] > m ? sr[j] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      sr[j] = fast_exp(sr[j] - m);
      sum += sr[j];
    }
    inv[r] = 1.f / sum;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t base = b * S, n = len - base < S ? len - base : S;
    const KT* vb = vc + table[b] * S * row + g * Dh;
    for (int64_t o = 0; o < n; ++o) {
      const KT* v = vb + o * row;
      for (int64_t r = 0; r < R; ++r) {
        const float p = scores[r * len + base + o];
        float* a = acc.data() + r * Dh;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) a[d] += p * to_f(v[d]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < Dh; ++d) out[r * Dh + d] = from_f<QT>(acc[r * Dh + d] * inv[r]);
}

template <typename QT, typename KT>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& tables,
                          const at::Tensor& positions, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = kc.size(1), G = kc.size(2), R = H / G;
  const int64_t W = tables.size(1);
  const QT* qp = q.data_ptr<QT>();
  const KT* kp = kc.data_ptr<KT>();
  const KT* vp = vc.data_ptr<KT>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  QT* op = out.data_ptr<QT>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc, qf;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / G, g = i % G;
      // Head h reads kv head h / R (the reference families' GQA): heads g*R .. g*R+R-1 are contiguous.
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<QT, c10::BFloat16> && std::is_same_v<KT, c10::BFloat16>) {
        auto bf = Dh == 32 ? attend_one_bf16<32> : Dh == 64 ? attend_one_bf16<64> : Dh == 128 ? attend_one_bf16<128> : nullptr;
        if (bf != nullptr) {
          bf(qp + (b * H + g * R) * Dh, kp, vp, tp + b * W, pp[b] + 1, S, G, g, R, static_cast<float>(scale),
             op + (b * H + g * R) * Dh, scores);
          continue;
        }
      }
#endif
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<KT, c10::Half>) {
        auto fast = Dh == 32 ? attend_one_avx512<QT, KT, 32> : Dh == 64 ? attend_one_avx512<QT, KT, 64>
                  : Dh == 128 ? attend_one_avx512<QT, KT, 128> : nullptr;
        if (fast != nullptr) {
          fast(qp + (b * H + g * R) * Dh, kp, vp, tp + b * W, pp[b] + 1, S, G, g, R, static_cast<float>(scale),
               op + (b * H + g * R) * Dh, scores);
          continue;
        }
      }
#endif
      auto attend = Dh == 32 ? attend_one<QT, KT, 32> : Dh == 64 ? attend_one<QT, KT, 64>
                  : Dh == 128 ? attend_one<QT, KT, 128> : attend_one<QT, KT, 0>;
      attend(qp + (b * H + g * R) * Dh, kp, vp, tp + b * W, pp[b] + 1, S, G, g, R, Dh,
                         static_cast<float>(scale), op + (b * H + g * R) * Dh, scores, acc, qf);
    }
  });
}

// q [B, H, Dh]; k/v cache [N, S, G, Dh]; block_tables [B, W] int64; positions [B] int64, the
// position of each sequence's one new token (keys 0..position are visible). -> [B, H, Dh] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "heads do not match the cache");
  TORCH_CHECK(q.size(1) / k_cache.size(2) <= 64, "more than 64 query heads per kv head");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && positions.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && positions.size(0) == q.size(0), "one table per sequence");
  auto qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  auto tc = block_tables.contiguous(), pc = positions.contiguous();
  auto out = at::empty_like(qc);
  const auto qt = qc.scalar_type(), kt = kc.scalar_type();
#define MOE_ATTN(QT, KT) paged_attention_impl<QT, KT>(qc, kc, vc, tc, pc, scale, out)
  if (qt == at::kBFloat16 && kt == at::kBFloat16) MOE_ATTN(c10::BFloat16, c10::BFloat16);
  else if (qt == at::kBFloat16 && kt == at::kFloat) MOE_ATTN(c10::BFloat16, float);
  else if (qt == at::kFloat && kt == at::kFloat) MOE_ATTN(float, float);
  else if (qt == at::kFloat && kt == at::kBFloat16) MOE_ATTN(float, c10::BFloat16);
  else if (qt == at::kHalf && kt == at::kHalf) MOE_ATTN(c10::Half, c10::Half);
  else TORCH_CHECK(false, "paged_decode_attention: unsupported dtypes ", qt, " / ", kt);
#undef MOE_ATTN
  return out;
}

// x [T, D] (+ residual [T, D]) -> (h = x + residual rounded to x's dtype, rms_norm(h) * weight).
template <typename T>
void add_rms_norm_impl(const T* x, const T* res, const T* w, T* h, T* y, int64_t rows, int64_t D, float eps) {
  std::vector<float> hf(D), wf(D);
  for (int64_t d = 0; d < D; ++d) wf[d] = to_f(w[d]);
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * D;
    float ss = 0.f;
    if (res != nullptr) {
      const T* rr = res + t * D;
      for (int64_t d = 0; d < D; ++d) {
        const T sum = from_f<T>(to_f(xr[d]) + to_f(rr[d]));     // the residual stream keeps x's dtype
        h[t * D + d] = sum;
        hf[d] = to_f(sum);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) hf[d] = to_f(xr[d]);
    }
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += hf[d] * hf[d];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) y[t * D + d] = from_f<T>(hf[d] * inv * wf[d]);
  }
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(weight.numel() == D && weight.scalar_type() == x.scalar_type(), "weight must be [D] in x's dtype");
  auto xc = x.contiguous();
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual like x");
    rc = residual->contiguous();
  }
  auto wc = weight.contiguous();
  auto h = residual.has_value() ? at::empty_like(xc) : xc;
  auto y = at::empty_like(xc);
#define MOE_NORM(T) add_rms_norm_impl<T>(xc.data_ptr<T>(), rc.defined() ? rc.data_ptr<T>() : nullptr, \
    wc.data_ptr<T>(), h.data_ptr<T>(), y.data_ptr<T>(), rows, D, static_cast<float>(eps))
  if (x.scalar_type() == at::kBFloat16) MOE_NORM(c10::BFloat16);
  else if (x.scalar_type() == at::kFloat) MOE_NORM(float);
  else if (x.scalar_type() == at::kHalf) MOE_NORM(c10::Half);
  else TORCH_CHECK(false, "add_rms_norm: unsupported dtype ", x.scalar_type());
#undef MOE_NORM
  return {h, y};
}

// gate_up [R, 2F] -> silu(gate) * up [R, F], in float32, rounded once.
template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t F) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gu + r * 2 * F;
    const T* u = g + F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) {
      const float a = to_f(g[i]);
      out[r * F + i] = from_f<T>(a / (1.f + fast_exp(-a)) * to_f(u[i]));
    }
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t F2 = gate_up.size(-1), rows = gate_up.numel() / F2;
  TORCH_CHECK(F2 % 2 == 0, "silu_mul: last dim must be 2F");
  auto gc = gate_up.contiguous();
  auto sizes = gc.sizes().vec();
  sizes.back() = F2 / 2;
  auto out = at::empty(sizes, gc.options());
  if (gc.scalar_type() == at::kBFloat16) silu_mul_impl(gc.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, F2 / 2);
  else if (gc.scalar_type() == at::kFloat) silu_mul_impl(gc.data_ptr<float>(), out.data_ptr<float>(), rows, F2 / 2);
  else if (gc.scalar_type() == at::kHalf) silu_mul_impl(gc.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, F2 / 2);
  else TORCH_CHECK(false, "silu_mul: unsupported dtype ", gc.scalar_type());
  return out;
}

// In place on x [T, heads, Dh] (any row stride; the head and Dh axes contiguous): the reference
// x * cos + rotate_half(x) * sin with cos/signed sin [T, 1, Dh] (model/attention.py `rotary`).
template <typename T>
void rotary_impl(T* x, int64_t row_stride, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  std::vector<float> c(Dh), s(Dh), tmp(Dh);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t d = 0; d < Dh; ++d) { c[d] = to_f(cos[t * Dh + d]); s[d] = to_f(sin[t * Dh + d]); }
    for (int64_t h = 0; h < heads; ++h) {
      T* xh = x + t * row_stride + h * Dh;
      for (int64_t d = 0; d < Dh; ++d) tmp[d] = to_f(xh[d]);
      for (int64_t d = 0; d < Dh; ++d) {
        const float rolled = tmp[d < half ? d + half : d - half];
        xh[d] = from_f<T>(tmp[d] * c[d] + rolled * s[d]);
      }
    }
  }
}

void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, Dh], rows strided");
  const int64_t rows = x.size(0), heads = x.size(1), Dh = x.size(2);
  TORCH_CHECK(cos.numel() == rows * Dh && sin.numel() == rows * Dh, "cos/sin must be [T, 1, Dh]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "cos/sin in x's dtype");
  auto cc = cos.contiguous(), sc = sin.contiguous();
  if (x.scalar_type() == at::kBFloat16)
    rotary_impl(x.data_ptr<c10::BFloat16>(), x.stride(0), cc.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>(), rows, heads, Dh);
  else if (x.scalar_type() == at::kFloat)
    rotary_impl(x.data_ptr<float>(), x.stride(0), cc.data_ptr<float>(), sc.data_ptr<float>(), rows, heads, Dh);
  else if (x.scalar_type() == at::kHalf)
    rotary_impl(x.data_ptr<c10::Half>(), x.stride(0), cc.data_ptr<c10::Half>(), sc.data_ptr<c10::Half>(), rows, heads, Dh);
  else TORCH_CHECK(false, "rotary_: unsupported dtype ", x.scalar_type());
}

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

// x [M, K] bf16; packed from int8_pack; scales [ceil(N/16)*16] float32 (zero-padded) -> [M, N] bf16.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t N) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be [M, K] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2, "int8_linear: not an int8_pack layout");
  const int64_t M = x.size(0), K = x.size(1), Nb = packed.size(0), Kp = packed.size(1);
  TORCH_CHECK(Kp == (K + 1) / 2 && Nb == (N + 15) / 16, "int8_linear: x does not match the weight");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == Nb * 16, "int8_linear: scales [Nb*16] float32");
  auto xc = x.contiguous();
  auto out = at::empty({M, N}, xc.options());
  const auto* xp = xc.data_ptr<c10::BFloat16>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  auto* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, Nb, 8, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mb = M - m0 < 8 ? M - m0 : 8;
        const auto* xb = xp + m0 * K;
        auto* ob = op + m0 * N + nb * 16;
        const int8_t* wb = wp + nb * Kp * 32;
        switch (mb) {
          case 1: int8_block<1>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 2: int8_block<2>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 3: int8_block<3>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 4: int8_block<4>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 5: int8_block<5>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 6: int8_block<6>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          case 7: int8_block<7>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
          default: int8_block<8>(xb, K, wb, K, sp + nb * 16, ob, N, valid); break;
        }
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int8_linear needs AVX512-BF16 (check int8_linear_supported())");
#endif
}

}  // namespace

TORCH_LIBRARY(moe_serve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor positions, float scale) -> Tensor",
        &paged_decode_attention);
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rotary_);
  m.def("int8_pack(Tensor w) -> Tensor", &int8_pack);
  m.def("int8_linear_supported() -> bool", &int8_linear_supported);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, int N) -> Tensor", &int8_linear);
}
