// Highway vector helpers shared by the fused CPU attention kernels (SDPA now,
// the masked-attention family later): a fast exp2, register-blocked micro-kernels
// for S = Q·Kᵀ and O += P·V, the online-softmax step of one tile row, RoPE tables.
//
// Per-target header (Highway's foreach_target pattern): include it after
// "hwy/highway.h" from a file compiled with HWY_TARGET_INCLUDE; everything here
// lives in attnbench::cpu::HWY_NAMESPACE and is inlined into the kernels.
//
// Layouts the micro-kernels expect (f32, rows contiguous):
//   q  (rows, D)        a query tile, already RoPE-rotated and pre-scaled
//   kt (D, kt_stride)   a packed key tile: kt[d * kt_stride + j] = k_j[d]
//   s  (rows, s_stride) scores / probabilities of the tile
//   v  (keys, v_stride) value rows, D padded to a multiple of 16 lanes (any alignment)
//   o  (rows, o_stride) the output accumulator, same padding as v

// Per-target include guard.
#if defined(ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#undef ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#else
#define ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Register blocking: rows × vectors of accumulators. AVX-512 has 32 registers:
// 6 × 4 accumulators + 4 operand registers; 16-register targets use 4 × 2.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr size_t kBlockRows = 6;
inline constexpr size_t kBlockVecs = 4;
#else
inline constexpr size_t kBlockRows = 4;
inline constexpr size_t kBlockVecs = 2;
#endif

/// 2^x for x ≤ 0 with x clamped to −126 (so −inf gives 2^−126 ≈ 1.2e-38, not 0):
/// range reduction x = n + f, f ∈ [−½, ½], 2^f by its degree-6 Taylor
/// polynomial (truncation error < 1.2e-7 relative), 2^n by building the exponent.
HWY_INLINE VF Exp2Clamped(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  x = hn::Max(x, hn::Set(df, -126.0f));
  const VF n = hn::Round(x);
  const VF f = hn::Sub(x, n);
  // c_k = ln(2)^k / k!
  VF p = hn::Set(df, 1.5403530393381606e-04f);
  p = hn::MulAdd(p, f, hn::Set(df, 1.3333558146428443e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.6181291076284772e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.5504108664821580e-02f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4022650695910071e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.9314718055994531e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0f));
  const auto e = hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
  return hn::Mul(p, hn::BitCast(df, e));
}

/// 2^x for x ≤ 0, exactly 0 below 2^−126 (and for x = −inf).
HWY_INLINE VF Exp2NonPositive(DF df, VF x) {
  return hn::IfThenZeroElse(hn::Lt(x, hn::Set(df, -126.0f)), Exp2Clamped(df, x));
}

/// s[r][j] = Σ_{d<D} q[r][d] · kt[d][j] for r < R, j < C·Lanes: one register
/// block. Also folds the block into the lane-wise running row maxima
/// rowmax[r] (overwritten when `first`), so the softmax needs no extra pass.
template <size_t R, size_t C>
HWY_INLINE void ScoresBlock(DF df, size_t D, const float* HWY_RESTRICT q, size_t q_stride,  // (R, D)
                            const float* HWY_RESTRICT kt, size_t kt_stride,                 // (D, C·L)
                            float* HWY_RESTRICT s, size_t s_stride,                         // (R, C·L)
                            float* HWY_RESTRICT rowmax, bool first) {                       // (R, L)
  const size_t L = hn::Lanes(df);
  VF acc[R][C];
  for (size_t r = 0; r < R; ++r)
    for (size_t c = 0; c < C; ++c) acc[r][c] = hn::Zero(df);
  for (size_t d = 0; d < D; ++d) {
    VF kv[C];
    for (size_t c = 0; c < C; ++c) kv[c] = hn::Load(df, kt + d * kt_stride + c * L);
    for (size_t r = 0; r < R; ++r) {
      const VF qb = hn::Set(df, q[r * q_stride + d]);
      for (size_t c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(qb, kv[c], acc[r][c]);
    }
  }
  for (size_t r = 0; r < R; ++r) {
    VF mx = first ? acc[r][0] : hn::Max(acc[r][0], hn::Load(df, rowmax + r * L));
    for (size_t c = 0; c < C; ++c) {
      hn::Store(acc[r][c], df, s + r * s_stride + c * L);
      mx = hn::Max(mx, acc[r][c]);
    }
    hn::Store(mx, df, rowmax + r * L);
  }
}

/// o[r][0:C·L] = alpha[r] · o[r][0:C·L] + Σ_{j<n} p[r][j] · v[j][0:C·L].
template <size_t R, size_t C>
HWY_INLINE void AccumulateBlock(DF df, size_t n, const float* HWY_RESTRICT p, size_t p_stride,  // (R, n)
                                const float* HWY_RESTRICT v, size_t v_stride,                   // (n, C·L)
                                const float* HWY_RESTRICT alpha,                                // (R,)
                                float* HWY_RESTRICT o, size_t o_stride) {                       // (R, C·L)
  const size_t L = hn::Lanes(df);
  VF acc[R][C];
  for (size_t r = 0; r < R; ++r) {
    const VF a = hn::Set(df, alpha[r]);
    for (size_t c = 0; c < C; ++c) acc[r][c] = hn::Mul(a, hn::Load(df, o + r * o_stride + c * L));
  }
  for (size_t j = 0; j < n; ++j) {
    VF vv[C];
    for (size_t c = 0; c < C; ++c) vv[c] = hn::LoadU(df, v + j * v_stride + c * L);
    for (size_t r = 0; r < R; ++r) {
      const VF pb = hn::Set(df, p[r * p_stride + j]);
      for (size_t c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(pb, vv[c], acc[r][c]);
    }
  }
  for (size_t r = 0; r < R; ++r)
    for (size_t c = 0; c < C; ++c) hn::Store(acc[r][c], df, o + r * o_stride + c * L);
}

/// AccumulateBlock over `vecs` vectors of o's columns (1 ≤ vecs ≤ kBlockVecs).
template <size_t R>
HWY_INLINE void AccumulateBlockVecs(DF df, size_t vecs, size_t n, const float* HWY_RESTRICT p, size_t p_stride,
                                    const float* HWY_RESTRICT v, size_t v_stride, const float* HWY_RESTRICT alpha,
                                    float* HWY_RESTRICT o, size_t o_stride) {
  if constexpr (kBlockVecs >= 4) {
    if (vecs >= 4) return AccumulateBlock<R, 4>(df, n, p, p_stride, v, v_stride, alpha, o, o_stride);
    if (vecs == 3) return AccumulateBlock<R, 3>(df, n, p, p_stride, v, v_stride, alpha, o, o_stride);
  }
  if (vecs >= 2) return AccumulateBlock<R, 2>(df, n, p, p_stride, v, v_stride, alpha, o, o_stride);
  AccumulateBlock<R, 1>(df, n, p, p_stride, v, v_stride, alpha, o, o_stride);
}

/// ScoresBlock over the first `rows` rows (1 ≤ rows ≤ kBlockRows): the last,
/// short block of a tile (decode has a single row) without padding rows.
template <size_t R = kBlockRows>
HWY_INLINE void ScoresBlockRows(DF df, size_t rows, size_t D, const float* HWY_RESTRICT q, size_t q_stride,
                                const float* HWY_RESTRICT kt, size_t kt_stride, float* HWY_RESTRICT s, size_t s_stride,
                                float* HWY_RESTRICT rowmax, bool first) {
  if constexpr (R > 1) {
    if (rows < R) return ScoresBlockRows<R - 1>(df, rows, D, q, q_stride, kt, kt_stride, s, s_stride, rowmax, first);
  }
  ScoresBlock<R, kBlockVecs>(df, D, q, q_stride, kt, kt_stride, s, s_stride, rowmax, first);
}

/// AccumulateBlockVecs over the first `rows` rows (1 ≤ rows ≤ kBlockRows).
template <size_t R = kBlockRows>
HWY_INLINE void AccumulateBlockRows(DF df, size_t rows, size_t vecs, size_t n, const float* HWY_RESTRICT p,
                                    size_t p_stride, const float* HWY_RESTRICT v, size_t v_stride,
                                    const float* HWY_RESTRICT alpha, float* HWY_RESTRICT o, size_t o_stride) {
  if constexpr (R > 1) {
    if (rows < R) return AccumulateBlockRows<R - 1>(df, rows, vecs, n, p, p_stride, v, v_stride, alpha, o, o_stride);
  }
  AccumulateBlockVecs<R>(df, vecs, n, p, p_stride, v, v_stride, alpha, o, o_stride);
}

/// Online-softmax step for one row of a tile (scores in log2 units, n a multiple
/// of Lanes, masked entries −inf). `vmax` holds the lane-wise maxima of the row
/// (from ScoresBlock) or is null when masking changed the row (then it is
/// recomputed). Updates the running max m and sum l, turns s into unnormalized
/// probabilities 2^(s − m_new) and returns the factor alpha = 2^(m_old − m_new)
/// by which the row's output accumulator must be scaled. A row with no finite
/// score so far keeps m = −inf, l = 0 and gets p = 0 (never NaN). Masked
/// entries of a row that has a finite max get 2^−126 instead of 0: at most
/// Nkv · 1.2e-38 relative to l ≥ 1, below any rounding, and one op cheaper.
HWY_INLINE float OnlineSoftmaxRow(DF df, float* HWY_RESTRICT s, size_t n, const float* HWY_RESTRICT vmax, float& m,
                                  float& l) {
  const size_t L = hn::Lanes(df);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  VF vm_tile;
  if (vmax) {
    vm_tile = hn::Load(df, vmax);
  } else {
    vm_tile = hn::Set(df, kNegInf);
    for (size_t j = 0; j < n; j += L) vm_tile = hn::Max(vm_tile, hn::Load(df, s + j));
  }
  const float m_new = std::max(m, hn::GetLane(hn::MaxOfLanes(df, vm_tile)));
  if (m_new == kNegInf) {
    for (size_t j = 0; j < n; j += L) hn::Store(hn::Zero(df), df, s + j);
    return 1.0f;
  }
  const VF vm = hn::Set(df, m_new);
  VF vsum = hn::Zero(df);
  for (size_t j = 0; j < n; j += L) {
    const VF p = Exp2Clamped(df, hn::Sub(hn::Load(df, s + j), vm));
    vsum = hn::Add(vsum, p);
    hn::Store(p, df, s + j);
  }
  const float alpha = m == kNegInf ? 0.0f : std::exp2(m - m_new);
  l = l * alpha + hn::GetLane(hn::SumOfLanes(df, vsum));
  m = m_new;
  return alpha;
}

/// RoPE tables for positions pos_min … pos_min + n_pos − 1 (rows of D/2):
/// cos and sin of pos · θ_i, θ_i = 10000^(−2i/D), computed in double.
HWY_INLINE void RopeTables(int64_t pos_min, int64_t n_pos, int64_t D, float* HWY_RESTRICT cos_t,
                           float* HWY_RESTRICT sin_t, int threads) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t pi = 0; pi < n_pos; ++pi) {
    const double pos = double(pi + pos_min);
    for (int64_t i = 0; i < half; ++i) {
      const double angle = pos * std::pow(10000.0, -double(2 * i) / double(D));
      cos_t[pi * half + i] = float(std::cos(angle));
      sin_t[pi * half + i] = float(std::sin(angle));
    }
  }
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
