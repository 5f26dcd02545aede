// The W8A16 / W4A16 GEMM on AMX tiles (Sapphire Rapids and later: AMX-BF16), for quant_gemm.
//
// Included by quant_gemm.cpp inside its namespace, after the AVX512-BF16 code whose pair layout and
// converters (int8_group_to_bf16, int4_group_to_bf16) it reuses. Why: on a Xeon with AMX the
// vdpbf16ps kernel's time grows with every row of x (768x192: 11 µs at 1 row, 40 at 8, 77 at 16),
// while one tile multiply takes up to 16 rows at once: the same weight converted once to bf16 and
// multiplied by `tdpbf16ps` costs 11-14 µs from 1 to 16 rows (/tmp microbenchmark of this code,
// docs/benchmarks.md 2026-12-03 evening). Converting the int8/int4 codes is then the whole cost, and
// it no longer scales with the rows.
//
// Layout fit: the pair layout [Nb, Kp, 16, 2] is AMX's B-tile layout already: for 32 inputs (16
// pairs) of one 16-output block, tile row p holds (w[n][2p], w[n][2p+1]) for n = 0..15, 64 bytes
// once converted to bf16. x's rows are A-tile rows as they lie in memory (32 bf16 = 64 bytes a
// chunk). Tiles: 0-3 accumulate four output blocks (rows x 16 float32), 4 holds x, 5-7 weights.
//
// Numerics: each output is a float32 sum of exact bf16 x bf16 products, times the row's scale (INT8)
// or per group of G inputs times the group's scale (INT4, summed in float32), rounded once to bf16 —
// the AVX512-BF16 path's math in another summation order. A row's result never depends on the other
// rows of the call (the tile multiply is row by row), so batching does not change a sequence's logits.
#pragma once

#if defined(MOE_QGEMM_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MOE_QGEMM_AMX 1
#include <cstdlib>
#include <sys/syscall.h>
#include <unistd.h>

struct AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX's tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asked once, for every thread. False (an old kernel, a VM that hides AMX):
// quant_gemm keeps the AVX512-BF16 path. MOE_SERVE_AMX=0 keeps it too (for A/B measurements).
inline bool amx_ready() {
  static const bool ready = [] {
    const char* env = std::getenv("MOE_SERVE_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ready;
}

inline void amx_configure(int64_t rows) {     // tiles 0-4: `rows` rows of x / outputs; 5-7: 16 pair rows
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t < 5 ? rows : 16);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One 16-output block's weights for inputs [kc, kc + 32) as a bf16 B tile in `dst` (16 x 32 bf16).
inline void amx_weight_tile(QuantWeight w, int64_t nb, int64_t Kp, int64_t kc, uint16_t* dst) {
  const int64_t kp0 = kc / 2;
  if (w.group == 0) {
    const int8_t* src = static_cast<const int8_t*>(w.packed) + (nb * Kp + kp0) * 32;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + p * 32, reinterpret_cast<__m512i>(int8_group_to_bf16(src + p * 32)));
  } else {
    const uint8_t* src = static_cast<const uint8_t*>(w.packed) + (nb * Kp + kp0) * 16;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(dst + p * 32, reinterpret_cast<__m512i>(int4_group_to_bf16(src + p * 16)));
  }
}

// Tile j += x tile (4) @ weight tile; the tile numbers are instruction operands, hence the switch.
inline void amx_multiply(int j, const uint16_t* b) {
  switch (j) {
    case 0: _tile_loadd(5, b, 64); _tile_dpbf16ps(0, 4, 5); break;
    case 1: _tile_loadd(6, b, 64); _tile_dpbf16ps(1, 4, 6); break;
    case 2: _tile_loadd(7, b, 64); _tile_dpbf16ps(2, 4, 7); break;
    default: _tile_loadd(5, b, 64); _tile_dpbf16ps(3, 4, 5); break;
  }
}

inline void amx_store(int j, float* c) {
  switch (j) {
    case 0: _tile_stored(0, c, 64); break;
    case 1: _tile_stored(1, c, 64); break;
    case 2: _tile_stored(2, c, 64); break;
    default: _tile_stored(3, c, 64); break;
  }
}

// y [M, N] (row stride N) for output blocks [nb_begin, nb_end) = x [M, K] (row stride K) @ dequant(w)^T.
// Needs K % 32 == 0 and, for INT4, G % 32 == 0 and K % G == 0 (quant_gemm checks). Runs on the calling thread.
inline void amx_gemm(const c10::BFloat16* x, int64_t M, int64_t K, QuantWeight w, int64_t N, c10::BFloat16* out,
                     int64_t nb_begin, int64_t nb_end) {
  const int64_t Kp = K / 2, Q = w.group ? K / w.group : 0;
  const int64_t chunks_per_group = w.group ? w.group / 32 : K / 32;   // INT8: the whole K is one "group"
  alignas(64) uint16_t bt[16 * 32];
  alignas(64) float c[4][16 * 16];
  alignas(64) float total[4][16 * 16];
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t mb = M - m0 < 16 ? M - m0 : 16;
    amx_configure(mb);
    const c10::BFloat16* xb = x + m0 * K;
    for (int64_t nb0 = nb_begin; nb0 < nb_end; nb0 += 4) {
      const int nblk = static_cast<int>(nb_end - nb0 < 4 ? nb_end - nb0 : 4);
      for (int j = 0; j < nblk; ++j) std::memset(total[j], 0, sizeof(float) * 16 * mb);
      for (int64_t g0 = 0; g0 < K; g0 += 32 * chunks_per_group) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kc = g0; kc < g0 + 32 * chunks_per_group; kc += 32) {
          _tile_loadd(4, xb + kc, K * 2);
          for (int j = 0; j < nblk; ++j) {
            amx_weight_tile(w, nb0 + j, Kp, kc, bt);
            amx_multiply(j, bt);
          }
        }
        for (int j = 0; j < nblk; ++j) {
          amx_store(j, c[j]);
          const float* sc = w.group == 0 ? w.scales + (nb0 + j) * 16 : w.scales + ((nb0 + j) * Q + g0 / w.group) * 16;
          const __m512 s = _mm512_loadu_ps(sc);
          for (int64_t m = 0; m < mb; ++m)
            _mm512_store_ps(total[j] + m * 16, _mm512_fmadd_ps(_mm512_load_ps(c[j] + m * 16), s,
                                                               _mm512_load_ps(total[j] + m * 16)));
        }
      }
      for (int j = 0; j < nblk; ++j) {
        const int64_t nb = nb0 + j, valid = N - nb * 16 < 16 ? N - nb * 16 : 16;
        const __mmask16 keep = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
        for (int64_t m = 0; m < mb; ++m) {
          const __m256i y = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_load_ps(total[j] + m * 16)));
          _mm256_mask_storeu_epi16(out + (m0 + m) * N + nb * 16, keep, y);
        }
      }
    }
  }
  _tile_release();
}
#endif
