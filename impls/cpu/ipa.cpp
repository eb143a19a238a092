// Invariant Point Attention, fused CPU forward (AlphaFold2 Alg. 22, OpenFold monomer).
//
//   s (N, c_s), z (N, N, c_z), frames T_i = (R_i, t_i), mask m (N)  →  out (N, c_s)
//   logit_ij^h = α q_i·k_j + β b_ij^h − ½ γ_h Σ_p ‖T_i q_ip − T_j k_jp‖² + inf · m_i (m_j − 1)
//   a_ij^h = softmax_j(logit_ij^h),  b_ij = linear_b(z_ij)
//   o_i = Σ_j a_ij v_j,  o_pt_i = T_i⁻¹ Σ_j a_ij T_j v_jp,  o_pair_i = Σ_j a_ij z_ij
//   out = linear_out(concat[o, o_pt x|y|z, sqrt(‖o_pt‖² + 1e-8), o_pair])
// (α = sqrt(1/(3c)), β = sqrt(1/3), γ_h = softplus(w_h)·sqrt(1/(3·P·9/2)); see reference/ipa.hpp.)
//
// Plan: the O(N) projections run once as register-blocked GEMMs (Highway); keys are packed
// transposed per head so logits vectorize over keys; then every query row i streams over key
// tiles of kTile keys with an online softmax. Per tile: the pair bias b_ij is computed from the
// z tile (which then stays in L1/L2), the logits combine the scalar, point-distance, bias and
// mask terms, and the tile's probabilities accumulate the scalar/point values and the pair
// output Σ_j a_ij z_ij (H × c_z per pair, register-blocked 6 heads × 4 vectors on AVX-512 so
// each z vector is loaded once per 6 FMAs). z is read from memory exactly once; nothing of size
// N² is allocated. Points are computed relative to the centroid of the translations, which
// leaves the function unchanged (a global translation) and keeps the f32 error independent
// of where the structure sits in space.
//
// Strategies, in the order tried (AF2 dims, N = 512, f32, one thread, process CPU time of one
// forward; the machine was shared with other builds, so ±15 %):
//   | strategy                                                          | time    | effect        |
//   |-------------------------------------------------------------------|---------|---------------|
//   | reference (Eigen, everything materialized, float)                 | 430 ms  | baseline      |
//   | fused: per-row online softmax; pair bias as 12 dot products with  | ~70 ms  | 6×; perf: the |
//   |   horizontal sums per pair; pair output 4 heads × 1 vector        |         | sums dominate |
//   | pair bias as a GEMM vectorized over heads (no horizontal sums);   | 61 ms   | −13 %         |
//   |   pair output 6 heads × 4 vectors (AVX-512), values (H, N, ·)      |         |               |
//   | independent FMA chains: 4 key vectors per logit block, 4 partial  | 60 ms   | within noise; |
//   |   sums for the values, 8 z rows per bias block                    |         | perf showed   |
//   |                                                                   |         | latency-bound |
//   |                                                                   |         | chains before |
//   | blocks of 8 query rows share each key/value tile (K, V for all    | N = 2048, | −26 %         |
//   |   keys are ~15 MB at N = 4096: streamed from L3 for every row)     | 2 threads:|               |
//   |                                                                   | 1.97→1.45s|               |
//   | linear layers as packed-panel GEMMs (broadcast x, no horizontal | 63 ms   | no gain, 4×   |
//   |   sums) instead of dot-product blocks                             |         | larger error: |
//   |                                                                   |         | reverted      |
// Where the time goes now (perf, N = 512): pair bias ≈ 45 % and pair output ≈ 25 % of the attention
// loop (the two c_z·H products per pair, 3 072 MACs), the linear layers ≈ 20 % of the total.
// With 2 threads in `attnbench run` (quiet machine): reference 349 ms, fused 31.0 ms (f32,
// 11.3×, 46 % of the measured FMA peak) / 29.8 ms (bf16 z); N = 4096: 1.71 s / 1.45 s.
// Commands in docs/ipa.md.

#include "impls/cpu/ipa.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "harness/dtype.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_IPA_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_IPA_LAYOUT_
namespace attnbench::cpu_ipa {

inline constexpr int64_t kTile = 64;     // keys per tile: a multiple of every lane count
inline constexpr int64_t kRowBlock = 8;  // query rows sharing each key/value tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions; every region starts 64-byte aligned.
struct Layout {
  int64_t Np, Wv, Hp, F, raw_ld;
  int64_t raw, qs, qp, kt, kpt, vv, mneg, wb, bb, gamma, tc, slab, total;
  int64_t work_lg, work_bias, work_zf, work_state, row_state, zrow, per_thread;  // within a thread's slab
  /// rank > 0: z comes as rank-`rank` factors and each thread materializes one row z_i (N, c_z).
  Layout(const ipa::IpaShape& d, int threads, int64_t rank) {
    const int64_t H = d.H;
    Np = round_up(d.N, kTile);
    Wv = round_up(d.value_dim(), 16);
    Hp = round_up(H, 16);
    F = d.concat_dim();
    raw_ld = std::max(3 * H * d.c + 3 * H * d.P + 3 * H * (d.P + d.Pv), F);
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    raw = take(d.N * raw_ld);          // projections, then the concatenation (N, F)
    qs = take(d.N * H * d.c);          // α q         (N, H, c)
    qp = take(d.N * H * d.P * 3);      // query points (N, H, P, 3), global, centred
    kt = take(H * d.c * Np);           // keys        (H, c, Np)
    kpt = take(H * d.P * 3 * Np);      // key points  (H, P, 3, Np), global, centred
    vv = take(H * Np * Wv);            // values      (H, Np, Wv): c scalars, then P_v points xyz
    mneg = take(Np);                   // inf · (m_j − 1)
    wb = take(d.c_z * Hp);             // β W_bᵀ      (c_z, Hp), heads padded with zeros
    bb = take(H);                      // β b_b
    gamma = take(H);                   // −½ γ_h
    tc = take(d.N * 3);                // t_i − centroid
    // Per thread: the tile's work arrays, then the state of kRowBlock query rows, then (with
    // factors) kRowBlock materialized rows of z.
    work_lg = 0;
    work_bias = round_up(H * kTile, 16);
    work_zf = work_bias + round_up(kTile * Hp, 16);
    work_state = work_zf + round_up(kTile * d.c_z, 16);
    row_state = round_up(H * Wv, 16) + round_up(H * d.c_z, 16) + round_up(2 * H, 16);
    zrow = work_state + kRowBlock * row_state;
    per_thread = zrow + (rank > 0 ? kRowBlock * round_up(d.N * d.c_z, 16) : 0);
    slab = take(per_thread * threads);
    total = at;
  }
};

/// Everything the per-row kernel reads.
struct AttendArgs {
  const ipa::IpaShape* d;
  const Layout* lay;
  const float* scratch;  // base of the scratch (read-only regions)
  float* slabs;          // per-thread slabs
  float* feat;           // (N, F)
  const void* z;          // (N, N, c_z), or null with factors:
  const float* f1;        // (N, rank, c_z)  z_ij = Σ_r f1[i, r] ⊙ f2[j, r]
  const float* f2;        // (N, rank, c_z)
  int64_t rank;
  const float* rot;
  const float* mask;
};

}  // namespace attnbench::cpu_ipa
#endif  // ATTNBENCH_IMPLS_CPU_IPA_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/ipa.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_ipa::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Register blocking of the linear layers: rows × outputs accumulators.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr int kLinRows = 4;
#else
inline constexpr int kLinRows = 2;
#endif
inline constexpr int kLinOuts = 4;
// Register blocking of the pair output Σ_j p_hj z_j: heads × vectors of c_z.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr int kPairHeads = 6;
inline constexpr int kPairVecs = 4;
#else
inline constexpr int kPairHeads = 4;
inline constexpr int kPairVecs = 2;
#endif
// Rows of the z tile per register block of the pair bias; key vectors per block of logits;
// partial sums of the value accumulation. Each is a count of independent FMA chains.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr int64_t kBiasRows = 8;
#else
inline constexpr int64_t kBiasRows = 4;
#endif
inline constexpr int kLogitVecs = 4;
inline constexpr int kValueChains = 4;
static_assert(kTile % (kLogitVecs * int64_t(hn::MaxLanes(DF()))) == 0, "logit blocks must tile a key tile");

HWY_INLINE VF LoadBF16(DF d, const bf16_t* p) {
  const hn::Rebind<uint16_t, DF> d16;
  const hn::RebindToUnsigned<DF> du;
  const auto bits = hn::PromoteTo(du, hn::LoadU(d16, reinterpret_cast<const uint16_t*>(p)));
  return hn::BitCast(d, hn::ShiftLeft<16>(bits));
}

HWY_INLINE VF LoadF16(DF d, const f16_t* p) {
  const hn::Rebind<hwy::float16_t, DF> d16;
  return hn::PromoteTo(d, hn::LoadU(d16, reinterpret_cast<const hwy::float16_t*>(p)));
}

/// y[r, o] = Σ_k x[r, k] w[o, k] + b[o] for one block of rows × outputs (indices past the
/// end are clamped for loading and skipped for storing).
static HWY_INLINE void LinearBlock(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* w,
                                   const float* b, int64_t outs, float* y, int64_t ldy, int64_t r0, int64_t o0) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  const int64_t kfull = in / L * L;
  const float* xr[kLinRows];
  const float* wr[kLinOuts];
  for (int a = 0; a < kLinRows; ++a) xr[a] = x + std::min(r0 + a, rows - 1) * ldx;
  for (int a = 0; a < kLinOuts; ++a) wr[a] = w + std::min(o0 + a, outs - 1) * in;
  VF acc[kLinRows][kLinOuts];
  for (auto& row : acc)
    for (auto& v : row) v = hn::Zero(d);
  for (int64_t k = 0; k < kfull; k += L) {
    VF xv[kLinRows];
    for (int r = 0; r < kLinRows; ++r) xv[r] = hn::LoadU(d, xr[r] + k);
    for (int o = 0; o < kLinOuts; ++o) {
      const VF wv = hn::LoadU(d, wr[o] + k);
      for (int r = 0; r < kLinRows; ++r) acc[r][o] = hn::MulAdd(xv[r], wv, acc[r][o]);
    }
  }
  for (int r = 0; r < kLinRows && r0 + r < rows; ++r)
    for (int o = 0; o < kLinOuts && o0 + o < outs; ++o) {
      float s = hn::GetLane(hn::SumOfLanes(d, acc[r][o]));
      for (int64_t k = kfull; k < in; ++k) s += xr[r][k] * wr[o][k];
      y[(r0 + r) * ldy + o0 + o] = s + b[o0 + o];
    }
}

/// y (rows, outs; row stride ldy) = x (rows, in; stride ldx) · wᵀ + b, w (outs, in).
void IpaLinear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* w, const float* b, int64_t outs,
               float* y, int64_t ldy, int threads) {
  // Tasks of 32 rows × 64 outputs: the weight tile stays in L2 while the rows go by.
  constexpr int64_t kRowTile = 32, kOutTile = 64;
  const int64_t rt = (rows + kRowTile - 1) / kRowTile, ot = (outs + kOutTile - 1) / kOutTile;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < rt * ot; ++task) {
    const int64_t r_begin = (task % rt) * kRowTile, o_begin = (task / rt) * kOutTile;
    const int64_t r_end = std::min(rows, r_begin + kRowTile), o_end = std::min(outs, o_begin + kOutTile);
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kLinRows)
      for (int64_t o0 = o_begin; o0 < o_end; o0 += kLinOuts) LinearBlock(x, ldx, rows, in, w, b, outs, y, ldy, r0, o0);
  }
}

HWY_INLINE VF Load16(DF d, const bf16_t* p) { return LoadBF16(d, p); }
HWY_INLINE VF Load16(DF d, const f16_t* p) { return LoadF16(d, p); }

/// zf (n) = the 16-bit values (bf16_t or f16_t) widened to f32.
template <class Z>
static HWY_INLINE void WidenRows(const Z* z, int64_t n, float* zf) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  int64_t k = 0;
  for (; k + L <= n; k += L) hn::StoreU(Load16(d, z + k), d, zf + k);
  for (; k < n; ++k) zf[k] = to_float(z[k]);
}

/// bias (nj, Hp) = zt (nj, c_z) · β W_bᵀ (c_z, Hp): vectorized over heads, kBiasRows rows of
/// z per block (rows past nj are clamped for loading and not stored).
static HWY_INLINE void PairBiasTile(const float* zt, int64_t nj, int64_t c_z, const float* wbt, int64_t Hp,
                                    float* bias) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  for (int64_t hv = 0; hv < Hp; hv += L)
    for (int64_t j0 = 0; j0 < nj; j0 += kBiasRows) {
      const float* zr[kBiasRows];
      for (int64_t r = 0; r < kBiasRows; ++r) zr[r] = zt + std::min(j0 + r, nj - 1) * c_z;
      VF acc[kBiasRows];
      for (auto& v : acc) v = hn::Zero(d);
      for (int64_t k = 0; k < c_z; ++k) {
        const VF w = hn::LoadU(d, wbt + k * Hp + hv);
        for (int64_t r = 0; r < kBiasRows; ++r) acc[r] = hn::MulAdd(hn::Set(d, zr[r][k]), w, acc[r]);
      }
      for (int64_t r = 0; r < kBiasRows && j0 + r < nj; ++r) hn::StoreU(acc[r], d, bias + (j0 + r) * Hp + hv);
    }
}

/// acc[g, k0 : k0 + C·L] += Σ_j p[g·kTile + j] zt[j, k0 : k0 + C·L] for G heads.
template <int G, int C>
static HWY_INLINE void PairAccumulateBlock(const float* zt, int64_t nj, int64_t c_z, const float* p, float* acc,
                                           int64_t k0) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  VF a[G][C];
  for (int g = 0; g < G; ++g)
    for (int cc = 0; cc < C; ++cc) a[g][cc] = hn::LoadU(d, acc + g * c_z + k0 + cc * L);
  for (int64_t j = 0; j < nj; ++j) {
    VF zv[C];
    for (int cc = 0; cc < C; ++cc) zv[cc] = hn::LoadU(d, zt + j * c_z + k0 + cc * L);
    for (int g = 0; g < G; ++g) {
      const VF pb = hn::Set(d, p[g * kTile + j]);
      for (int cc = 0; cc < C; ++cc) a[g][cc] = hn::MulAdd(pb, zv[cc], a[g][cc]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int cc = 0; cc < C; ++cc) hn::StoreU(a[g][cc], d, acc + g * c_z + k0 + cc * L);
}

/// The pair output of G heads over all of c_z: blocks of kPairVecs vectors, then single
/// vectors, then a scalar tail.
template <int G>
static HWY_INLINE void PairAccumulateHeads(const float* zt, int64_t nj, int64_t c_z, const float* p, float* acc) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  int64_t k = 0;
  for (; k + kPairVecs * L <= c_z; k += kPairVecs * L) PairAccumulateBlock<G, kPairVecs>(zt, nj, c_z, p, acc, k);
  for (; k + L <= c_z; k += L) PairAccumulateBlock<G, 1>(zt, nj, c_z, p, acc, k);
  for (; k < c_z; ++k)
    for (int g = 0; g < G; ++g) {
      float sum = acc[g * c_z + k];
      for (int64_t j = 0; j < nj; ++j) sum += p[g * kTile + j] * zt[j * c_z + k];
      acc[g * c_z + k] = sum;
    }
}

/// The last H mod kPairHeads heads (G counts down to the remainder).
template <int G>
static void PairAccumulateRest(int64_t rest, const float* zt, int64_t nj, int64_t c_z, const float* p, float* acc) {
  if constexpr (G > 0) {
    if (rest == G)
      PairAccumulateHeads<G>(zt, nj, c_z, p, acc);
    else
      PairAccumulateRest<G - 1>(rest, zt, nj, c_z, p, acc);
  }
}

/// acc (H, c_z) += p (H, kTile) · zt (nj, c_z).
static HWY_INLINE void PairAccumulate(const float* zt, int64_t nj, int64_t c_z, int64_t H, const float* p, float* acc) {
  int64_t h = 0;
  for (; h + kPairHeads <= H; h += kPairHeads) PairAccumulateHeads<kPairHeads>(zt, nj, c_z, p + h * kTile, acc + h * c_z);
  if (h < H) PairAccumulateRest<kPairHeads - 1>(H - h, zt, nj, c_z, p + h * kTile, acc + h * c_z);
}

/// A block of nr ≤ kRowBlock query rows i0 … i0+nr−1: stream over key tiles with an online
/// softmax (the rows of the block share each key/value tile while it is in L2), then write the
/// rows of the concatenation (local-frame points, norms, pair output). zrows[r]: row i0+r of z.
template <class ZT>
static void AttendRows(const AttendArgs& a, int64_t i0, int64_t nr, float* slab, const ZT* const* zrows) {
  const ipa::IpaShape& d = *a.d;
  const Layout& lay = *a.lay;
  const DF df;
  const int64_t L = int64_t(hn::Lanes(df));
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, Pv = d.Pv, c_z = d.c_z, Np = lay.Np, Wv = lay.Wv, Hp = lay.Hp;
  const float* base = a.scratch;
  const float* kt = base + lay.kt;
  const float* kpt = base + lay.kpt;
  const float* vv = base + lay.vv;
  const float* mneg = base + lay.mneg;
  const float* wbt = base + lay.wb;
  const float* bb = base + lay.bb;
  const float* neg_half_gamma = base + lay.gamma;

  float* lg = slab + lay.work_lg;      // (H, kTile) logits, then probabilities
  float* bias = slab + lay.work_bias;  // (kTile, Hp)
  float* zf = slab + lay.work_zf;      // (kTile, c_z) widened 16-bit tile
  // Per-row state: accv (H, Wv), accp (H, c_z), running max (H), running sum (H).
  auto state = [&](int64_t r) { return slab + lay.work_state + r * lay.row_state; };
  for (int64_t r = 0; r < nr; ++r) {
    float* accv = state(r);
    float* accp = accv + round_up(H * Wv, 16);
    float* mrow = accp + round_up(H * c_z, 16);
    std::fill(accv, accv + H * Wv, 0.f);
    std::fill(accp, accp + H * c_z, 0.f);
    std::fill(mrow, mrow + H, -INFINITY);
    std::fill(mrow + H, mrow + 2 * H, 0.f);
  }

  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const int64_t nj = std::min(kTile, N - j0);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = i0 + r;
      const ZT* zi = zrows[r];
      const float* qs = base + lay.qs + i * H * c;
      const float* qp = base + lay.qp + i * H * P * 3;
      float* accv = state(r);
      float* accp = accv + round_up(H * Wv, 16);
      float* mrow = accp + round_up(H * c_z, 16);
      float* lrow = mrow + H;
      const float mi = a.mask[i];
      const float* zt;
      if constexpr (!std::is_same_v<ZT, float>) {
        WidenRows(zi + j0 * c_z, nj * c_z, zf);
        zt = zf;
      } else {
        zt = zi + j0 * c_z;
      }
      // 1. Pair bias of the tile from z (β folded into the weights).
      PairBiasTile(zt, nj, c_z, wbt, Hp, bias);
      // 2. Logits, vectorized over keys, kLogitVecs vectors at a time (independent FMA chains;
      //    key arrays are padded to Np, a multiple of kTile, with zeros).
      const int64_t njb = round_up(nj, kLogitVecs * L);
      const VF vmi = hn::Set(df, mi);
      for (int64_t h = 0; h < H; ++h) {
        float* row = lg + h * kTile;
        for (int64_t j = 0; j < nj; ++j) row[j] = bias[j * Hp + h] + bb[h];
        const VF vg = hn::Set(df, neg_half_gamma[h]);
        for (int64_t j = 0; j < njb; j += kLogitVecs * L) {
          VF s[kLogitVecs], dist[kLogitVecs];
          for (int u = 0; u < kLogitVecs; ++u) {
            s[u] = hn::Zero(df);
            dist[u] = hn::Zero(df);
          }
          for (int64_t k = 0; k < c; ++k) {
            const VF qv = hn::Set(df, qs[h * c + k]);
            const float* kr = kt + (h * c + k) * Np + j0 + j;
            for (int u = 0; u < kLogitVecs; ++u) s[u] = hn::MulAdd(qv, hn::LoadU(df, kr + u * L), s[u]);
          }
          for (int64_t e = 0; e < 3 * P; ++e) {
            const VF qv = hn::Set(df, qp[h * 3 * P + e]);
            const float* kr = kpt + (h * 3 * P + e) * Np + j0 + j;
            for (int u = 0; u < kLogitVecs; ++u) {
              const VF diff = hn::Sub(qv, hn::LoadU(df, kr + u * L));
              dist[u] = hn::MulAdd(diff, diff, dist[u]);
            }
          }
          for (int u = 0; u < kLogitVecs; ++u) {
            VF t = hn::Add(s[u], hn::LoadU(df, row + j + u * L));
            t = hn::MulAdd(vg, dist[u], t);
            t = hn::MulAdd(vmi, hn::LoadU(df, mneg + j0 + j + u * L), t);
            hn::StoreU(t, df, row + j + u * L);
          }
        }
        for (int64_t j = nj; j < njb; ++j) row[j] = -1e30f;  // padding: exp → 0
      }
      // 3. Online softmax per head; rescale the accumulators when the max moves.
      for (int64_t h = 0; h < H; ++h) {
        float* row = lg + h * kTile;
        VF vmax = hn::Set(df, -1e30f);
        for (int64_t j = 0; j < njb; j += L) vmax = hn::Max(vmax, hn::LoadU(df, row + j));
        ipa::OnlineSoftmax st{mrow[h], lrow[h]};
        const float scale = ipa::online_softmax_rescale(st, hn::GetLane(hn::MaxOfLanes(df, vmax)));
        const VF vm = hn::Set(df, st.m);
        VF vsum = hn::Zero(df);
        for (int64_t j = 0; j < njb; j += L) {
          const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, row + j), vm));
          vsum = hn::Add(vsum, e);
          hn::StoreU(e, df, row + j);
        }
        mrow[h] = st.m;
        lrow[h] = st.l + hn::GetLane(hn::SumOfLanes(df, vsum));
        if (scale != 1.f) {
          const VF vs = hn::Set(df, scale);
          for (int64_t k = 0; k < Wv; k += L) hn::StoreU(hn::Mul(vs, hn::LoadU(df, accv + h * Wv + k)), df, accv + h * Wv + k);
          for (int64_t k = 0; k < c_z; ++k) accp[h * c_z + k] *= scale;
        }
      }
      // 4. Scalar and point values: accv (H, Wv) += p (H, tile) · v (tile, Wv) per head, with
      //    kValueChains partial sums over j (independent FMA chains).
      for (int64_t h = 0; h < H; ++h) {
        const float* vh = vv + (h * Np + j0) * Wv;
        const float* ph = lg + h * kTile;
        for (int64_t k = 0; k < Wv; k += L) {
          VF acc[kValueChains];
          acc[0] = hn::LoadU(df, accv + h * Wv + k);
          for (int u = 1; u < kValueChains; ++u) acc[u] = hn::Zero(df);
          int64_t j = 0;
          for (; j + kValueChains <= nj; j += kValueChains)
            for (int u = 0; u < kValueChains; ++u)
              acc[u] = hn::MulAdd(hn::Set(df, ph[j + u]), hn::LoadU(df, vh + (j + u) * Wv + k), acc[u]);
          for (; j < nj; ++j) acc[0] = hn::MulAdd(hn::Set(df, ph[j]), hn::LoadU(df, vh + j * Wv + k), acc[0]);
          for (int u = 1; u < kValueChains; ++u) acc[0] = hn::Add(acc[0], acc[u]);
          hn::StoreU(acc[0], df, accv + h * Wv + k);
        }
      }
      // 5. Pair output Σ_j a_ij z_ij (the z tile is still in cache from step 1).
      PairAccumulate(zt, nj, c_z, H, lg, accp);
    }
  }

  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = i0 + r;
    const float* accv = state(r);
    const float* accp = accv + round_up(H * Wv, 16);
    const float* mrow = accp + round_up(H * c_z, 16);
    const float* lrow = mrow + H;
    // Normalize and write row i of concat[o, x, y, z, norms, pair].
    float* f = a.feat + i * lay.F;
    const int64_t off_pt = H * c, off_norm = H * (c + 3 * Pv), off_pair = H * (c + 4 * Pv);
    const float* R = a.rot + i * 9;
    const float* t = base + lay.tc + i * 3;
    for (int64_t h = 0; h < H; ++h) {
      const float inv = ipa::online_softmax_inv_sum(ipa::OnlineSoftmax{mrow[h], lrow[h]});
      for (int64_t k = 0; k < c; ++k) f[h * c + k] = accv[h * Wv + k] * inv;
      for (int64_t p = 0; p < Pv; ++p) {
        const float* g = accv + h * Wv + c + 3 * p;
        const float gl[3] = {g[0] * inv, g[1] * inv, g[2] * inv};
        float loc[3];
        ipa::frame_invert_apply(R, t, gl, loc);
        for (int ax = 0; ax < 3; ++ax) f[off_pt + ax * H * Pv + h * Pv + p] = loc[ax];
        f[off_norm + h * Pv + p] = ipa::point_norm(loc);
      }
      for (int64_t k = 0; k < c_z; ++k) f[off_pair + h * c_z + k] = accp[h * c_z + k] * inv;
    }
  }
}

/// zr (N, c_z) = row i of z from its factors: zr[j] = Σ_r f1[i, r] ⊙ f2[j, r].
static void MaterializeRow(const AttendArgs& a, int64_t i, float* zr) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  const int64_t N = a.d->N, c_z = a.d->c_z, R = a.rank, kfull = c_z / L * L;
  const float* fi = a.f1 + i * R * c_z;
  for (int64_t j = 0; j < N; ++j) {
    const float* fj = a.f2 + j * R * c_z;
    for (int64_t k = 0; k < kfull; k += L) {
      VF acc = hn::Zero(d);
      for (int64_t r = 0; r < R; ++r) acc = hn::MulAdd(hn::LoadU(d, fi + r * c_z + k), hn::LoadU(d, fj + r * c_z + k), acc);
      hn::StoreU(acc, d, zr + j * c_z + k);
    }
    for (int64_t k = kfull; k < c_z; ++k) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r) acc += fi[r * c_z + k] * fj[r * c_z + k];
      zr[j * c_z + k] = acc;
    }
  }
}

template <class ZT>
static void AttendPairRows(const AttendArgs& a, float* slab, int64_t i0, int64_t nr) {
  const ZT* rows[kRowBlock];
  for (int64_t r = 0; r < nr; ++r) rows[r] = static_cast<const ZT*>(a.z) + (i0 + r) * a.d->N * a.d->c_z;
  AttendRows<ZT>(a, i0, nr, slab, rows);
}

void IpaAttend(const AttendArgs& a, DType zt, int threads) {
  const int64_t N = a.d->N, c_z = a.d->c_z;
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel num_threads(threads)
  {
    float* slab = a.slabs + int64_t(omp_get_thread_num()) * a.lay->per_thread;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kRowBlock, nr = std::min(kRowBlock, N - i0);
      if (a.rank > 0) {
        const float* rows[kRowBlock];
        for (int64_t r = 0; r < nr; ++r) {
          float* zr = slab + a.lay->zrow + r * round_up(N * c_z, 16);
          MaterializeRow(a, i0 + r, zr);
          rows[r] = zr;
        }
        AttendRows<float>(a, i0, nr, slab, rows);
      } else if (zt == DType::bf16) {
        AttendPairRows<bf16_t>(a, slab, i0, nr);
      } else if (zt == DType::f16) {
        AttendPairRows<f16_t>(a, slab, i0, nr);
      } else {
        AttendPairRows<float>(a, slab, i0, nr);
      }
    }
  }
}

}  // namespace attnbench::cpu_ipa::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu_ipa {
HWY_EXPORT(IpaLinear);
HWY_EXPORT(IpaAttend);
}  // namespace cpu_ipa

size_t ipa_forward_fused_scratch_bytes(const ipa::IpaShape& shape, int threads, int64_t rank) {
  return size_t(cpu_ipa::Layout(shape, threads, rank).total) * sizeof(float);
}

void ipa_forward_fused(float* out, const ipa::IpaShape& d, const IpaWeightsF32& w, const IpaActivations& x,
                       void* scratch, int threads) {
  using cpu_ipa::Layout;
  if (threads < 1) throw std::invalid_argument("ipa_forward_fused: threads must be >= 1");
  if ((x.rank > 0) != (x.z == nullptr)) throw std::invalid_argument("ipa_forward_fused: give either z or its factors");
  const Layout lay(d, threads, x.rank);
  float* base = static_cast<float*>(scratch);
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, Pv = d.Pv, PP = P + Pv, Np = lay.Np, Wv = lay.Wv;
  using namespace cpu_ipa;  // HWY_DYNAMIC_DISPATCH names a kernel unqualified (see trimul_forward)
  auto linear = HWY_DYNAMIC_DISPATCH(IpaLinear);

  // Projections into the raw region: [q | kv | q points | kv points] per row.
  float* raw = base + lay.raw;
  const int64_t ld = lay.raw_ld, o_kv = H * c, o_qp = 3 * H * c, o_kvp = 3 * H * c + 3 * H * P;
  linear(x.s, d.c_s, N, d.c_s, w.linear_q_w, w.linear_q_b, H * c, raw, ld, threads);
  linear(x.s, d.c_s, N, d.c_s, w.linear_kv_w, w.linear_kv_b, 2 * H * c, raw + o_kv, ld, threads);
  linear(x.s, d.c_s, N, d.c_s, w.linear_qp_w, w.linear_qp_b, 3 * H * P, raw + o_qp, ld, threads);
  linear(x.s, d.c_s, N, d.c_s, w.linear_kvp_w, w.linear_kvp_b, 3 * H * PP, raw + o_kvp, ld, threads);

  // Centroid of the translations (f64): points relative to it (an exact global translation).
  double cen[3] = {0, 0, 0};
  for (int64_t i = 0; i < N; ++i)
    for (int ax = 0; ax < 3; ++ax) cen[ax] += x.translations[i * 3 + ax];
  for (double& v : cen) v /= double(std::max<int64_t>(N, 1));
  float* tc = base + lay.tc;
  for (int64_t i = 0; i < N; ++i)
    for (int ax = 0; ax < 3; ++ax) tc[i * 3 + ax] = float(double(x.translations[i * 3 + ax]) - cen[ax]);

  // Pack: α q; query points; keys and key points transposed (padding zeroed); values.
  const float alpha = 1.0f / std::sqrt(3.0f * float(c));
  float* qs = base + lay.qs;
  float* qp = base + lay.qp;
  float* kt = base + lay.kt;
  float* kpt = base + lay.kpt;
  float* vv = base + lay.vv;
  float* mneg = base + lay.mneg;
  std::fill(kt, kt + H * c * Np, 0.f);
  std::fill(kpt, kpt + H * P * 3 * Np, 0.f);
  std::fill(mneg, mneg + Np, 0.f);
  std::fill(vv, vv + H * Np * Wv, 0.f);
  std::fill(base + lay.wb, base + lay.wb + d.c_z * lay.Hp, 0.f);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i) {
    const float* r = raw + i * ld;
    const float* R = x.rotations + i * 9;
    const float* t = tc + i * 3;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t k = 0; k < c; ++k) {
        qs[(i * H + h) * c + k] = alpha * r[h * c + k];
        kt[(h * c + k) * Np + i] = r[o_kv + h * 2 * c + k];
      }
      float* v = vv + (h * Np + i) * Wv;
      for (int64_t k = 0; k < c; ++k) v[k] = r[o_kv + h * 2 * c + c + k];
      for (int64_t p = 0; p < P; ++p) {  // query points: x | y | z blocks of H·P
        const int64_t n = h * P + p;
        const float loc[3] = {r[o_qp + n], r[o_qp + H * P + n], r[o_qp + 2 * H * P + n]};
        ipa::frame_apply(R, t, loc, qp + (i * H + h) * P * 3 + p * 3);
      }
      for (int64_t p = 0; p < PP; ++p) {  // kv points: x | y | z blocks of H·(P+P_v)
        const int64_t n = h * PP + p;
        const float loc[3] = {r[o_kvp + n], r[o_kvp + H * PP + n], r[o_kvp + 2 * H * PP + n]};
        float g[3];
        ipa::frame_apply(R, t, loc, g);
        for (int ax = 0; ax < 3; ++ax) {
          if (p < P)
            kpt[(h * 3 * P + p * 3 + ax) * Np + i] = g[ax];
          else
            v[c + 3 * (p - P) + ax] = g[ax];
        }
      }
    }
#if defined(ATTNBENCH_MUTANT_ipa_ignore_mask)  // scripts/mutation-test.sh: the key mask is ignored
    mneg[i] = 0.0f;
#else
    mneg[i] = ipa::kInf * (x.mask[i] - 1.0f);
#endif
  }
#if defined(ATTNBENCH_MUTANT_ipa_pair_scale_bf16)  // scripts/mutation-test.sh: pair-bias scale off by 1e-3, bf16 z only
  const float beta = std::sqrt(1.0f / 3.0f) * (x.z_dtype == DType::bf16 ? 1.001f : 1.0f);
#else
  const float beta = std::sqrt(1.0f / 3.0f);
#endif
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t k = 0; k < d.c_z; ++k) base[lay.wb + k * lay.Hp + h] = beta * w.linear_b_w[h * d.c_z + k];
    base[lay.bb + h] = beta * w.linear_b_b[h];
#if defined(ATTNBENCH_MUTANT_ipa_no_point_term)  // scripts/mutation-test.sh: the point-distance term is missing
    base[lay.gamma + h] = 0.0f * ipa::point_weight(w.head_weights[h], P);
#else
    base[lay.gamma + h] = -0.5f * ipa::point_weight(w.head_weights[h], P);
#endif
  }

  // Attention: the concatenation (N, F) reuses the raw region (the projections are packed).
  cpu_ipa::AttendArgs args{&d, &lay, base, base + lay.slab, raw, x.z, x.z_factor_1, x.z_factor_2, x.rank,
                           x.rotations, x.mask};
  HWY_DYNAMIC_DISPATCH(IpaAttend)(args, x.z_dtype, threads);
  linear(raw, lay.F, N, lay.F, w.linear_out_w, w.linear_out_b, d.c_s, out, d.c_s, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
