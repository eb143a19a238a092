// Native bf16 micro-kernels (impls/cpu/bf16_kernels.hpp): AMX-BF16 tiles and
// AVX512-BF16 dot products, each function compiled for those instructions by
// its own target attribute; the callers dispatch at run time.
#include "impls/cpu/bf16_kernels.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 reports the deliberately undefined pass-through operands inside
// immintrin.h's AVX-512 helpers as uninitialized once they are inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)  // GCC's own warning group (clang has none of that name)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

#define ATTNBENCH_BF16_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define ATTNBENCH_AMX_ATTR \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))

namespace attnbench::cpu::bf16k {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

/// Eight tiles of 16 rows × 64 bytes (16 f32 or 32 bf16 per row).
ATTNBENCH_AMX_ATTR inline void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}

/// f32 of the 32 bf16 in h: lanes 0–15 and 16–31.
ATTNBENCH_BF16_ATTR inline __m512 bf16_lo(__m512i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
}
ATTNBENCH_BF16_ATTR inline __m512 bf16_hi(__m512i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
}
/// The 32 f32 of (a, b) rounded to bf16 (nearest even): a in lanes 0–15, b in 16–31.
ATTNBENCH_BF16_ATTR inline __m512i to_bf16(__m512 a, __m512 b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

template <int R>
ATTNBENCH_BF16_ATTR inline void scores_block(int64_t dk, const uint16_t* qb, const uint16_t* kb, int64_t ld,
                                             float* s, int64_t s_ld) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < dk / 2; ++p) {
    __m512i kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(kb + (p * ld + 16 * c) * 2);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, qb + r * dk + 2 * p, sizeof pair);
      const __m512i qv = _mm512_set1_epi32(pair);
      for (int c = 0; c < 4; ++c)
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], reinterpret_cast<__m512bh>(qv), reinterpret_cast<__m512bh>(kv[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_store_ps(s + r * s_ld + 16 * c, acc[r][c]);
}

}  // namespace

ATTNBENCH_AMX_ATTR void scores_amx(int64_t rows16, int64_t dk, const uint16_t* qb, const uint16_t* kb, int64_t ld,
                                   int64_t ncols, float* s, int64_t s_ld) {
  configure_tiles();
  const int64_t qs = dk * 2, ks = ld * 4, ss = s_ld * 4;
  int64_t r0 = 0;
  for (; r0 + 32 <= rows16; r0 += 32)
    for (int64_t j0 = 0; j0 < ncols; j0 += 32) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t k0 = 0; k0 < dk; k0 += 32) {
        _tile_loadd(4, qb + r0 * dk + k0, qs);
        _tile_loadd(5, qb + (r0 + 16) * dk + k0, qs);
        _tile_loadd(6, kb + ((k0 / 2) * ld + j0) * 2, ks);
        _tile_loadd(7, kb + ((k0 / 2) * ld + j0 + 16) * 2, ks);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, s + r0 * s_ld + j0, ss);
      _tile_stored(1, s + r0 * s_ld + j0 + 16, ss);
      _tile_stored(2, s + (r0 + 16) * s_ld + j0, ss);
      _tile_stored(3, s + (r0 + 16) * s_ld + j0 + 16, ss);
    }
  for (; r0 < rows16; r0 += 16)
    for (int64_t j0 = 0; j0 < ncols; j0 += 32) {
      _tile_zero(0); _tile_zero(1);
      for (int64_t k0 = 0; k0 < dk; k0 += 32) {
        _tile_loadd(4, qb + r0 * dk + k0, qs);
        _tile_loadd(6, kb + ((k0 / 2) * ld + j0) * 2, ks);
        _tile_loadd(7, kb + ((k0 / 2) * ld + j0 + 16) * 2, ks);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
      _tile_stored(0, s + r0 * s_ld + j0, ss);
      _tile_stored(1, s + r0 * s_ld + j0 + 16, ss);
    }
  _tile_release();
}

ATTNBENCH_BF16_ATTR void scores_dpbf16(int64_t rows, int64_t dk, const uint16_t* qb, const uint16_t* kb, int64_t ld,
                                       int64_t ncols, float* s, int64_t s_ld) {
  for (int64_t j0 = 0; j0 < ncols; j0 += 64) {
    int64_t r0 = 0;
    for (; r0 + 6 <= rows; r0 += 6) scores_block<6>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld);
    switch (rows - r0) {
      case 5: scores_block<5>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld); break;
      case 4: scores_block<4>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld); break;
      case 3: scores_block<3>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld); break;
      case 2: scores_block<2>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld); break;
      case 1: scores_block<1>(dk, qb + r0 * dk, kb + j0 * 2, ld, s + r0 * s_ld + j0, s_ld); break;
      default: break;
    }
  }
}

ATTNBENCH_AMX_ATTR void accumulate_amx(int64_t rows16, int64_t n, const float* p, int64_t p_ld, const uint16_t* vb,
                                       int64_t dp, const float* alpha, float* o, int64_t o_ld, uint16_t* pb) {
  // O *= alpha; P split into hi + mid + lo bf16 parts (3 planes of (rows16, n)).
  const int64_t plane = rows16 * n;
  for (int64_t r = 0; r < rows16; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int64_t d = 0; d < dp; d += 16) _mm512_store_ps(o + r * o_ld + d, _mm512_mul_ps(a, _mm512_load_ps(o + r * o_ld + d)));
    for (int64_t j = 0; j < n; j += 32) {
      const __m512 x0 = _mm512_load_ps(p + r * p_ld + j), x1 = _mm512_load_ps(p + r * p_ld + j + 16);
      const __m512i hi = to_bf16(x0, x1);
      const __m512 r0 = _mm512_sub_ps(x0, bf16_lo(hi)), r1 = _mm512_sub_ps(x1, bf16_hi(hi));
      const __m512i mid = to_bf16(r0, r1);
      const __m512i lo = to_bf16(_mm512_sub_ps(r0, bf16_lo(mid)), _mm512_sub_ps(r1, bf16_hi(mid)));
      _mm512_storeu_si512(pb + r * n + j, hi);
      _mm512_storeu_si512(pb + plane + r * n + j, mid);
      _mm512_storeu_si512(pb + 2 * plane + r * n + j, lo);
    }
  }
  configure_tiles();
  const int64_t ps = n * 2, vs = dp * 4, os = o_ld * 4;
  for (int64_t r0 = 0; r0 < rows16; r0 += 16)
    for (int64_t d0 = 0; d0 < dp; d0 += 64) {
      const int64_t nd = (dp - d0) / 16 < 4 ? (dp - d0) / 16 : 4;
      float* oc = o + r0 * o_ld + d0;
      _tile_loadd(0, oc, os);
      if (nd > 1) _tile_loadd(1, oc + 16, os);
      if (nd > 2) _tile_loadd(2, oc + 32, os);
      if (nd > 3) _tile_loadd(3, oc + 48, os);
      for (int64_t j0 = 0; j0 < n; j0 += 32) {
        _tile_loadd(4, pb + r0 * n + j0, ps);
        _tile_loadd(6, pb + plane + r0 * n + j0, ps);
        _tile_loadd(7, pb + 2 * plane + r0 * n + j0, ps);
        const uint16_t* v = vb + ((j0 / 2) * dp + d0) * 2;
        _tile_loadd(5, v, vs);
        _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(0, 6, 5); _tile_dpbf16ps(0, 7, 5);
        if (nd > 1) {
          _tile_loadd(5, v + 32, vs);
          _tile_dpbf16ps(1, 4, 5); _tile_dpbf16ps(1, 6, 5); _tile_dpbf16ps(1, 7, 5);
        }
        if (nd > 2) {
          _tile_loadd(5, v + 64, vs);
          _tile_dpbf16ps(2, 4, 5); _tile_dpbf16ps(2, 6, 5); _tile_dpbf16ps(2, 7, 5);
        }
        if (nd > 3) {
          _tile_loadd(5, v + 96, vs);
          _tile_dpbf16ps(3, 4, 5); _tile_dpbf16ps(3, 6, 5); _tile_dpbf16ps(3, 7, 5);
        }
      }
      _tile_stored(0, oc, os);
      if (nd > 1) _tile_stored(1, oc + 16, os);
      if (nd > 2) _tile_stored(2, oc + 32, os);
      if (nd > 3) _tile_stored(3, oc + 48, os);
    }
  _tile_release();
}

ATTNBENCH_BF16_ATTR double dpbf16_probe(int64_t iters, float* sink) {
  __m512 c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm512_set1_ps(1.0f + 0.01f * float(i));
  const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));  // 1.0
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x33803380));  // 6e-8
  for (int64_t i = 0; i < iters; ++i)
    for (int k = 0; k < 12; ++k) c[k] = _mm512_dpbf16_ps(c[k], a, b);
  __m512 s = c[0];
  for (int k = 1; k < 12; ++k) s = _mm512_add_ps(s, c[k]);
  *sink = _mm512_reduce_add_ps(s);
  return 12.0 * 64.0 * double(iters);
}

ATTNBENCH_AMX_ATTR double amx_probe(int64_t iters, float* sink) {
  alignas(64) uint16_t src[16 * 32];
  alignas(64) float out[16 * 16];
  for (auto& x : src) x = 0x3380;
  configure_tiles();
  _tile_loadd(4, src, 64); _tile_loadd(5, src, 64); _tile_loadd(6, src, 64); _tile_loadd(7, src, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  *sink = out[0];
  return 4.0 * 2.0 * 16 * 16 * 32 * double(iters);
}

}  // namespace attnbench::cpu::bf16k

#else  // not x86-64: never called (cpu_features() reports no bf16 paths)
#include <stdexcept>
namespace attnbench::cpu::bf16k {
void scores_amx(int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t, float*, int64_t) {
  throw std::logic_error("scores_amx: no AMX on this architecture");
}
void scores_dpbf16(int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t, float*, int64_t) {
  throw std::logic_error("scores_dpbf16: no AVX512-BF16 on this architecture");
}
void accumulate_amx(int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t,
                    uint16_t*) {
  throw std::logic_error("accumulate_amx: no AMX on this architecture");
}
double dpbf16_probe(int64_t, float*) { return 0; }
double amx_probe(int64_t, float*) { return 0; }
}  // namespace attnbench::cpu::bf16k
#endif
