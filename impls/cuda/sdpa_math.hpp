// The arithmetic of the CUDA SDPA kernel (impls/cuda/sdpa.cu) as host/device
// helpers, so that CPU tests check exactly what the kernel computes: the key
// limit of a row (causal bottom-right + padding), RoPE pairing and rotation,
// the online-softmax update and finalization, and 16-bit float widening.
#pragma once

#include <cmath>
#include <cstdint>

#include "harness/dtype.hpp"
#include "impls/common.hpp"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace attnbench::sdpa_math {

inline constexpr float kNegInf = -INFINITY;
/// log2(e): scores are kept in base-2 units so the softmax uses exp2.
inline constexpr float kLog2e = 1.4426950408889634f;

/// Keys [0, limit) are visible to query row i: j < kv_len (clamped to [0, Nkv])
/// and, when causal, j ≤ i + Nkv − Nq (bottom-right alignment).
ATTNBENCH_HD int64_t row_limit(int64_t i, int64_t Nq, int64_t Nkv, int64_t kv_len, bool causal) {
  int64_t lim = kv_len < 0 ? 0 : (kv_len > Nkv ? Nkv : kv_len);
  if (causal) {
    const int64_t c = i + Nkv - Nq + 1;
    lim = c < lim ? (c < 0 ? 0 : c) : lim;
  }
  return lim;
}

/// RoPE position of query row i (queries are the last Nq positions of the keys).
ATTNBENCH_HD int64_t query_position(int64_t i, int64_t Nq, int64_t Nkv) { return i + Nkv - Nq; }

/// Dimension d's rotation pair: frequency index `freq` (< D/2), its partner
/// dimension, and whether d is the second member of the pair (b in a' = a c − b s,
/// b' = b c + a s). mode 1 = half-split (i, i + D/2), mode 2 = interleaved (2i, 2i + 1).
struct RopePair {
  int freq, partner;
  bool second;
};
ATTNBENCH_HD RopePair rope_pair(int mode, int D, int d) {
  const int half = D / 2;
  if (mode == 1) return d < half ? RopePair{d, d + half, false} : RopePair{d - half, d - half, true};
  return (d & 1) ? RopePair{d >> 1, d - 1, true} : RopePair{d >> 1, d + 1, false};
}

/// θ_freq · pos in double (the table is built from this once per call).
ATTNBENCH_HD double rope_angle(int64_t pos, int freq, int D) {
  return double(pos) * exp2(-2.0 * double(freq) / double(D) * 13.287712379549449);  // log2(10000)
}

/// Rotated value of dimension d given its own value x, its partner's value y
/// and the pair's (cos, sin).
ATTNBENCH_HD float rope_rotate(float x, float y, float c, float s, bool second) {
  return second ? x * c + y * s : x * c - y * s;
}

/// Online softmax. Running max m (base 2) and sum l per row; on a new tile with
/// maximum tile_max: m_new = max(m, tile_max), every probability 2^(s − m_new),
/// the row's accumulator and sum scaled by alpha = 2^(m − m_new), then
/// l = alpha·l + Σ p. A row that has seen no allowed key keeps m = −inf and gets
/// p = 0 and alpha = 0 (never NaN).
ATTNBENCH_HD float softmax_new_max(float m, float tile_max) { return m > tile_max ? m : tile_max; }
ATTNBENCH_HD float softmax_prob(float s, float m_new) { return m_new == kNegInf ? 0.0f : exp2f(s - m_new); }
ATTNBENCH_HD float softmax_alpha(float m_old, float m_new) { return m_old == kNegInf ? 0.0f : exp2f(m_old - m_new); }
/// Output of a row from its accumulator: acc / l, or 0 for a row without keys.
ATTNBENCH_HD float softmax_finish(float acc, float l) { return l > 0.0f ? acc / l : 0.0f; }

/// 16-bit floats widened to f32 from their bit patterns (exact).
ATTNBENCH_HD float bf16_bits_to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(uint32_t(bits) << 16);
#else
  return bits_to_float(uint32_t(bits) << 16);
#endif
}
ATTNBENCH_HD float f16_bits_to_float(uint16_t bits) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(bits));
#else
  return to_float(f16_t{bits});
#endif
}

/// Storage type of a kernel input dtype and its widening to f32.
template <DType kT>
struct Elem {
  using type = float;
  ATTNBENCH_HD static float to_f32(float x) { return x; }
};
template <>
struct Elem<DType::bf16> {
  using type = uint16_t;
  ATTNBENCH_HD static float to_f32(uint16_t x) { return bf16_bits_to_float(x); }
};
template <>
struct Elem<DType::f16> {
  using type = uint16_t;
  ATTNBENCH_HD static float to_f32(uint16_t x) { return f16_bits_to_float(x); }
};

}  // namespace attnbench::sdpa_math
