// Scaled-dot-product attention, fused CPU forward (DESIGN §5 "SDPA").
//
//   q: (B, H, Nq, D)   k, v: (B, Hkv, Nkv, D)   kv_len: (B,)   head h reads kv head h/(H/Hkv)
//   o_i = Σ_j softmax_j(RoPE(q_i)·RoPE(k_j)/√D + mask_ij) v_j            o: (B, H, Nq, D) f32
//   mask_ij = 0 if j < lim_i else −inf,  lim_i = min(kv_len[b], causal ? i + Nkv − Nq + 1 : Nkv)
//   weights (need_weights): the probabilities, (B, H, Nq, Nkv) f32
//
// Every row's allowed keys are a prefix [0, lim_i) (causal aligned bottom-right
// and key padding both cut the row), so a (query tile, key tile) pair is either
// full, partial (mask the row tails) or empty (skipped; all later tiles too).
//
// Algorithm (FlashAttention's, on CPU): pack K once per kv head, transposed to
// (D, 256-key tiles) with RoPE applied, and V to (Nkv, D padded to 16) in f32
// (f32 V with D a multiple of 16 is read in place); then OpenMP over (b, kv
// head, tile of 48 rows of its H/Hkv query heads, ordered (query, head) so the
// GQA heads share every K/V tile): load the query rows (RoPE, times log2(e)/√D
// so the softmax works in base 2), and for each key tile
//   S = Q·Kᵀ (6×64 register blocks) → mask → online softmax (running max m,
//   sum l, P = 2^(S−m), O *= 2^(m_old−m_new)) → O += P·V (6×64 register blocks).
// Finally O /= l (0 for a row without keys). need_weights recomputes S in a
// second pass and writes 2^(S−m)/l. bf16 inputs are widened to f32 while
// packing (q, k, v are read once), so the inner loops are the f32 ones.
// Never materializes (Nq, Nkv) beyond one 48×256 tile per thread.
//
// Strategies, f32 B=1 H=8 N=4096 D=64 non-causal, 2 Zen 4 cores, quiet machine.
// GFLOP/s = 4·B·H·N²·D / wall time; "% FMA" is of this machine's measured zmm
// FMA throughput (`attnbench roofline`: 234 GFLOP/s for both cores; one 512-bit
// FMA per cycle per core; DESIGN's "≈ 400" assumes two):
//
// | strategy                                                      | GFLOP/s | % FMA |
// |---------------------------------------------------------------|---------|-------|
// | Eigen reference in f32 (materialized S per head, scalar exp)  |     9.6 |     4 |
// | fused: 48×128 tiles, 6×64 register blocks, degree-7 exp2      |     189 |    81 |
// | 48×256 tiles (fewer per-tile row reductions; 24/96 × 128–512  |         |       |
// |   all within ±2 %, cpu-time measured under load)              |     197 |    84 |
// | K packed in 16-key blocks, f32 V read in place (decode, pack) |     197 |    84 |
// | row max folded into the QK kernel, degree-6 exp2, no select   |     200 |    85 |
//
// Causal (N(N+1)/2 pairs): 185–194 GFLOP/s. bf16 (widened while packing): same
// as f32 within noise. What is left is the softmax: ~18 vector ops per 16 scores
// against 128 FMAs at D = 64. The last row block of a tile uses 1..5-row
// register blocks instead of zero-padded rows (decode Nq = 1, H 32, Hkv 8,
// Nkv 8192, D 128: 1.7× less CPU time), and a task holds the rows of all H/Hkv
// query heads of its kv head (that decode: 10.6 → 7.9 ms). Not done: decode is
// now bound by packing K (transposed, 8 MB); reading K in place with dot
// products along D for small Nq·H/Hkv would remove that.

#include "impls/cpu/sdpa.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/sdpa.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "impls/cpu/attention-inl.h"

// Target-independent shapes and scalar helpers (compiled once).
#ifndef ATTNBENCH_IMPLS_CPU_SDPA_SHARED_
#define ATTNBENCH_IMPLS_CPU_SDPA_SHARED_
namespace attnbench::cpu::sdpa_detail {

inline constexpr int64_t kTileQ = 48;     // query rows per task (multiple of every kBlockRows)
inline constexpr int64_t kTileK = 256;    // keys per tile (multiple of every key block)
inline constexpr int64_t kMaxLanes = 16;  // f32 lanes of the widest x86 target (AVX-512)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Sizes of the packed operands and per-thread tiles, in floats.
struct Layout {
  int64_t Dp, T, Nkv_p, pos_min, n_pos, half;
  int64_t kpack, vpack, rope, per_thread;
  bool direct_v;  // f32 V with D a multiple of 16 is read in place, not packed
  explicit Layout(const SdpaParams& p) {
    Dp = round_up(p.D, 16);
    direct_v = p.dtype == DType::f32 && Dp == p.D;
    T = (p.Nkv + kTileK - 1) / kTileK;
    Nkv_p = T * kTileK;
    pos_min = std::min<int64_t>(0, p.Nkv - p.Nq);
    n_pos = p.Nkv - pos_min;
    half = p.D / 2;
    kpack = p.B * p.Hkv * T * p.D * kTileK;
    vpack = direct_v ? 0 : p.B * p.Hkv * Nkv_p * Dp;
    rope = p.rope == SdpaRope::none ? 0 : round_up(2 * n_pos * half, 16);
    // q tile (kTileQ, D), scores (kTileQ, kTileK), o (kTileQ, Dp), m, l, alpha, 16 key rows,
    // lane-wise row maxima.
    per_thread = round_up(kTileQ * p.D, 16) + kTileQ * kTileK + kTileQ * Dp + 3 * round_up(kTileQ, 16) +
                 16 * round_up(p.D, 16) + kTileQ * kMaxLanes;
  }
};

inline float load_elem(const float* x, int64_t i) { return x[i]; }
inline float load_elem(const bf16_t* x, int64_t i) { return to_float(x[i]); }

/// Reads one row of D elements into f32 and applies RoPE at table row (c, s).
template <class T>
void load_row_rotated(float* out, const T* in, int64_t D, SdpaRope rope, const float* c, const float* s) {
  for (int64_t d = 0; d < D; ++d) out[d] = load_elem(in, d);
  if (rope == SdpaRope::none) return;
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t ia = rope == SdpaRope::half ? i : 2 * i;
#if defined(ATTNBENCH_MUTANT_sdpa_rope_pair)  // scripts/mutation-test.sh: half pairs i with i + half + 1
    const int64_t ib = rope == SdpaRope::half ? (i + half + 1) % D : 2 * i + 1;
#else
    const int64_t ib = rope == SdpaRope::half ? i + half : 2 * i + 1;
#endif
    const float a = out[ia], b = out[ib];
    out[ia] = a * c[i] - b * s[i];
    out[ib] = b * c[i] + a * s[i];
  }
}

/// Keys visible to query row i of batch b: [0, lim).
inline int64_t row_limit(const SdpaParams& p, int64_t b, int64_t i) {
  int64_t lim = p.kv_len ? std::clamp<int64_t>(p.kv_len[b], 0, p.Nkv) : p.Nkv;
  if (p.causal) lim = std::min(lim, std::max<int64_t>(0, i + p.Nkv - p.Nq + 1));
  return lim;
}

}  // namespace attnbench::cpu::sdpa_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace sdpa_detail;
static_assert(hn::MaxLanes(DF()) <= size_t(kMaxLanes), "row-maxima scratch sized for 16 lanes");

/// Scratch of one thread.
struct ThreadTiles {
  float* q;      // (kTileQ, D)   rotated, scaled query tile
  float* s;      // (kTileQ, kTileK) scores, then probabilities
  float* o;      // (kTileQ, Dp)  output accumulator
  float* m;      // (kTileQ,) running max (log2 units)
  float* l;      // (kTileQ,) running sum
  float* alpha;  // (kTileQ,) rescale factor of the current tile
  float* rows;   // (16, D) rotated key rows (packing)
  float* vmax;   // (kTileQ, 16) lane-wise row maxima of the current score tile
};

/// S[0:rows, 0:ncols] = Q·Kᵀ for key tile `kt` (D, kTileK) with the lane-wise
/// row maxima in w.vmax, then −inf where j ≥ lim_r. masked[r]: row r lost entries
/// to the mask (its w.vmax is stale).
HWY_INLINE void TileScores(DF df, const ThreadTiles& w, int64_t rows, int64_t D, const float* HWY_RESTRICT kt,
                           int64_t ncols, int64_t j0, const int64_t* lim, bool* masked) {
  const int64_t L = int64_t(hn::Lanes(df)), kb = int64_t(kBlockVecs) * L;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows)
    for (int64_t c0 = 0; c0 < ncols; c0 += kb)
      ScoresBlockRows(df, size_t(std::min<int64_t>(kBlockRows, rows - r0)), size_t(D), w.q + r0 * D, size_t(D), kt + c0,
                      kTileK, w.s + r0 * kTileK + c0, kTileK, w.vmax + r0 * L, c0 == 0);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* s = w.s + r * kTileK;
    const int64_t start = std::clamp<int64_t>(lim[r] - j0, 0, ncols);
    masked[r] = start < ncols;
    for (int64_t j = start; j < ncols; ++j) s[j] = kNegInf;
  }
}

/// Packs key tile t of kv head (b, hk): K rotated and transposed to (D, kTileK),
/// V widened to (kTileK, Dp); keys ≥ Nkv and dims ≥ D are zero. Keys go through
/// `rows` (16, D) in blocks of 16 so that the transposed stores fill whole cache lines.
template <class T>
void PackKV(const SdpaParams& p, const Layout& lay, const float* cos_t, const float* sin_t, float* kpack, float* vpack,
            float* rows, int64_t task) {
  constexpr int64_t kBlock = 16;
  const int64_t t = task % lay.T, bk = task / lay.T, b = bk / p.Hkv, hk = bk % p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  float* kt = kpack + (bk * lay.T + t) * p.D * kTileK;         // (D, kTileK)
  float* vt = vpack + (bk * lay.Nkv_p + t * kTileK) * lay.Dp;  // (kTileK, Dp), unused with direct_v
  for (int64_t jb = 0; jb < kTileK; jb += kBlock) {
    for (int64_t jj = 0; jj < kBlock; ++jj) {
      const int64_t j = t * kTileK + jb + jj;
      float* krow = rows + jj * p.D;
      float* vrow = vt + (jb + jj) * lay.Dp;
      if (j < p.Nkv) {
        const int64_t ti = (j - lay.pos_min) * lay.half;
        load_row_rotated(krow, k + j * p.k_strides.n, p.D, p.rope, cos_t + ti, sin_t + ti);
        if (lay.direct_v) continue;
        for (int64_t d = 0; d < p.D; ++d) vrow[d] = load_elem(v + j * p.v_strides.n, d);
        std::fill(vrow + p.D, vrow + lay.Dp, 0.0f);
      } else {
        std::fill_n(krow, p.D, 0.0f);
        if (!lay.direct_v) std::fill_n(vrow, lay.Dp, 0.0f);
      }
    }
    for (int64_t d = 0; d < p.D; ++d)
      for (int64_t jj = 0; jj < kBlock; ++jj) kt[d * kTileK + jb + jj] = rows[jj * p.D + d];
  }
}

/// Writes the weights rows of the tile (row r to w_rows[r]): 2^(S − m)/l, 0 where masked.
HWY_INLINE void WeightsPass(DF df, const SdpaParams& p, const Layout& lay, const ThreadTiles& w, const float* kt_head,
                            float* const* w_rows, int64_t rows, const int64_t* lim, int64_t hi) {
  const int64_t L = int64_t(hn::Lanes(df)), kb = int64_t(kBlockVecs) * L;
  for (int64_t t = 0; t < lay.T; ++t) {
    const int64_t j0 = t * kTileK, width = std::min(kTileK, p.Nkv - j0);
    if (j0 >= hi) {
      for (int64_t r = 0; r < rows; ++r) std::fill_n(w_rows[r] + j0, width, 0.0f);
      continue;
    }
    const int64_t ncols = round_up(std::min(kTileK, hi - j0), kb);
    bool masked[kTileQ];
    TileScores(df, w, rows, p.D, kt_head + t * p.D * kTileK, ncols, j0, lim, masked);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s + r * kTileK;
      float* out = w_rows[r] + j0;
      if (w.l[r] == 0.0f) {
        std::fill_n(out, width, 0.0f);
        continue;
      }
      const auto vm = hn::Set(df, w.m[r]);
      const auto inv = hn::Set(df, 1.0f / w.l[r]);
      for (int64_t j = 0; j < ncols; j += L)
        hn::Store(hn::Mul(Exp2NonPositive(df, hn::Sub(hn::Load(df, s + j), vm)), inv), df, s + j);
      const int64_t n = std::min(width, ncols);
      std::memcpy(out, s, size_t(n) * sizeof(float));
      std::fill_n(out + n, width - n, 0.0f);
    }
  }
}

/// Number of query tiles of one kv head: its H/Hkv query heads are attended
/// together, rows ordered (query i, head) so that a tile's row limits are close.
inline int64_t query_tiles(const SdpaParams& p) { return (p.Nq * (p.H / p.Hkv) + kTileQ - 1) / kTileQ; }

/// One task: query tile qt of kv head (b, hk), i.e. flat rows f ∈ [qt·kTileQ, …)
/// with f = i·G + g for query i of head hk·G + g (G = H/Hkv). Grouping the
/// query heads that share K and V reads each key tile once per tile of rows.
template <class T>
void AttendQueryTile(const SdpaParams& p, const Layout& lay, const float* cos_t, const float* sin_t, const float* kpack,
                     const float* vpack, const ThreadTiles& w, int64_t task) {
  const DF df;
  const int64_t L = int64_t(hn::Lanes(df)), kb = int64_t(kBlockVecs) * L;
  const int64_t G = p.H / p.Hkv, n_qt = query_tiles(p);
  const int64_t qt = task % n_qt, bk = task / n_qt, b = bk / p.Hkv, hk = bk % p.Hkv;
  const int64_t f0 = qt * kTileQ, rows = std::min(kTileQ, p.Nq * G - f0);
#if defined(ATTNBENCH_MUTANT_sdpa_scale_bf16)  // scripts/mutation-test.sh: scale off by 1e-3, bf16 only
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)) * (std::is_same_v<T, bf16_t> ? 1.001 : 1.0));
#else
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));
#endif

  // Query tile: rotate, scale into log2 units; output (and weights) row pointers.
  int64_t lim[kTileQ];
  float* o_rows[kTileQ];
  float* w_rows[kTileQ];
  int64_t hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (f0 + r) / G, h = hk * G + (f0 + r) % G;
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h + i * p.q_strides.n;
    o_rows[r] = p.o + b * p.o_strides.b + h * p.o_strides.h + i * p.o_strides.n;
    w_rows[r] = p.weights ? p.weights + b * p.w_strides.b + h * p.w_strides.h + i * p.w_strides.n : nullptr;
    float* qr = w.q + r * p.D;
    const int64_t ti = (i + p.Nkv - p.Nq - lay.pos_min) * lay.half;
    load_row_rotated(qr, q, p.D, p.rope, cos_t + ti, sin_t + ti);
    for (int64_t d = 0; d < p.D; ++d) qr[d] *= qscale;
    lim[r] = row_limit(p, b, i);
#if defined(ATTNBENCH_MUTANT_sdpa_drop_key)  // scripts/mutation-test.sh: the last visible key is dropped
    lim[r] = std::max<int64_t>(0, lim[r] - 1);
#endif
    hi = std::max(hi, lim[r]);
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.0f;
  }
  std::fill_n(w.o, rows * lay.Dp, 0.0f);

  const float* kt_head = kpack + bk * lay.T * p.D * kTileK;
  // V rows: packed (Nkv_p, Dp), or the f32 input itself (rows ≥ lim are never read).
  const float* v_head = vpack + bk * lay.Nkv_p * lay.Dp;
  int64_t v_stride = lay.Dp;
  if (lay.direct_v) {
    v_head = static_cast<const float*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
    v_stride = p.v_strides.n;
  }
  for (int64_t j0 = 0; j0 < hi; j0 += kTileK) {
    const int64_t span = std::min(kTileK, hi - j0), ncols = round_up(span, kb);
    bool masked[kTileQ];
    TileScores(df, w, rows, p.D, kt_head + (j0 / kTileK) * p.D * kTileK, ncols, j0, lim, masked);
    for (int64_t r = 0; r < rows; ++r)
      w.alpha[r] =
          OnlineSoftmaxRow(df, w.s + r * kTileK, size_t(ncols), masked[r] ? nullptr : w.vmax + r * L, w.m[r], w.l[r]);
#if defined(ATTNBENCH_MUTANT_sdpa_p_bf16)  // scripts/mutation-test.sh: probabilities rounded to bf16 before P·V
    if constexpr (std::is_same_v<T, bf16_t>)
      for (int64_t x = 0; x < rows * kTileK; ++x) w.s[x] = to_float(to_bf16(w.s[x]));
#endif
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows)
      for (int64_t c0 = 0; c0 < lay.Dp; c0 += kb)
        AccumulateBlockRows(df, size_t(std::min<int64_t>(kBlockRows, rows - r0)), size_t((lay.Dp - c0) / L),
                            size_t(span), w.s + r0 * kTileK, kTileK, v_head + j0 * v_stride + c0, size_t(v_stride),
                            w.alpha + r0, w.o + r0 * lay.Dp + c0, size_t(lay.Dp));
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
    for (int64_t d = 0; d < p.D; ++d) o_rows[r][d] = w.o[r * lay.Dp + d] * inv;
  }
  if (p.weights) WeightsPass(df, p, lay, w, kt_head, w_rows, rows, lim, hi);
}

template <class T>
void ForwardTyped(const SdpaParams& p, float* scratch, int threads) {
  const Layout lay(p);
  float* kpack = scratch;
  float* vpack = kpack + lay.kpack;
  float* cos_t = lay.rope ? vpack + lay.vpack : nullptr;
  float* sin_t = lay.rope ? cos_t + lay.n_pos * lay.half : nullptr;
  float* slabs = vpack + lay.vpack + lay.rope;

  if (lay.rope) RopeTables(lay.pos_min, lay.n_pos, p.D, cos_t, sin_t, threads);

  const int64_t n_qt = query_tiles(p);
#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + lay.per_thread * omp_get_thread_num();
    ThreadTiles w;
    w.q = slab;
    w.s = w.q + round_up(kTileQ * p.D, 16);
    w.o = w.s + kTileQ * kTileK;
    w.m = w.o + kTileQ * lay.Dp;
    w.l = w.m + round_up(kTileQ, 16);
    w.alpha = w.l + round_up(kTileQ, 16);
    w.rows = w.alpha + round_up(kTileQ, 16);
    w.vmax = w.rows + 16 * round_up(p.D, 16);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.B * p.Hkv * lay.T; ++task)
      PackKV<T>(p, lay, cos_t, sin_t, kpack, vpack, w.rows, task);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * p.Hkv * n_qt; ++task)
      AttendQueryTile<T>(p, lay, cos_t, sin_t, kpack, vpack, w, task);
  }
}

void SdpaForward(const SdpaParams& p, float* scratch, int threads) {
  if (p.dtype == DType::bf16)
    ForwardTyped<bf16_t>(p, scratch, threads);
  else
    ForwardTyped<float>(p, scratch, threads);
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(SdpaForward);

size_t sdpa_forward_fused_scratch_bytes(const SdpaParams& p, int threads) {
  const sdpa_detail::Layout lay(p);
  return size_t(lay.kpack + lay.vpack + lay.rope + lay.per_thread * std::max(1, threads)) * sizeof(float);
}

void sdpa_forward_fused(const SdpaParams& p, void* scratch, int threads) {
  if (p.dtype != DType::f32 && p.dtype != DType::bf16)
    throw std::invalid_argument("sdpa_forward_fused: q, k, v must be f32 or bf16");
  if (p.rope != SdpaRope::none && p.D % 2 != 0) throw std::invalid_argument("sdpa_forward_fused: RoPE needs an even D");
  if (p.Hkv < 1 || p.H % p.Hkv != 0) throw std::invalid_argument("sdpa_forward_fused: H must be a multiple of Hkv");
  HWY_DYNAMIC_DISPATCH(SdpaForward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

}  // namespace attnbench::cpu
#endif
