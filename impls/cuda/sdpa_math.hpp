// The arithmetic of the CUDA SDPA kernels (impls/cuda/sdpa.cu, sdpa_backward.cu) as
// host/device helpers, so that CPU tests check exactly what the kernels compute: the key
// limit of a row (causal bottom-right + padding) and the first query row that sees a key,
// RoPE pairing, rotation and the gradient's inverse rotation, the online-softmax update and
// finalization, the log-sum-exp the forward saves and the backward's probabilities and
// score gradients from it, and 16-bit float widening.
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

/// First query row that sees key j (row limits are non-decreasing in i): the smallest i
/// with row_limit(i) > j, or Nq when no row does (j ≥ kv_len, or j beyond the last row's
/// causal limit).
ATTNBENCH_HD int64_t first_query_row(int64_t j, int64_t Nq, int64_t Nkv, int64_t kv_len, bool causal) {
  if (j >= (kv_len > Nkv ? Nkv : kv_len)) return Nq;
  if (!causal) return 0;
  const int64_t i = j - Nkv + Nq;  // row_limit(i) = i + Nkv − Nq + 1 > j
  return i < 0 ? 0 : (i > Nq ? Nq : i);
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

/// The first member of frequency f's pair (the inverse of rope_pair): f (half-split,
/// partner f + D/2) or 2f (interleaved, partner 2f + 1).
ATTNBENCH_HD int rope_first_dim(int mode, int f) { return mode == 1 ? f : 2 * f; }

/// θ_freq · pos in double (the table is built from this once per call).
ATTNBENCH_HD double rope_angle(int64_t pos, int freq, int D) {
  return double(pos) * exp2(-2.0 * double(freq) / double(D) * 13.287712379549449);  // log2(10000)
}

/// Rotated value of dimension d given its own value x, its partner's value y
/// and the pair's (cos, sin).
ATTNBENCH_HD float rope_rotate(float x, float y, float c, float s, bool second) {
  return second ? x * c + y * s : x * c - y * s;
}

/// Gradient through rope_rotate: given the gradients gx, gy of a pair's rotated values
/// (this dimension's and its partner's), the gradient of this dimension's input value.
/// The rotation is orthogonal, so this is the rotation by −θ: first member
/// g_a = g_a' c + g_b' s, second g_b = g_b' c − g_a' s.
ATTNBENCH_HD float rope_rotate_grad(float gx, float gy, float c, float s, bool second) {
  return second ? gx * c - gy * s : gx * c + gy * s;
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

/// ln(2): base-2 statistics back to natural units.
inline constexpr float kLn2 = 0.6931471805599453f;

/// The row's natural-log log-sum-exp from the base-2 online-softmax state (m, l) of
/// scores s₂ = log2(e)·s: log Σ exp(s) = ln2 · (m + log2 l); −inf for a row without keys.
ATTNBENCH_HD float lse_from_base2(float m, float l) { return l > 0.0f ? kLn2 * (m + log2f(l)) : kNegInf; }

/// Backward: the probability of a score s₂ (base 2, log2(e)·s) of a row with natural
/// log-sum-exp lse, recomputed as 2^(s₂ − log2(e)·lse); 0 for a masked score (s₂ = −inf)
/// and for a row without keys (lse = −inf).
ATTNBENCH_HD float prob_from_lse(float s2, float lse) {
  return lse == kNegInf || s2 == kNegInf ? 0.0f : exp2f(s2 - kLog2e * lse);
}

/// Backward: the gradient of a score (natural units) from its probability p, the
/// gradient dp = dO_i·v_j of the probability and the row's Δ_i = dO_i·O_i:
/// dS = p (dp − Δ_i) (the softmax Jacobian).
ATTNBENCH_HD float score_grad(float p, float dp, float delta) { return p * (dp - delta); }

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
