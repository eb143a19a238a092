// The CPU flash-attention tile code, shared by the fused SDPA and the
// block-sparse masked-attention kernels in both directions (impls/cpu/sdpa.cpp,
// impls/cpu/masked.cpp): a fast exp2, register-blocked micro-kernels for
// S = Q·Kᵀ and O += P·V, the online-softmax step, RoPE tables and rotations,
// key-tile packing, and the two tile loops:
//   forward   ForwardRows: one tile of query rows against a sequence of key
//             tiles (S → mask → online softmax → O += P·V), FinishRows
//   backward  BackwardPair: one (query rows, key tile) pair of FlashAttention-2's
//             backward (recompute P from the saved log-sum-exp, dP = dO·Vᵀ,
//             dS = P ∘ (dP − Δ), dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS, dQ += dS·K)
// The kernels differ only in which tiles they visit and how a tile is masked:
// they pass those as callbacks (a row limit for SDPA, the block map, mask and
// score mod for masked attention). Nothing here knows the harness.
//
// Per-target header (Highway's foreach_target pattern): include it after
// "hwy/highway.h" from a file compiled with HWY_TARGET_INCLUDE; the vector code
// lives in attnbench::cpu::HWY_NAMESPACE, the scalar helpers (compiled once) in
// attnbench::cpu::attn.
//
// Layouts the micro-kernels expect (f32, rows contiguous):
//   q  (rows, D)        query rows (any alignment), RoPE-rotated and pre-scaled
//   kt (D, kt_stride)   a packed key tile: kt[d * kt_stride + j] = k_j[d] (aligned)
//   s  (rows, s_stride) scores / probabilities of the tile (aligned)
//   v  (keys, v_stride) value rows, Dv padded to a multiple of 16 lanes (any alignment)
//   o  (rows, o_stride) the output accumulator, same padding as v (aligned)
// Dv, the head dimension of v, o and dO, may differ from D, that of q and k.
// The backward uses the same two kernels on transposed operands: dP = dO·Vᵀ is
// a score kernel over packed Vᵀ, dVᵀ = dOᵀ·P and dKᵀ = Qᵀ·dS are accumulate
// kernels whose "probabilities" are the transposed query side (D, rows).

// Scalar helpers: compiled once.
#ifndef ATTNBENCH_IMPLS_CPU_ATTENTION_SHARED_
#define ATTNBENCH_IMPLS_CPU_ATTENTION_SHARED_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "harness/dtype.hpp"
#include "impls/cpu/bf16_kernels.hpp"
#include "impls/cpu/cpu_features.hpp"

namespace attnbench::cpu::attn {

inline constexpr int64_t kMaxLanes = 16;  // f32 lanes of the widest x86 target (AVX-512)
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// How a forward tile's products run (impls/cpu/cpu_features.hpp): f32 (inputs
/// widened), Q·Kᵀ on VDPBF16PS with P·V in f32, or both on AMX tiles.
enum class Bf16Mode : uint8_t { off, dpbf16, amx };

/// The kernel path name of a mode ("" for off: the f32 path's name).
inline const char* bf16_mode_path(Bf16Mode m) {
  return m == Bf16Mode::amx ? "amx-bf16" : m == Bf16Mode::dpbf16 ? "avx512bf16" : "";
}

/// The mode a forward call takes now: `bf16_ok` (bf16 inputs the native products
/// can serve), the machine and the path limit, and whether this Highway target is AVX-512.
/// A forward that saves the lse for a backward is never bf16_ok: the backward recomputes
/// S with the f32 products and needs the forward's S (so its lse) bit for bit; scores from
/// VDPBF16PS, summed in another order, left P = 2^(S − lse) off by ~ulp(S), a systematic
/// relative error: masked key_mask, bf16, std 2 had dv at 1.44 × its bound on an
/// AVX512-BF16 machine without AMX.
inline Bf16Mode bf16_mode(bool bf16_ok, bool avx3) {
  if (!bf16_ok || !avx3) return Bf16Mode::off;
  if (amx_bf16_enabled()) return Bf16Mode::amx;
  if (avx512bf16_enabled()) return Bf16Mode::dpbf16;
  return Bf16Mode::off;
}

/// RoPE pairing (the values of SdpaRope): none, (i, i + D/2) or (2i, 2i + 1).
enum class RopePairs : uint8_t { none, half, interleaved };

/// RoPE of the rows of one operand: row r sits at position pos[r] (or r + offset
/// without pos); the tables (RopeTables) hold rows of D/2 angles from pos_min on.
struct Rope {
  RopePairs pairs = RopePairs::none;
  const float* cos_t = nullptr;
  const float* sin_t = nullptr;
  int64_t half = 0, pos_min = 0;
  const int32_t* pos = nullptr;
  int64_t offset = 0;
  bool on() const { return pairs != RopePairs::none; }
  int64_t table_row(int64_t r) const { return ((pos ? int64_t(pos[r]) : r + offset) - pos_min) * half; }
  const float* c(int64_t r) const { return cos_t + table_row(r); }
  const float* s(int64_t r) const { return sin_t + table_row(r); }
};

inline float load_elem(const float* x, int64_t i) { return x[i]; }
inline float load_elem(const bf16_t* x, int64_t i) { return to_float(x[i]); }
#if defined(ATTNBENCH_MUTANT_sdpa_f16_lossy)  // scripts/mutation-test.sh: f16 inputs widened through bf16
inline float load_elem(const f16_t* x, int64_t i) { return to_float(to_bf16(to_float(x[i]))); }
#else
inline float load_elem(const f16_t* x, int64_t i) { return to_float(x[i]); }
#endif

/// Rotates the RoPE pairs of x (D) by the angles with cosines c and sines s,
/// or by their negatives (`inverse`: the transpose, which carries gradients back).
inline void rotate_pairs(float* x, int64_t D, RopePairs pairs, const float* c, const float* s, bool inverse) {
  if (pairs == RopePairs::none) return;
  const int64_t half = D / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t ia = pairs == RopePairs::half ? i : 2 * i;
#if defined(ATTNBENCH_MUTANT_sdpa_rope_pair)  // scripts/mutation-test.sh: half pairs i with i + half + 1
    const int64_t ib = pairs == RopePairs::half ? (i + half + 1) % D : 2 * i + 1;
#else
    const int64_t ib = pairs == RopePairs::half ? i + half : 2 * i + 1;
#endif
    const float a = x[ia], b = x[ib], sn = sign * s[i];
    x[ia] = a * c[i] - b * sn;
    x[ib] = b * c[i] + a * sn;
  }
}

/// Reads row r of an operand (D elements of `in`) into f32, rotated (RoPE row r) and scaled.
template <class T>
void load_row(float* out, const T* in, int64_t D, const Rope& rope, int64_t r, float scale) {
  for (int64_t d = 0; d < D; ++d) out[d] = load_elem(in, d);
  if (rope.on()) rotate_pairs(out, D, rope.pairs, rope.c(r), rope.s(r), false);
  if (scale != 1.0f)
    for (int64_t d = 0; d < D; ++d) out[d] *= scale;
}

/// Floats of one thread's forward scratch (ForwardTile) for `rows` query rows,
/// score rows of s_ld and output rows of o_ld floats.
inline int64_t forward_tile_floats(int64_t rows, int64_t D, int64_t s_ld, int64_t o_ld) {
  const int64_t r16 = round_up(rows, 16);
  return round_up(rows * D, 16) + rows * s_ld + rows * o_ld + 3 * r16 + rows * kMaxLanes + r16;
}

/// Floats of PackKeyTile's `rows` buffer: 16 rows of D (keys) or Dv (values).
inline int64_t pack_rows_floats(int64_t D, int64_t Dv) { return 16 * round_up(std::max(D, Dv), 16); }

/// Floats of one forward thread's scratch: its tile (ForwardTile for `rows` rows,
/// `cols` keys, output rows of Dvp floats), 16 key rows for packing and, with the
/// native bf16 products, the raw bf16 query tile (dk = D rounded up to 32) and
/// AMX's three bf16 parts of P.
inline int64_t forward_thread_floats(int64_t rows, int64_t D, int64_t cols, int64_t Dvp, bool bf16) {
  const int64_t dk = round_up(D, 32);
  const int64_t b16 = bf16 ? round_up(rows * dk / 2, 16) + round_up(3 * rows * cols / 2, 16) : 0;
  return round_up(forward_tile_floats(rows, D, cols, Dvp), 16) + pack_rows_floats(D, Dvp) + b16;
}

/// Natural-log log-sum-exp of a row from its online-softmax state (base-2 max m,
/// sum l), rounded once (computed in double): −inf for a row without keys.
inline float row_lse(float m, float l) {
  return l > 0.0f ? float((double(m) + std::log2(double(l))) * 0.6931471805599453) : kNegInf;
}

/// The saved log-sum-exp in the backward's base-2 units as hi + lo (two floats,
/// so that s − hi − lo loses no more than the f32 lse itself: about 1e-6
/// relative in P at |lse| ≈ 10 with a single float); hi = +inf, lo = 0 for a
/// row without keys, so that 2^(s − lse2) is 0 for every score, masked or not.
inline void backward_lse2(float lse, float& hi, float& lo) {
  if (lse == kNegInf) {
    hi = std::numeric_limits<float>::infinity(), lo = 0.0f;
    return;
  }
  const double x = double(lse) * 1.4426950408889634;
  hi = float(x);
  lo = float(x - double(hi));
}

}  // namespace attnbench::cpu::attn
#endif  // ATTNBENCH_IMPLS_CPU_ATTENTION_SHARED_

// Per-target include guard.
#if defined(ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#undef ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#else
#define ATTNBENCH_IMPLS_CPU_ATTENTION_INL_H_
#endif

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace attn;

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
static_assert(hn::MaxLanes(DF()) <= size_t(kMaxLanes), "row-maxima scratch sized for 16 lanes");

/// Columns of one register block (a multiple of every tile width used here).
HWY_INLINE int64_t BlockCols(DF df) { return int64_t(kBlockVecs * hn::Lanes(df)); }

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

/// Exp2NonPositive to f32 rounding: the degree-7 Taylor polynomial (truncation
/// error 5e-9 relative instead of 1.2e-7). The backward's P has no normalization
/// to absorb a systematic error (the forward divides by the same sum), so it pays
/// the one extra FMA per score.
HWY_INLINE VF Exp2NonPositivePrecise(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  const auto underflow = hn::Lt(x, hn::Set(df, -126.0f));
  x = hn::Max(x, hn::Set(df, -126.0f));
  const VF n = hn::Round(x);
  const VF f = hn::Sub(x, n);
  VF p = hn::Set(df, 1.5252733804059841e-05f);  // ln(2)^7 / 7!
  p = hn::MulAdd(p, f, hn::Set(df, 1.5403530393381606e-04f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.3333558146428443e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 9.6181291076284772e-03f));
  p = hn::MulAdd(p, f, hn::Set(df, 5.5504108664821580e-02f));
  p = hn::MulAdd(p, f, hn::Set(df, 2.4022650695910071e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 6.9314718055994531e-01f));
  p = hn::MulAdd(p, f, hn::Set(df, 1.0f));
  const auto e = hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
  return hn::IfThenZeroElse(underflow, hn::Mul(p, hn::BitCast(df, e)));
}

/// s[r][j] = Σ_{d<D} q[r][d] · kt[d][j] for r < R, j < C·Lanes: one register
/// block. With kMax it also folds the block into the lane-wise running row
/// maxima rowmax[r] (overwritten when `first`), so the softmax needs no extra pass.
template <size_t R, size_t C, bool kMax>
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
    for (size_t c = 0; c < C; ++c) hn::Store(acc[r][c], df, s + r * s_stride + c * L);
    if constexpr (kMax) {
      VF mx = first ? acc[r][0] : hn::Max(acc[r][0], hn::Load(df, rowmax + r * L));
      for (size_t c = 1; c < C; ++c) mx = hn::Max(mx, acc[r][c]);
      hn::Store(mx, df, rowmax + r * L);
    }
  }
}

/// o[r][0:C·L] = alpha[r] · o[r][0:C·L] + Σ_{j<n} p[r][j] · v[j][0:C·L].
/// alpha null (the backward's accumulation over many tiles): the block's sum is
/// formed from zero and then added to o, so a long accumulation is a sum of
/// per-call partial sums (rounding grows with n + calls, not with their product).
template <size_t R, size_t C>
HWY_INLINE void AccumulateBlock(DF df, size_t n, const float* HWY_RESTRICT p, size_t p_stride,  // (R, n)
                                const float* HWY_RESTRICT v, size_t v_stride,                   // (n, C·L)
                                const float* HWY_RESTRICT alpha,                                // (R,) or null
                                float* HWY_RESTRICT o, size_t o_stride) {                       // (R, C·L)
  const size_t L = hn::Lanes(df);
  VF acc[R][C];
  for (size_t r = 0; r < R; ++r) {
    if (alpha) {
      const VF a = hn::Set(df, alpha[r]);
      for (size_t c = 0; c < C; ++c) acc[r][c] = hn::Mul(a, hn::Load(df, o + r * o_stride + c * L));
    } else {
      for (size_t c = 0; c < C; ++c) acc[r][c] = hn::Zero(df);
    }
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
    for (size_t c = 0; c < C; ++c) {
      float* at = o + r * o_stride + c * L;
      hn::Store(alpha ? acc[r][c] : hn::Add(acc[r][c], hn::Load(df, at)), df, at);
    }
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
template <bool kMax, size_t R = kBlockRows>
HWY_INLINE void ScoresBlockRows(DF df, size_t rows, size_t D, const float* HWY_RESTRICT q, size_t q_stride,
                                const float* HWY_RESTRICT kt, size_t kt_stride, float* HWY_RESTRICT s, size_t s_stride,
                                float* HWY_RESTRICT rowmax, bool first) {
  if constexpr (R > 1) {
    if (rows < R)
      return ScoresBlockRows<kMax, R - 1>(df, rows, D, q, q_stride, kt, kt_stride, s, s_stride, rowmax, first);
  }
  ScoresBlock<R, kBlockVecs, kMax>(df, D, q, q_stride, kt, kt_stride, s, s_stride, rowmax, first);
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

/// S[0:rows, 0:ncols] = Q·Kᵀ (q rows of D, kt packed (D, kt_stride), ncols a
/// multiple of BlockCols), optionally with the lane-wise row maxima in rowmax (rows, L).
template <bool kMax>
HWY_INLINE void TileProduct(DF df, int64_t rows, int64_t D, const float* q, int64_t q_stride, const float* kt,
                            int64_t kt_stride, int64_t ncols, float* s, int64_t s_stride, float* rowmax) {
  const int64_t L = int64_t(hn::Lanes(df)), kb = BlockCols(df);
  for (int64_t r0 = 0; r0 < rows; r0 += int64_t(kBlockRows))
    for (int64_t c0 = 0; c0 < ncols; c0 += kb)
      ScoresBlockRows<kMax>(df, size_t(std::min<int64_t>(int64_t(kBlockRows), rows - r0)), size_t(D),
                            q + r0 * q_stride, size_t(q_stride), kt + c0, size_t(kt_stride), s + r0 * s_stride + c0,
                            size_t(s_stride), kMax ? rowmax + r0 * L : nullptr, c0 == 0);
}

/// O[0:rows, 0:cols] (+)= P[0:rows, 0:n] · V[0:n, 0:cols], cols a multiple of the
/// lanes; alpha (rows,) rescales O first (null: plain accumulation).
HWY_INLINE void TileAccumulate(DF df, int64_t rows, int64_t cols, int64_t n, const float* p, int64_t p_stride,
                               const float* v, int64_t v_stride, const float* alpha, float* o, int64_t o_stride) {
  const int64_t L = int64_t(hn::Lanes(df)), kb = BlockCols(df);
  for (int64_t r0 = 0; r0 < rows; r0 += int64_t(kBlockRows))
    for (int64_t c0 = 0; c0 < cols; c0 += kb)
      AccumulateBlockRows(df, size_t(std::min<int64_t>(int64_t(kBlockRows), rows - r0)),
                          size_t(std::min<int64_t>(int64_t(kBlockVecs), (cols - c0) / L)), size_t(n),
                          p + r0 * p_stride, size_t(p_stride), v + c0, size_t(v_stride), alpha ? alpha + r0 : nullptr,
                          o + r0 * o_stride + c0, size_t(o_stride));
}

/// Online-softmax step for one row of a tile (scores in log2 units, n a multiple
/// of Lanes, masked entries −inf). `vmax` holds the lane-wise maxima of the row
/// (from ScoresBlock) or is null when masking changed the row (then it is
/// recomputed). Updates the running max m and sum l, turns s into unnormalized
/// probabilities 2^(s − m_new) and returns the factor alpha = 2^(m_old − m_new)
/// by which the row's output accumulator must be scaled. A row with no finite
/// score so far keeps m = −inf, l = 0 and gets p = 0 (never NaN). Masked
/// entries (and scores 126 binades below the max) get exactly 0: a clamped
/// 2^−126 there made P·V's first products subnormal (an accumulator starting at
/// 0), and every subnormal result costs a microcode assist: masked forwards
/// whose tiles are mostly partial ran up to 8× slower (window 64 at N 4096:
/// 42.5 → 4.9 ms; dense-masked 126 → 80 ms).
HWY_INLINE float OnlineSoftmaxRow(DF df, float* HWY_RESTRICT s, size_t n, const float* HWY_RESTRICT vmax, float& m,
                                  float& l) {
  const size_t L = hn::Lanes(df);
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
    const VF p = Exp2NonPositive(df, hn::Sub(hn::Load(df, s + j), vm));
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

// ---- Packing ----------------------------------------------------------------------

/// Where a key tile is packed; parts a kernel does not need are null.
struct KeyPack {
  float* kt = nullptr;     // (D, ld) rotated keys, transposed (score kernel operand)
  float* vt = nullptr;     // (Dv, ld) values, transposed (backward: dP = dO·Vᵀ)
  float* vrows = nullptr;  // (span, v_ld) values, Dv zero-padded to v_ld (forward: O += P·V)
  float* krows = nullptr;  // (padded, k_ld) rotated keys, D zero-padded (backward: dQ += dS·K)
  int64_t ld = 0, v_ld = 0, k_ld = 0;
};

/// Packs keys 0 … padded − 1 of a tile (key jt at k_row(jt) with D elements,
/// its value at v_row(jt) with Dv; keys jt ≥ span are zero, and have no value
/// row), key rows rotated with RoPE row rope_row0 + jt. Rows go through `rows`
/// (pack_rows_floats) in blocks of 16 so that the transposed stores fill whole
/// cache lines. `padded` is a multiple of 16.
template <class T, class KRow, class VRow>
void PackKeyTile(int64_t D, int64_t Dv, int64_t span, int64_t padded, const KRow& k_row, const VRow& v_row,
                 const Rope& rope, int64_t rope_row0, const KeyPack& out, float* rows) {
  constexpr int64_t kBlock = 16;
  for (int64_t jb = 0; jb < padded; jb += kBlock) {
    for (int64_t jj = 0; jj < kBlock; ++jj) {
      const int64_t jt = jb + jj;
      float* krow = rows + jj * D;
      if (jt < span)
        load_row(krow, k_row(jt), D, rope, rope_row0 + jt, 1.0f);
      else
        std::fill_n(krow, D, 0.0f);
      if (out.krows) {
        float* kr = out.krows + jt * out.k_ld;
        std::copy_n(krow, D, kr);
        std::fill(kr + D, kr + out.k_ld, 0.0f);
      }
      if (out.vrows && jt < span) {
        float* vr = out.vrows + jt * out.v_ld;
        const T* v = v_row(jt);
        for (int64_t d = 0; d < Dv; ++d) vr[d] = load_elem(v, d);
        std::fill(vr + Dv, vr + out.v_ld, 0.0f);
      }
    }
    if (out.kt)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t jj = 0; jj < kBlock; ++jj) out.kt[d * out.ld + jb + jj] = rows[jj * D + d];
    if (out.vt) {
      for (int64_t jj = 0; jj < kBlock; ++jj) {
        const int64_t jt = jb + jj;
        float* vrow = rows + jj * Dv;
        if (jt < span) {
          const T* v = v_row(jt);
          for (int64_t d = 0; d < Dv; ++d) vrow[d] = load_elem(v, d);
        } else {
          std::fill_n(vrow, Dv, 0.0f);
        }
      }
      for (int64_t d = 0; d < Dv; ++d)
        for (int64_t jj = 0; jj < kBlock; ++jj) out.vt[d * out.ld + jb + jj] = rows[jj * Dv + d];
    }
  }
}

// ---- Forward ----------------------------------------------------------------------

/// One thread's forward scratch for a tile of up to `rows` query rows.
struct ForwardTile {
  float* q;      // (rows, D)    rotated query rows × log2(e)/√D (base-2 scores)
  float* s;      // (rows, s_ld) scores, then probabilities
  float* o;      // (rows, o_ld) output accumulator (o_ld: Dv padded to 16)
  float* m;      // (rows,) running max (log2 units)
  float* l;      // (rows,) running sum
  float* alpha;  // (rows,) rescale factor of the current tile
  float* vmax;   // (rows, kMaxLanes) lane-wise row maxima of the current score tile
  bool* stale;   // (rows,) the row's vmax no longer holds (the mask or a score mod changed it)
  int64_t s_ld, o_ld;
  // Native bf16 products (mode not off; set by the kernel after carve): the raw
  // bf16 query rows (not rotated, not scaled: S is scaled by qscale after the
  // product, so nothing but the inputs is rounded to bf16), rows padded to 16
  // and D to dk (a multiple of 32) with zeros; pb: AMX's P·V scratch.
  Bf16Mode mode = Bf16Mode::off;
  uint16_t* qb = nullptr;  // (round_up(rows, 16), dk)
  uint16_t* pb = nullptr;  // 3 × (round_up(rows, 16), s_ld)
  int64_t dk = 0;
  float qscale = 1.0f;

  /// Carves the scratch (64-byte aligned, forward_tile_floats) for `rows` rows.
  static ForwardTile carve(float* at, int64_t rows, int64_t D, int64_t s_ld, int64_t o_ld) {
    const int64_t r16 = round_up(rows, 16);
    ForwardTile w;
    w.q = at;
    w.s = w.q + round_up(rows * D, 16);
    w.o = w.s + rows * s_ld;
    w.m = w.o + rows * o_ld;
    w.l = w.m + r16;
    w.alpha = w.l + r16;
    w.vmax = w.alpha + r16;
    w.stale = reinterpret_cast<bool*>(w.vmax + rows * kMaxLanes);
    w.s_ld = s_ld, w.o_ld = o_ld;
    return w;
  }
};

/// One key tile as the forward reads it: keys j0 … j0 + span − 1.
struct KeyTileView {
  int64_t j0, span;
  const float* kt;  // (D, kt_ld) packed rotated keys
  int64_t kt_ld;
  const float* v;  // (span, v_ld) value rows (packed, or f32 input read in place)
  int64_t v_ld;
  const uint16_t* kb = nullptr;  // bf16 modes: (dk/2, kt_ld, 2) key pairs along D
  const uint16_t* vb = nullptr;  // AMX mode: (kt_ld/2, o_ld, 2) value pairs along keys
};

/// Scores of a key tile for the `rows` query rows of w: w.s[r][0:ncols) with the
/// lane-wise maxima in w.vmax, −inf past the tile's span (those rows marked stale).
/// Returns ncols (the span rounded up to BlockCols).
HWY_INLINE int64_t ForwardScores(DF df, const ForwardTile& w, int64_t rows, int64_t D, const KeyTileView& t) {
  const int64_t ncols = round_up(t.span, BlockCols(df));
  if (w.mode == Bf16Mode::off) {
    TileProduct<true>(df, rows, D, w.q, D, t.kt, t.kt_ld, ncols, w.s, w.s_ld, w.vmax);
  } else {
    // Raw bf16 dot products (f32 accumulation), then × qscale and the lane-wise row maxima.
    if (w.mode == Bf16Mode::amx)
      bf16k::scores_amx(round_up(rows, 16), w.dk, w.qb, t.kb, t.kt_ld, ncols, w.s, w.s_ld);
    else
      bf16k::scores_dpbf16(rows, w.dk, w.qb, t.kb, t.kt_ld, ncols, w.s, w.s_ld);
    const int64_t L = int64_t(hn::Lanes(df));
    const VF scale = hn::Set(df, w.qscale);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = w.s + r * w.s_ld;
      VF mx = hn::Set(df, kNegInf);
      for (int64_t j = 0; j < ncols; j += L) {
        const VF x = hn::Mul(hn::Load(df, sr + j), scale);
        hn::Store(x, df, sr + j);
        mx = hn::Max(mx, x);
      }
      hn::Store(mx, df, w.vmax + r * L);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(w.s + r * w.s_ld + t.span, w.s + r * w.s_ld + ncols, kNegInf);
    w.stale[r] = t.span < ncols;
  }
  return ncols;
}

/// Attends the `rows` query rows in w.q to the key tiles that for_each_tile(f)
/// passes to f, in ascending key order: per tile S = Q·Kᵀ, then
/// mask(tile, ncols) (−inf where a row may not attend, score mods; it marks the
/// rows it changed in w.stale), the online softmax and O += P·V. Leaves the
/// unnormalized output and the softmax state in w for FinishRows.
template <class ForEachTile, class Mask>
HWY_INLINE void ForwardRows(DF df, const ForwardTile& w, int64_t rows, int64_t D, ForEachTile&& for_each_tile,
                            Mask&& mask) {
  const int64_t L = int64_t(hn::Lanes(df));
  for (int64_t r = 0; r < rows; ++r) w.m[r] = kNegInf, w.l[r] = 0.0f;
  // AMX works on 16-row blocks: the pad rows (zero queries, so zero P) stay zero.
  const int64_t rows16 = round_up(rows, 16);
  std::fill_n(w.o, (w.mode == Bf16Mode::amx ? rows16 : rows) * w.o_ld, 0.0f);
  if (w.mode == Bf16Mode::amx) std::fill(w.alpha + rows, w.alpha + rows16, 0.0f);
  for_each_tile([&](const KeyTileView& t) {
    const int64_t ncols = ForwardScores(df, w, rows, D, t);
    mask(t, ncols);
    for (int64_t r = 0; r < rows; ++r)
      w.alpha[r] = OnlineSoftmaxRow(df, w.s + r * w.s_ld, size_t(ncols), w.stale[r] ? nullptr : w.vmax + r * L,
                                    w.m[r], w.l[r]);
#if defined(ATTNBENCH_MUTANT_sdpa_p_bf16) || defined(ATTNBENCH_MUTANT_masked_p_bf16)
    // scripts/mutation-test.sh: probabilities rounded to bf16 before P·V (the script runs the bf16 cases only).
    for (int64_t x = 0; x < rows * w.s_ld; ++x) w.s[x] = to_float(to_bf16(w.s[x]));
#endif
    if (w.mode == Bf16Mode::amx)
      bf16k::accumulate_amx(rows16, ncols, w.s, w.s_ld, t.vb, w.o_ld, w.alpha, w.o, w.o_ld, w.pb);
    else
      TileAccumulate(df, rows, w.o_ld, t.span, w.s, w.s_ld, t.v, t.v_ld, w.alpha, w.o, w.o_ld);
  });
}

/// Writes row r's output o_row(r)[0:Dv] = O/l (0 for a row without keys) and, when
/// lse_row(r) is not null, its natural-log log-sum-exp.
template <class ORow, class LseRow>
HWY_INLINE void FinishRows(const ForwardTile& w, int64_t rows, int64_t Dv, ORow&& o_row, LseRow&& lse_row) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
    float* o = o_row(r);
    for (int64_t d = 0; d < Dv; ++d) o[d] = w.o[r * w.o_ld + d] * inv;
    if (float* lse = lse_row(r)) *lse = row_lse(w.m[r], w.l[r]);
  }
}

// ---- Backward ---------------------------------------------------------------------

/// The packed query side of one head (SDPA: of one kv head's query heads, rows
/// flattened): every row's operands for the backward, built once per call.
struct QuerySide {
  float* qs;     // (rows, D)  rotated queries × log2(e)/√D (the forward's base-2 scores)
  float* dout;   // (rows, Dv) the cotangent dO, widened
  float* qst;    // (D, ld)    qs transposed
  float* dot;    // (Dv, ld)   dout transposed
  float* lse2;   // (ld,)      saved log-sum-exp in log2 units, high part (+inf for a row without keys)
  float* lse2lo; // (ld,)      and its low part
  float* delta;  // (ld,)      Δ_i = Σ_d dO_id · O_id
  int64_t ld;    // rows rounded up to 16
};

/// Packs query row r of a query side: q (D elements, rotated with `rope` row r
/// and scaled by log2(e)/√D), the cotangent and the forward's output (Dv elements,
/// f32) and lse.
template <class T>
HWY_INLINE void PackQueryRow(const QuerySide& qs, int64_t r, int64_t D, int64_t Dv, const T* q, const T* dout,
                             const float* o, float lse, const Rope& rope, int64_t rope_row, float qscale) {
  load_row(qs.qs + r * D, q, D, rope, rope_row, qscale);
  float* dr = qs.dout + r * Dv;
  for (int64_t d = 0; d < Dv; ++d) dr[d] = load_elem(dout, d);
  // Δ = Σ_d dO·O as one MulAdd chain over d from zero: exactly the arithmetic by which
  // ScoresBlock forms each dP = dO·vᵀ. Where P sits on a single key, O = v (bitwise) and
  // dP − Δ must cancel; a lane-parallel sum left a few ulps of |dO|·|v| there, and a row with
  // one key got dq ≈ 1e-6 instead of 0 (sdpa N 1 in ci.json failed the rule on AVX2). The
  // chain costs Dv dependent FMAs per row, against the row's D·Nkv·8 of the backward.
  const hn::CappedTag<float, 1> d1;
  auto acc = hn::Zero(d1);
  for (int64_t d = 0; d < Dv; ++d) acc = hn::MulAdd(hn::Set(d1, dr[d]), hn::Set(d1, o[d]), acc);
  qs.delta[r] = hn::GetLane(acc);
  backward_lse2(lse, qs.lse2[r], qs.lse2lo[r]);
}

/// Transposes rows r0 … r1 − 1 of qs and dout into qst and dot (pad columns up
/// to ld zeroed by the call that covers the last row).
HWY_INLINE void TransposeQueryRows(const QuerySide& qs, int64_t D, int64_t Dv, int64_t r0, int64_t r1, int64_t rows) {
  auto transpose = [&](const float* in, float* out, int64_t cols) {
    for (int64_t d = 0; d < cols; ++d) {
      float* a = out + d * qs.ld;
      for (int64_t r = r0; r < r1; ++r) a[r] = in[r * cols + d];
      if (r1 == rows)
        for (int64_t r = rows; r < qs.ld; ++r) a[r] = 0.0f;
    }
  };
  transpose(qs.qs, qs.qst, D);
  transpose(qs.dout, qs.dot, Dv);
  if (r1 == rows)
    for (int64_t r = rows; r < qs.ld; ++r)
      qs.lse2[r] = std::numeric_limits<float>::infinity(), qs.lse2lo[r] = qs.delta[r] = 0.0f;
}

/// One key tile's packed operands and gradient accumulators (one thread's).
struct KeyTileGrads {
  float* kt;     // (D, ld)  rotated keys, transposed
  float* vt;     // (Dv, ld) values, transposed
  float* krows;  // (ld, Dp) rotated keys
  float* dkt;    // (D, ld)  Σ Qsᵀ·dS (dK·√D·ln2 after the pass, transposed)
  float* dvt;    // (Dv, ld) Σ dOᵀ·P (dV, transposed)
  int64_t ld, Dp;
  KeyPack pack() const {
    KeyPack k;
    k.kt = kt, k.vt = vt, k.krows = krows, k.ld = ld, k.k_ld = Dp;
    return k;
  }
};

/// One thread's probability and score-gradient tiles (rows, ld).
struct PairTiles {
  float* p;     // scores, then P
  float* ds;    // dP, then dS
  float* dmod;  // a score mod's derivative (softcap), or null
  int64_t ld;
};

/// FlashAttention-2's backward on one pair: query rows r0 … r0 + rows − 1 of qs
/// against key tile kg (keys 0 … span − 1 of the tile):
///   S  = Qs·Kᵀ (base 2);  mask(p, ncols, dmod): −inf where not allowed, score
///        mods (writing their derivative to dmod when it is not null)
///   P  = 2^(S − lse2)            (the forward's probabilities, recomputed: S is
///                                 bitwise the forward's, same operands and kernel)
///   dP = dO·Vᵀ;  dS = P ∘ (dP − Δ) [∘ dmod]
///   dVᵀ += dOᵀ·P;  dKᵀ += Qsᵀ·dS;  dQ[r0…] += dS·K   (dq: (·, Dp) rows of this query side)
/// Scales (1/√D, ln 2) are applied when the gradients are stored.
template <class Mask>
HWY_INLINE void BackwardPair(DF df, int64_t D, int64_t Dv, const QuerySide& qs, float* dq, int64_t r0, int64_t rows,
                             int64_t span, const KeyTileGrads& kg, const PairTiles& w, Mask&& mask) {
  const int64_t L = int64_t(hn::Lanes(df));
  const int64_t ncols = round_up(span, BlockCols(df));
  TileProduct<false>(df, rows, D, qs.qs + r0 * D, D, kg.kt, kg.ld, ncols, w.p, w.ld, nullptr);
  mask(w.p, ncols, w.dmod);
  TileProduct<false>(df, rows, Dv, qs.dout + r0 * Dv, Dv, kg.vt, kg.ld, ncols, w.ds, w.ld, nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    const VF lse = hn::Set(df, qs.lse2[r0 + r]), lse_lo = hn::Set(df, qs.lse2lo[r0 + r]);
    const VF delta = hn::Set(df, qs.delta[r0 + r]);
    float* p = w.p + r * w.ld;
    float* ds = w.ds + r * w.ld;
    const float* dm = w.dmod ? w.dmod + r * w.ld : nullptr;
    for (int64_t j = 0; j < ncols; j += L) {
      const VF pj = Exp2NonPositivePrecise(df, hn::Sub(hn::Sub(hn::Load(df, p + j), lse), lse_lo));
      VF g = hn::Mul(pj, hn::Sub(hn::Load(df, ds + j), delta));
      if (dm) g = hn::Mul(g, hn::Load(df, dm + j));
      hn::Store(pj, df, p + j);
      hn::Store(g, df, ds + j);
    }
  }
  TileAccumulate(df, Dv, ncols, rows, qs.dot + r0, qs.ld, w.p, w.ld, nullptr, kg.dvt, kg.ld);
  TileAccumulate(df, D, ncols, rows, qs.qst + r0, qs.ld, w.ds, w.ld, nullptr, kg.dkt, kg.ld);
  TileAccumulate(df, rows, kg.Dp, span, w.ds, w.ld, kg.krows, kg.Dp, nullptr, dq + r0 * kg.Dp, kg.Dp);
}

/// Stores the gradients of keys 0 … span − 1 of a key tile: dk_row(jt) = ln2 ·
/// dKᵀ column jt rotated back by RoPE row rope_row0 + jt (the forward scaled
/// the queries by log2(e)/√D), dv_row(jt)[0:Dv] = dVᵀ column jt.
template <class DkRow, class DvRow>
HWY_INLINE void StoreKeyGrads(const KeyTileGrads& kg, int64_t D, int64_t Dv, int64_t span, const Rope& rope,
                              int64_t rope_row0, DkRow&& dk_row, DvRow&& dv_row) {
  for (int64_t jt = 0; jt < span; ++jt) {
    float* dk = dk_row(jt);
    float* dv = dv_row(jt);
    for (int64_t d = 0; d < D; ++d) dk[d] = kLn2 * kg.dkt[d * kg.ld + jt];
    for (int64_t d = 0; d < Dv; ++d) dv[d] = kg.dvt[d * kg.ld + jt];
    if (rope.on()) rotate_pairs(dk, D, rope.pairs, rope.c(rope_row0 + jt), rope.s(rope_row0 + jt), true);
  }
}

/// dq_out[0:D] = scale · Σ_{s<splits} acc[s·split_stride + 0:D], rotated back by RoPE row rope_row.
HWY_INLINE void StoreQueryGrad(float* dq_out, const float* acc, int64_t splits, int64_t split_stride, int64_t D,
                               float scale, const Rope& rope, int64_t rope_row) {
  for (int64_t d = 0; d < D; ++d) {
    float x = acc[d];
    for (int64_t s = 1; s < splits; ++s) x += acc[s * split_stride + d];
    dq_out[d] = scale * x;
  }
  if (rope.on()) rotate_pairs(dq_out, D, rope.pairs, rope.c(rope_row), rope.s(rope_row), true);
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
