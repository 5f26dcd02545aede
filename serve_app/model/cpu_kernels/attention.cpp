// Paged attention for every query row of a step, K/V read where they lie in the cache.
#include "common.h"

namespace {
using namespace moe_serve_kernels;

#if defined(__AVX512F__)
// max of x[0..n): 16 lanes at a time (the scalar loop is a serial chain GCC does not vectorise).
inline float max_of(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  float r = _mm512_reduce_max_ps(m);
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}
// AVX-512 path of attend_one for Dh a multiple of 16 (32, 64, 128: every supported family). Why
// intrinsics: the portable loops below are latency-bound (a horizontal sum per key and an
// accumulator kept in memory: ~80 cycles per key and head); here each query row stays in
// registers, the value accumulators too, and keys alternate between two accumulator sets.

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
    const float m = max_of(sr, len);
    const float sum = exp_sum16(sr, len, m);
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

// out[r] = sum_j p[r][j] * v_j * inv[r] for RN query rows (scores p [RN, len], softmax numerators).
template <int64_t kDh, int RN>
void accumulate_values(const c10::BFloat16* vc, const int64_t* table, int64_t len, int64_t S, int64_t row, int64_t g,
                       const float* p, const float* inv, c10::BFloat16* out) {
  constexpr int64_t V = kDh / 16;
  __m512 acc[RN][V];
  for (int r = 0; r < RN; ++r)
    for (int64_t i = 0; i < V; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t b = 0, base = 0; base < len; ++b, base += S) {
    const int64_t n = len - base < S ? len - base : S;
    const c10::BFloat16* vb = vc + table[b] * S * row + g * kDh;
    for (int64_t o = 0; o < n; ++o) {
      __m512 v[V];
      for (int64_t i = 0; i < V; ++i) v[i] = load16(vb + o * row + 16 * i);
      for (int r = 0; r < RN; ++r) {
        const __m512 w = _mm512_set1_ps(p[r * len + base + o]);
        for (int64_t i = 0; i < V; ++i) acc[r][i] = _mm512_fmadd_ps(w, v[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < RN; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int64_t i = 0; i < V; ++i) {
      const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][i], iv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kDh + 16 * i), y);
    }
  }
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
    const float m = max_of(sr, len);
    const float sum = exp_sum16(sr, len, m);
    inv[r] = 1.f / sum;
  }
  // Values: each row of V converted once and used by all R query rows (up to 8 at a time, the
  // count a template argument so that the accumulators stay in registers).
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const float* p = scores.data() + r0 * len;
    c10::BFloat16* o = out + r0 * kDh;
    switch (R - r0 < 8 ? R - r0 : 8) {
      case 1: accumulate_values<kDh, 1>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 2: accumulate_values<kDh, 2>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 3: accumulate_values<kDh, 3>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 4: accumulate_values<kDh, 4>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 5: accumulate_values<kDh, 5>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 6: accumulate_values<kDh, 6>(vc, table, len, S, row, g, p, inv + r0, o); break;
      case 7: accumulate_values<kDh, 7>(vc, table, len, S, row, g, p, inv + r0, o); break;
      default: accumulate_values<kDh, 8>(vc, table, len, S, row, g, p, inv + r0, o); break;
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// Lane t of the result = the sum of the 8 lanes of a[t]: each key's dot product reduced as
// ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), 9 instructions for 8 keys.
inline __m256 sum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // [k0..k3 lo | k0..k3 hi]
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));  // [k4..k7 lo | k4..k7 hi]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// AVX2 + FMA path of attend_one for Dh a multiple of 8 (32, 64, 128), the AVX-512 path on 8
// lanes: the portable loops below cost ~70 µs a decode layer of the bundled model on an AVX2-only
// VM (2026-12-04: 6 heads x 512 keys), most of it a scalar horizontal sum and a scalar exp per key.
// The query heads of one kv head go in pairs (RN = 2), so each key's K and V are converted from
// bf16 once for both. Scores: KN = 8 / RN keys a chunk, lane r * KN + t = (row r, key t), reduced
// by sum8, the last chunk padded with zero products: every (row, key) is summed in the same order,
// whichever rows share its chunk, so a row's result depends on its own query and keys only.
template <typename QT, typename KT, int64_t kDh, int RN>
void attend_rows_avx2(const QT* q, const KT* kg, const KT* vg, const int64_t* table, int64_t len, int64_t S,
                      int64_t row, float scale, QT* out, float* sr) {
  constexpr int64_t V = kDh / 8, KN = 8 / RN;   // vectors per head; keys per chunk
  __m256 qv[RN][V];
  for (int r = 0; r < RN; ++r) {
    alignas(32) float qf[kDh];
    for (int64_t d = 0; d < kDh; ++d) qf[d] = to_f(q[r * kDh + d]) * scale;
    for (int64_t i = 0; i < V; ++i) qv[r][i] = _mm256_load_ps(qf + 8 * i);
  }
  int64_t blk = 0, off = 0;                      // key j lies at (table[blk], off): no division per key
  for (int64_t j = 0; j < len; j += KN) {
    const int64_t n = len - j < KN ? len - j : KN;
    __m256 acc[8];
    for (int64_t t = 0; t < KN; ++t) {
      if (t >= n) {
        for (int r = 0; r < RN; ++r) acc[r * KN + t] = _mm256_setzero_ps();
        continue;
      }
      const KT* k = kg + (table[blk] * S + off) * row;
      if (++off == S) { off = 0; ++blk; }
      __m256 kv = load8(k);
      for (int r = 0; r < RN; ++r) acc[r * KN + t] = _mm256_mul_ps(qv[r][0], kv);
      for (int64_t i = 1; i < V; ++i) {
        kv = load8(k + 8 * i);
        for (int r = 0; r < RN; ++r) acc[r * KN + t] = _mm256_fmadd_ps(qv[r][i], kv, acc[r * KN + t]);
      }
    }
    alignas(32) float s8[8];
    _mm256_store_ps(s8, sum8(acc));
    for (int r = 0; r < RN; ++r)
      for (int64_t t = 0; t < n; ++t) sr[r * len + j + t] = s8[r * KN + t];
  }
  __m256 inv[RN], a[RN][V];
  for (int r = 0; r < RN; ++r) {
    const float m = max8(sr + r * len, len);
    inv[r] = _mm256_set1_ps(1.f / exp_sum8(sr + r * len, len, m));
    for (int64_t i = 0; i < V; ++i) a[r][i] = _mm256_setzero_ps();
  }
  for (int64_t base = 0, b = 0; base < len; ++b, base += S) {
    const int64_t n = len - base < S ? len - base : S;
    const KT* vb = vg + table[b] * S * row;
    for (int64_t o = 0; o < n; ++o) {
      __m256 p[RN];
      for (int r = 0; r < RN; ++r) p[r] = _mm256_set1_ps(sr[r * len + base + o]);
      for (int64_t i = 0; i < V; ++i) {
        const __m256 v = load8(vb + o * row + 8 * i);
        for (int r = 0; r < RN; ++r) a[r][i] = _mm256_fmadd_ps(p[r], v, a[r][i]);
      }
    }
  }
  for (int r = 0; r < RN; ++r) {
    alignas(32) float res[kDh];
    for (int64_t i = 0; i < V; ++i) _mm256_store_ps(res + 8 * i, _mm256_mul_ps(a[r][i], inv[r]));
    for (int64_t d = 0; d < kDh; ++d) out[r * kDh + d] = from_f<QT>(res[d]);
  }
}

template <typename QT, typename KT, int64_t kDh>
void attend_one_avx2(const QT* q, const KT* kc, const KT* vc, const int64_t* table, int64_t len, int64_t S,
                     int64_t G, int64_t g, int64_t R, float scale, QT* out, std::vector<float>& scores) {
  scores.resize(2 * len);
  const int64_t row = G * kDh;
  int64_t r = 0;
  for (; r + 2 <= R; r += 2)
    attend_rows_avx2<QT, KT, kDh, 2>(q + r * kDh, kc + g * kDh, vc + g * kDh, table, len, S, row, scale,
                                     out + r * kDh, scores.data());
  if (r < R)
    attend_rows_avx2<QT, KT, kDh, 1>(q + r * kDh, kc + g * kDh, vc + g * kDh, table, len, S, row, scale,
                                     out + r * kDh, scores.data());
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
                          const at::Tensor& seqs, const at::Tensor& positions, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = kc.size(1), G = kc.size(2), R = H / G;
  const int64_t W = tables.size(1);
  const QT* qp = q.data_ptr<QT>();
  const KT* kp = kc.data_ptr<KT>();
  const KT* vp = vc.data_ptr<KT>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int64_t* sq = seqs.data_ptr<int64_t>();
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
          bf(qp + (b * H + g * R) * Dh, kp, vp, tp + sq[b] * W, pp[b] + 1, S, G, g, R, static_cast<float>(scale),
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
          fast(qp + (b * H + g * R) * Dh, kp, vp, tp + sq[b] * W, pp[b] + 1, S, G, g, R, static_cast<float>(scale),
               op + (b * H + g * R) * Dh, scores);
          continue;
        }
      }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
      if constexpr (!std::is_same_v<KT, c10::Half>) {
        auto fast = Dh == 32 ? attend_one_avx2<QT, KT, 32> : Dh == 64 ? attend_one_avx2<QT, KT, 64>
                  : Dh == 128 ? attend_one_avx2<QT, KT, 128> : nullptr;
        if (fast != nullptr) {
          fast(qp + (b * H + g * R) * Dh, kp, vp, tp + sq[b] * W, pp[b] + 1, S, G, g, R, static_cast<float>(scale),
               op + (b * H + g * R) * Dh, scores);
          continue;
        }
      }
#endif
      auto attend = Dh == 32 ? attend_one<QT, KT, 32> : Dh == 64 ? attend_one<QT, KT, 64>
                  : Dh == 128 ? attend_one<QT, KT, 128> : attend_one<QT, KT, 0>;
      attend(qp + (b * H + g * R) * Dh, kp, vp, tp + sq[b] * W, pp[b] + 1, S, G, g, R, Dh,
                         static_cast<float>(scale), op + (b * H + g * R) * Dh, scores, acc, qf);
    }
  });
}

// Every query row of a step, prefill or decode alike: q [T, H, Dh]; k/v cache [N, S, G, Dh];
// block_tables [B, W] int64 of the step's sequences; token_seq [T] int64, the sequence of each
// row; positions [T] int64, each row's position (keys 0..position of its sequence are visible).
// -> [T, H, Dh] in q's dtype. Why per row and not per sequence: a row's result then depends on
// its own query and keys only, not on how the scheduler chunked its prompt or what it was batched
// with, so a request's tokens do not change with the load (with SDPA on padded chunks they did).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& positions,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "paged_attention: bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "paged_attention: heads do not match the cache");
  TORCH_CHECK(q.size(1) / k_cache.size(2) <= 64, "paged_attention: more than 64 query heads per kv head");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_attention: k and v caches differ in dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && token_seq.scalar_type() == at::kLong
              && positions.scalar_type() == at::kLong, "paged_attention: int64 tables, sequences and positions");
  TORCH_CHECK(token_seq.numel() == q.size(0) && positions.numel() == q.size(0), "paged_attention: one sequence and position per row");
  auto qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  auto tc = block_tables.contiguous(), sc = token_seq.contiguous(), pc = positions.contiguous();
  // Indices are checked here, once, so that the loops below cannot read outside the cache.
  const int64_t B = tc.size(0), W = tc.size(1), N = kc.size(0), S = kc.size(1);
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < B, "paged_attention: row ", t, " names sequence ", sp[t], " of ", B);
    TORCH_CHECK(pp[t] >= 0 && pp[t] < W * S, "paged_attention: row ", t, " position ", pp[t], " outside its table");
    for (int64_t blk = 0; blk <= pp[t] / S; ++blk)
      TORCH_CHECK(tp[sp[t] * W + blk] >= 0 && tp[sp[t] * W + blk] < N, "paged_attention: block id outside the cache");
  }
  auto out = at::empty_like(qc);
  const auto qt = qc.scalar_type(), kt = kc.scalar_type();
#define MOE_ATTN(QT, KT) paged_attention_impl<QT, KT>(qc, kc, vc, tc, sc, pc, scale, out)
  if (qt == at::kBFloat16 && kt == at::kBFloat16) MOE_ATTN(c10::BFloat16, c10::BFloat16);
  else if (qt == at::kBFloat16 && kt == at::kFloat) MOE_ATTN(c10::BFloat16, float);
  else if (qt == at::kFloat && kt == at::kFloat) MOE_ATTN(float, float);
  else if (qt == at::kFloat && kt == at::kBFloat16) MOE_ATTN(float, c10::BFloat16);
  else if (qt == at::kHalf && kt == at::kHalf) MOE_ATTN(c10::Half, c10::Half);
  else TORCH_CHECK(false, "paged_attention: unsupported dtypes ", qt, " / ", kt);
#undef MOE_ATTN
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_serve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor token_seq, "
        "Tensor positions, float scale) -> Tensor", &paged_attention);
}
