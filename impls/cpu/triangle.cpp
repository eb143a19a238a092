// Triangle attention, fused CPU forward (AlphaFold2 Alg. 13/14, OpenFold `TriangleAttention`).
//
//   z (N, N, c_z) f32, bf16 or f16, mask m (N, N)  →  out (N, N, c_z) f32         (starting node)
//   x = LayerNorm(z);  q, k, v, g = x W_{q,k,v,g}ᵀ (+ b_g);  b^h_jk = x_jk · W_b[h]
//   o^h_ij = sigmoid(g^h_ij) ⊙ Σ_k softmax_k(q^h_ij·k^h_ik/√c + b^h_jk + inf·(m_ik − max_k m_ik)) v^h_ik
//   out_ij = concat_h(o^h_ij) W_oᵀ + b_o
// Ending node: the same on zᵀ, written back transposed (TriangleShape::pair maps the indices;
// nothing is copied). See reference/triangle.hpp for the mask's row-constant shift.
//
// Plan: (1) one pass over all pairs computes the layer norm and the pair bias b (H, N, N) and
// the mask bias (N, N) in log2 units — the only O(N²) scratch (H + 1 floats per pair, vs c_z for
// z). (2) OpenMP over rows i: layer-norm row i of z, project it once to [q | k | v | g]
// (N, 4·H·c) with a register-blocked GEMM (packed weights, q pre-scaled by log2(e)/√c), then per
// head: pack k transposed and v padded, and for each tile of 48 query rows j stream over key tiles
// of 64 k with FlashAttention's online softmax (the S = Q·Kᵀ and O += P·V register blocks and the
// base-2 online-softmax step of impls/cpu/attention-inl.h, shared with SDPA), adding b_jk and the
// mask bias to each score tile. Gate, then the output GEMM for the row. Nothing N³ is stored.
//
// Backward (triangle_attention_backward_fused; docs/triangle.md): the forward saves the ungated
// output and the log-sum-exp; a row pass recomputes row i's layer norm and projections, takes the
// output layer's and gate's gradients with the shared GEMM, runs FlashAttention-2's backward per
// head (BackwardPair of attention-inl.h, the pair and mask biases added to each score tile as the
// forward adds them) and sums each dS tile into the pair bias's gradient; a bias pass then adds
// the pair bias's share of dx once that gradient is summed over every row.
//
// Strategies, in the order tried (c_z 128, c 32, H 4, N = 256, f32, 2 threads, median wall time
// of `attnbench run suites/triangle.json --filter N=256 --impl reference,cpu`, quiet machine):
//   | strategy                                                      | time   | effect          |
//   |---------------------------------------------------------------|--------|-----------------|
//   | reference (Eigen, projections of all pairs materialized,      | 917 ms | baseline        |
//   |   logits [N, N] per (row, head), scalar exp)                  |        |                 |
//   | fused: per row i, per head a flash attention with the 2-D     | 150 ms | 6.1×            |
//   |   additive bias; projections per row (O(N·c) per thread)      |        |                 |
//   | layer norms and pair bias with vectorized sums (perf: scalar  | 134 ms | −11 %, 6.8×,    |
//   |   dependent-add chains were ~15 % of the forward)             |        | 64 % of peak    |
//   | biases folded into the Q·Kᵀ accumulators' initial value (no   | same   | within noise    |
//   |   second pass over the score tile; block row maxima reused)   |        | (1 thread, 2×2  |
//   |                                                               |        | runs): reverted |
// Where the time goes now (perf, N = 256): the per-row attention ≈ 50 %, the projection and
// output GEMMs ≈ 33 % (at N = 256 they are 55 % of the FLOPs), the bias pass ≈ 4 %, expf of
// the gate ≈ 3 %.
#include "impls/cpu/triangle.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "harness/dtype.hpp"
#include "impls/cpu/gemm.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_TRIANGLE_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_TRIANGLE_LAYOUT_
namespace attnbench::cpu_triangle {

inline constexpr int64_t kTileK = 64;  // keys per tile: a multiple of every register block width
inline constexpr int64_t kTileQ = 48;  // query rows per tile: a multiple of 6 and 4 register rows
inline constexpr double kLog2e = 1.4426950408889634;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions; every region starts 64-byte aligned.
struct Layout {
  int64_t Np, Dp, Op, czp, Hc;
  int64_t wproj, bproj, wo, bo, bias, mbias, slab, total;
  int64_t t_x, t_proj, t_kt, t_v, t_s, t_o, t_m, t_l, t_alpha, t_vmax, t_cat, t_y, per_thread;  // within a slab
  Layout(const triangle::TriangleShape& d, int threads) {
    Hc = d.hidden();
    Np = round_up(d.N, kTileK);
    Dp = round_up(d.c, 16);
    Op = round_up(4 * Hc, 16);
    czp = round_up(d.c_z, 16);
    int64_t at = 0;
    auto take = [&](int64_t& at_ref, int64_t n) {
      const int64_t o = at_ref;
      at_ref += round_up(n, 16);
      return o;
    };
    wproj = take(at, d.c_z * Op);  // [W_q·log2(e)/√c | W_k | W_v | W_g]ᵀ  (c_z, Op)
    bproj = take(at, Op);          // [0 | 0 | 0 | b_g]
    wo = take(at, Hc * czp);       // W_oᵀ (H·c, czp)
    bo = take(at, czp);
    bias = take(at, d.H * d.N * Np);  // log2(e)·b^h_jk (H, N, Np), −inf past N
    mbias = take(at, d.N * Np);       // log2(e)·mask bias (N, Np), 0 past N
    int64_t t = 0;
    t_x = take(t, d.N * d.c_z);      // layer-normed row i (N, c_z)
    t_proj = take(t, d.N * Op);      // [q | k | v | g] of row i (N, Op)
    t_kt = take(t, d.c * Np);        // keys of one head, transposed (c, Np)
    t_v = take(t, Np * Dp);          // values of one head (Np, Dp)
    t_s = take(t, kTileQ * kTileK);  // scores / probabilities of a tile
    t_o = take(t, kTileQ * Dp);      // output accumulator of a query tile
    t_m = take(t, kTileQ);
    t_l = take(t, kTileQ);
    t_alpha = take(t, kTileQ);
    t_vmax = take(t, kTileQ * 16);
    t_cat = take(t, d.N * Hc);  // gated concatenation of the heads (N, H·c)
    t_y = take(t, d.N * czp);   // output rows before the (maybe transposed) store
    per_thread = t;
    slab = take(at, per_thread * threads);
    total = at;
  }
};

/// Everything the per-row kernel reads.
struct RowArgs {
  const triangle::TriangleShape* d;
  const Layout* lay;
  const float* base;  // the scratch (shared, read-only regions)
  float* slabs;
  const void* z;
  DType z_dtype;
  const TriangleWeightsF32* w;
  float* out;
  const TriangleSaved* saved;  // null: nothing saved
};


/// x (c_z) = LayerNorm of pair (a, b) of the problem; with `n`, also the normalized values
/// (x before the affine map) and 1/σ (the backward's operands).
inline void layer_norm_pair(const triangle::TriangleShape& d, const void* z, DType zt, const TriangleWeightsF32& w,
                            int64_t a, int64_t b, float* x, float* n = nullptr, float* rstd = nullptr) {
  const int64_t off = d.pair(a, b) * d.c_z;
  for (int64_t k = 0; k < d.c_z; ++k) x[k] = load_float(z, zt, off + k);
  // Vectorized sums (a scalar chain of c_z dependent adds is latency-bound: perf showed the
  // layer norms and the pair bias at ~15 % of the forward).
  float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < d.c_z; ++k) sum += x[k];
  const float mean = sum / float(d.c_z);
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < d.c_z; ++k) sq += (x[k] - mean) * (x[k] - mean);
  const float inv = triangle::layer_norm_inv_std(sq, d.c_z);
  if (n) {
    for (int64_t k = 0; k < d.c_z; ++k) n[k] = (x[k] - mean) * inv;
    *rstd = inv;
  }
  for (int64_t k = 0; k < d.c_z; ++k) x[k] = triangle::layer_norm_apply(x[k], mean, inv, w.ln_w[k], w.ln_b[k]);
}

/// LayerNorm backward of one pair, added in: dz[0:c_z) += rstd·(dn − mean(dn) − n·mean(dn ⊙ n))
/// with dn = dx ⊙ w; the affine parameters' gradients accumulate into dw, db (double).
inline void layer_norm_pair_backward(int64_t c_z, const float* dx, const float* n, float rstd, const float* w,
                                     float* dz, double* dw, double* db) {
  float m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : m1, m2)
  for (int64_t k = 0; k < c_z; ++k) {
    m1 += dx[k] * w[k];
    m2 += dx[k] * w[k] * n[k];
  }
  m1 /= float(c_z);
  m2 /= float(c_z);
  for (int64_t k = 0; k < c_z; ++k) {
    dz[k] += rstd * (dx[k] * w[k] - m1 - n[k] * m2);
    dw[k] += double(dx[k]) * double(n[k]);
    db[k] += double(dx[k]);
  }
}

inline constexpr int64_t kBwdTileK = 64;  // backward: keys per tile (a multiple of every register block width)
inline constexpr int64_t kBwdTileQ = 48;  // backward: query rows per pair

/// The backward's scratch: the forward's shared regions (packed weights, biases; Layout with
/// no slabs), the packed [W_q | W_k | W_v | W_g] (Op, c_z) for dx, then per thread a float
/// slab and a double block (weight-gradient and pair-bias-gradient accumulators).
struct BackwardLayout {
  Layout fwd;
  int64_t ld, c16;
  int64_t wcat, slab, dblock, total;  // floats (dblock: offset of the double blocks, in floats)
  // Within a float slab:
  int64_t t_n, t_rstd, t_x, t_proj, t_dout, t_dcat, t_cat, t_dproj, t_dx, t_qs, t_qdo, t_qst, t_dot, t_lse2, t_lse2lo,
      t_delta, t_dq, t_kt, t_vt, t_krows, t_dkt, t_dvt, t_p, t_ds, t_rows, t_pack, t_part, per_thread;
  // Within a double block:
  int64_t a_wcat, a_wo, a_bo, a_bg, a_lnw, a_lnb, a_wb, a_db, per_thread_d;
  BackwardLayout(const triangle::TriangleShape& d, int threads, int64_t pack_floats) : fwd(d, 0) {
    const int64_t N = d.N, c = d.c, c_z = d.c_z, Hc = fwd.Hc, Op = fwd.Op, Dp = fwd.Dp;
    ld = round_up(N, 16);
    c16 = round_up(c, 16);
    auto take = [](int64_t& at, int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    int64_t at = fwd.total;
    wcat = take(at, Op * c_z);
    int64_t t = 0;
    t_n = take(t, N * c_z);
    t_rstd = take(t, N);
    t_x = take(t, N * c_z);
    t_proj = take(t, N * Op);
    t_dout = take(t, N * c_z);
    t_dcat = take(t, N * Hc);
    t_cat = take(t, N * Hc);
    t_dproj = take(t, N * Op);
    t_dx = take(t, N * c_z);
    t_qs = take(t, N * c);
    t_qdo = take(t, N * c);
    t_qst = take(t, c * ld);
    t_dot = take(t, c * ld);
    t_lse2 = take(t, ld);
    t_lse2lo = take(t, ld);
    t_delta = take(t, ld);
    t_dq = take(t, ld * Dp);
    t_kt = take(t, c * kBwdTileK);
    t_vt = take(t, c * kBwdTileK);
    t_krows = take(t, kBwdTileK * Dp);
    t_dkt = take(t, c * kBwdTileK);
    t_dvt = take(t, c * kBwdTileK);
    t_p = take(t, kBwdTileQ * kBwdTileK);
    t_ds = take(t, kBwdTileQ * kBwdTileK);
    t_rows = take(t, 16 * c16);
    t_pack = take(t, pack_floats);
    t_part = take(t, std::max(Op * c_z, c_z * Hc));
    per_thread = t;
    slab = take(at, per_thread * threads);
    int64_t u = 0;
    auto taked = [](int64_t& at_ref, int64_t n) {
      const int64_t o = at_ref;
      at_ref += round_up(n, 8);
      return o;
    };
    a_wcat = taked(u, Op * c_z);
    a_wo = taked(u, c_z * Hc);
    a_bo = taked(u, c_z);
    a_bg = taked(u, Hc);
    a_lnw = taked(u, c_z);
    a_lnb = taked(u, c_z);
    a_wb = taked(u, d.H * c_z);
    a_db = taked(u, d.H * N * fwd.Np);
    per_thread_d = u;
    dblock = at;
    total = at + 2 * per_thread_d * threads;
  }
};

/// Everything the backward's passes read.
struct BackwardArgs {
  const triangle::TriangleShape* d;
  const BackwardLayout* lay;
  float* base;  // the scratch
  const void* z;
  DType z_dtype;  // z's and the cotangent's
  const TriangleWeightsF32* w;
  const void* dout;
  const TriangleSaved* saved;
  const TriangleGradsF32* g;
};

}  // namespace attnbench::cpu_triangle
#endif  // ATTNBENCH_IMPLS_CPU_TRIANGLE_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/triangle.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "impls/cpu/attention-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using cpu_triangle::kTileK;
using cpu_triangle::kTileQ;
using cpu_triangle::Layout;
using cpu_triangle::round_up;

// Register blocking of the linear layers: rows × output vectors.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr int kTriLinRows = 4;
inline constexpr int kTriLinVecs = 4;
#else
inline constexpr int kTriLinRows = 4;
inline constexpr int kTriLinVecs = 2;
#endif

/// y (rows, outs) = x (rows, in; stride ldx) · wt (in, outs) + b, outs a multiple of 16 (so of
/// every lane count); wt rows and y rows have stride `outs`.
static void TriangleLinear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* wt, const float* b,
                           int64_t outs, float* y) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  for (int64_t r0 = 0; r0 < rows; r0 += kTriLinRows) {
    const float* xr[kTriLinRows];
    for (int r = 0; r < kTriLinRows; ++r) xr[r] = x + std::min(r0 + r, rows - 1) * ldx;
    int64_t o0 = 0;
    for (; o0 + kTriLinVecs * L <= outs; o0 += kTriLinVecs * L) {
      VF acc[kTriLinRows][kTriLinVecs];
      for (int v = 0; v < kTriLinVecs; ++v) {
        const VF bv = hn::LoadU(d, b + o0 + v * L);
        for (int r = 0; r < kTriLinRows; ++r) acc[r][v] = bv;
      }
      for (int64_t k = 0; k < in; ++k) {
        VF wv[kTriLinVecs];
        for (int v = 0; v < kTriLinVecs; ++v) wv[v] = hn::LoadU(d, wt + k * outs + o0 + v * L);
        for (int r = 0; r < kTriLinRows; ++r) {
          const VF xb = hn::Set(d, xr[r][k]);
          for (int v = 0; v < kTriLinVecs; ++v) acc[r][v] = hn::MulAdd(xb, wv[v], acc[r][v]);
        }
      }
      for (int r = 0; r < kTriLinRows && r0 + r < rows; ++r)
        for (int v = 0; v < kTriLinVecs; ++v) hn::StoreU(acc[r][v], d, y + (r0 + r) * outs + o0 + v * L);
    }
    for (; o0 < outs; o0 += L) {
      VF acc[kTriLinRows];
      for (int r = 0; r < kTriLinRows; ++r) acc[r] = hn::LoadU(d, b + o0);
      for (int64_t k = 0; k < in; ++k) {
        const VF wv = hn::LoadU(d, wt + k * outs + o0);
        for (int r = 0; r < kTriLinRows; ++r) acc[r] = hn::MulAdd(hn::Set(d, xr[r][k]), wv, acc[r]);
      }
      for (int r = 0; r < kTriLinRows && r0 + r < rows; ++r) hn::StoreU(acc[r], d, y + (r0 + r) * outs + o0);
    }
  }
}

/// Row i of the problem: layer norm, projections, attention of every head, gate, output.
static void TriangleRow(const cpu_triangle::RowArgs& a, int64_t i, float* slab) {
  const triangle::TriangleShape& d = *a.d;
  const Layout& lay = *a.lay;
  const DF df;
  const int64_t L = int64_t(hn::Lanes(df)), kb = int64_t(kBlockVecs) * L;
  const int64_t N = d.N, c = d.c, c_z = d.c_z, Hc = lay.Hc, Np = lay.Np, Dp = lay.Dp, Op = lay.Op;
  float* x = slab + lay.t_x;
  float* proj = slab + lay.t_proj;
  float* kt = slab + lay.t_kt;
  float* vp = slab + lay.t_v;
  float* s = slab + lay.t_s;
  float* o = slab + lay.t_o;
  float* m = slab + lay.t_m;
  float* l = slab + lay.t_l;
  float* alpha = slab + lay.t_alpha;
  float* vmax = slab + lay.t_vmax;
  float* cat = slab + lay.t_cat;
  float* y = slab + lay.t_y;

  for (int64_t b = 0; b < N; ++b) cpu_triangle::layer_norm_pair(d, a.z, a.z_dtype, *a.w, i, b, x + b * c_z);
  TriangleLinear(x, c_z, N, c_z, a.base + lay.wproj, a.base + lay.bproj, Op, proj);
  const float* mb = a.base + lay.mbias + i * Np;

  for (int64_t h = 0; h < d.H; ++h) {
    // Keys transposed (c, Np) and values (Np, Dp), zero-padded.
    std::fill(kt, kt + c * Np, 0.f);
    std::fill(vp, vp + Np * Dp, 0.f);
    for (int64_t k = 0; k < N; ++k) {
      const float* pr = proj + k * Op;
      for (int64_t e = 0; e < c; ++e) {
        kt[e * Np + k] = pr[Hc + h * c + e];
        vp[k * Dp + e] = pr[2 * Hc + h * c + e];
      }
    }
    const float* bias_h = a.base + lay.bias + h * N * Np;
    for (int64_t j0 = 0; j0 < N; j0 += kTileQ) {
      const int64_t rows = std::min(kTileQ, N - j0);
      const float* q = proj + j0 * Op + h * c;  // scaled into log2 units by the packed weights
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = -std::numeric_limits<float>::infinity();
        l[r] = 0.f;
      }
      std::fill(o, o + rows * Dp, 0.f);
      for (int64_t k0 = 0; k0 < N; k0 += kTileK) {
        const int64_t span = std::min(kTileK, N - k0), ncols = round_up(span, kb);
        for (int64_t r0 = 0; r0 < rows; r0 += int64_t(kBlockRows))
          for (int64_t c0 = 0; c0 < ncols; c0 += kb)
            ScoresBlockRows<true>(df, size_t(std::min<int64_t>(int64_t(kBlockRows), rows - r0)), size_t(c), q + r0 * Op,
                            size_t(Op), kt + k0 + c0, size_t(Np), s + r0 * kTileK + c0, size_t(kTileK), vmax + r0 * L,
                            c0 == 0);
        // + b_jk + mask bias of (i, k); past N the bias is −inf.
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s + r * kTileK;
          const float* br = bias_h + (j0 + r) * Np + k0;
          for (int64_t k = 0; k < ncols; k += L)
            hn::Store(hn::Add(hn::Load(df, sr + k), hn::Add(hn::Load(df, br + k), hn::Load(df, mb + k0 + k))), df,
                      sr + k);
          alpha[r] = OnlineSoftmaxRow(df, sr, size_t(ncols), nullptr, m[r], l[r]);
        }
        for (int64_t r0 = 0; r0 < rows; r0 += int64_t(kBlockRows))
          for (int64_t c0 = 0; c0 < Dp; c0 += kb)
            AccumulateBlockRows(df, size_t(std::min<int64_t>(int64_t(kBlockRows), rows - r0)), size_t((Dp - c0) / L),
                                size_t(span), s + r0 * kTileK, size_t(kTileK), vp + k0 * Dp + c0, size_t(Dp),
                                alpha + r0, o + r0 * Dp + c0, size_t(Dp));
      }
      // Normalize and gate into the concatenation (and keep the ungated output and the
      // log-sum-exp for the backward).
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
        const float* g = proj + (j0 + r) * Op + 3 * Hc + h * c;
        for (int64_t e = 0; e < c; ++e) cat[(j0 + r) * Hc + h * c + e] = o[r * Dp + e] * inv * triangle::sigmoid(g[e]);
        if (a.saved) {
          a.saved->lse[(i * d.H + h) * N + j0 + r] = row_lse(m[r], l[r]);
          float* so = a.saved->o + (i * N + j0 + r) * Hc + h * c;
          for (int64_t e = 0; e < c; ++e) so[e] = o[r * Dp + e] * inv;
        }
      }
    }
  }
  TriangleLinear(cat, Hc, N, Hc, a.base + lay.wo, a.base + lay.bo, lay.czp, y);
  for (int64_t b = 0; b < N; ++b) std::memcpy(a.out + d.pair(i, b) * c_z, y + b * lay.czp, size_t(c_z) * sizeof(float));
}

void TriangleAttend(const cpu_triangle::RowArgs& a, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float* slab = a.slabs + int64_t(omp_get_thread_num()) * a.lay->per_thread;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < a.d->N; ++i) TriangleRow(a, i, slab);
  }
}


// ---- Backward ---------------------------------------------------------------------

/// acc[0:n) += part[0:n) (a row's f32 partial sums into the thread's double accumulators).
static void AddPartial(double* acc, const float* part, int64_t n) {
  for (int64_t t = 0; t < n; ++t) acc[t] += double(part[t]);
}

/// Row i of the problem, backward (FlashAttention-2 per head, with the pair bias): recompute
/// the layer norm and projections, the output layer's and the gate's gradients, then per head
/// the gradients of q, k, v from P recomputed with the saved log-sum-exp; dS summed into the
/// pair bias's gradient; dx, the projections' weight gradients and dz (less the bias's share,
/// which the bias pass adds once dS is summed over every row).
static void TriangleBackwardRow(const cpu_triangle::BackwardArgs& a, int64_t i, float* slab, double* acc) {
  using cpu_triangle::kBwdTileK;
  using cpu_triangle::kBwdTileQ;
  const triangle::TriangleShape& d = *a.d;
  const cpu_triangle::BackwardLayout& bl = *a.lay;
  const Layout& lay = bl.fwd;
  const DF df;
  const int64_t L = int64_t(hn::Lanes(df));
  const int64_t N = d.N, c = d.c, c_z = d.c_z, H = d.H, Hc = lay.Hc, Np = lay.Np, Dp = lay.Dp, Op = lay.Op;
  const TriangleWeightsF32& w = *a.w;
  float* n = slab + bl.t_n;
  float* rstd = slab + bl.t_rstd;
  float* x = slab + bl.t_x;
  float* proj = slab + bl.t_proj;
  float* dout = slab + bl.t_dout;
  float* dcat = slab + bl.t_dcat;
  float* cat = slab + bl.t_cat;
  float* dproj = slab + bl.t_dproj;
  float* dx = slab + bl.t_dx;
  float* dq = slab + bl.t_dq;
  float* pack = slab + bl.t_pack;
  float* part = slab + bl.t_part;
  float* rows_buf = slab + bl.t_rows;

  // Layer norm and projections of row i, bitwise the forward's (same kernel, same operands).
  for (int64_t b = 0; b < N; ++b)
    cpu_triangle::layer_norm_pair(d, a.z, a.z_dtype, w, i, b, x + b * c_z, n + b * c_z, rstd + b);
  TriangleLinear(x, c_z, N, c_z, a.base + lay.wproj, a.base + lay.bproj, Op, proj);

  // Output layer: dcat = dout·W_o, dW_o += doutᵀ·gated, db_o += Σ dout.
  for (int64_t b = 0; b < N; ++b)
    for (int64_t e = 0; e < c_z; ++e) dout[b * c_z + e] = load_float(a.dout, a.z_dtype, d.pair(i, b) * c_z + e);
  const float* o_saved = a.saved->o + i * N * Hc;
  for (int64_t j = 0; j < N; ++j)
    for (int64_t e = 0; e < Hc; ++e) cat[j * Hc + e] = o_saved[j * Hc + e] * triangle::sigmoid(proj[j * Op + 3 * Hc + e]);
  gemm_serial(N, Hc, c_z, {dout, c_z, 1}, {w.wo, Hc, 1}, dcat, Hc, false, pack);
  gemm_serial(c_z, Hc, N, {dout, 1, c_z}, {cat, Hc, 1}, part, Hc, false, pack);
  AddPartial(acc + bl.a_wo, part, c_z * Hc);
  std::fill_n(part, c_z, 0.f);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t e = 0; e < c_z; ++e) part[e] += dout[j * c_z + e];
  AddPartial(acc + bl.a_bo, part, c_z);

  // Gate: the attention output's cotangent do = dcat ⊙ g (in place), the gate's dg' = dcat ⊙ o ⊙ g(1 − g).
  std::fill_n(dproj, N * Op, 0.f);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t e = 0; e < Hc; ++e) {
      const float sg = triangle::sigmoid(proj[j * Op + 3 * Hc + e]);
      dproj[j * Op + 3 * Hc + e] = dcat[j * Hc + e] * o_saved[j * Hc + e] * sg * (1.f - sg);
      dcat[j * Hc + e] *= sg;
    }

  // Attention, per head: an SDPA backward over N queries j and N keys k with the additive
  // bias b^h_jk + mask bias of (i, k), in the forward's base-2 units.
  const QuerySide qs{slab + bl.t_qs,   slab + bl.t_qdo,    slab + bl.t_qst,   slab + bl.t_dot,
                     slab + bl.t_lse2, slab + bl.t_lse2lo, slab + bl.t_delta, bl.ld};
  const KeyTileGrads kg{slab + bl.t_kt, slab + bl.t_vt, slab + bl.t_krows, slab + bl.t_dkt, slab + bl.t_dvt,
                        kBwdTileK,      Dp};
  const PairTiles pt{slab + bl.t_p, slab + bl.t_ds, nullptr, kBwdTileK};
  const Rope none{};
  const float* mb = a.base + lay.mbias + i * Np;
  const float inv_sqrt_c = float(1.0 / std::sqrt(double(c)));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < N; ++j)
      PackQueryRow<float>(qs, j, c, c, proj + j * Op + h * c, dcat + j * Hc + h * c, o_saved + j * Hc + h * c,
                          a.saved->lse[(i * H + h) * N + j], none, j, 1.0f);
    TransposeQueryRows(qs, c, c, 0, N, N);
    std::fill_n(dq, N * Dp, 0.f);
    const float* bias_h = a.base + lay.bias + h * N * Np;
    double* db_h = acc + bl.a_db + h * N * Np;
    for (int64_t k0 = 0; k0 < N; k0 += kBwdTileK) {
      const int64_t span = std::min(kBwdTileK, N - k0);
      PackKeyTile<float>(
          c, c, span, kBwdTileK, [&](int64_t jt) { return proj + (k0 + jt) * Op + Hc + h * c; },
          [&](int64_t jt) { return proj + (k0 + jt) * Op + 2 * Hc + h * c; }, none, k0, kg.pack(), rows_buf);
      std::fill_n(kg.dkt, c * kBwdTileK, 0.f);
      std::fill_n(kg.dvt, c * kBwdTileK, 0.f);
      for (int64_t r0 = 0; r0 < N; r0 += kBwdTileQ) {
        const int64_t rows = std::min(kBwdTileQ, N - r0);
        BackwardPair(df, c, c, qs, dq, r0, rows, span, kg, pt, [&](float* sc, int64_t ncols, float*) {
          for (int64_t r = 0; r < rows; ++r) {  // + b_jk + mask bias, as the forward adds them
            float* sr = sc + r * pt.ld;
            const float* br = bias_h + (r0 + r) * Np + k0;
            for (int64_t k = 0; k < ncols; k += L)
              hn::Store(hn::Add(hn::Load(df, sr + k), hn::Add(hn::Load(df, br + k), hn::Load(df, mb + k0 + k))), df,
                        sr + k);
          }
        });
#if defined(ATTNBENCH_MUTANT_triangle_bwd_no_bias_grad)  // scripts/mutation-test.sh: the pair bias gets no gradient
        constexpr bool kBiasGrad = false;
#else
        constexpr bool kBiasGrad = true;
#endif
        for (int64_t r = 0; kBiasGrad && r < rows; ++r) {  // dS is the logits' gradient: the pair bias's, summed over i
          double* dbr = db_h + (r0 + r) * Np + k0;
          const float* dsr = pt.ds + r * pt.ld;
          for (int64_t k = 0; k < span; ++k) dbr[k] += double(dsr[k]);
        }
      }
      StoreKeyGrads(
          kg, c, c, span, none, k0, [&](int64_t jt) { return dproj + (k0 + jt) * Op + Hc + h * c; },
          [&](int64_t jt) { return dproj + (k0 + jt) * Op + 2 * Hc + h * c; });
    }
    for (int64_t j = 0; j < N; ++j) StoreQueryGrad(dproj + j * Op + h * c, dq + j * Dp, 1, 0, c, inv_sqrt_c, none, j);
  }

  // dx = dproj·[W_q; W_k; W_v; W_g], dW_{q,k,v,g} += dprojᵀ·x, db_g += Σ dg'.
  gemm_serial(N, c_z, 4 * Hc, {dproj, Op, 1}, {a.base + bl.wcat, c_z, 1}, dx, c_z, false, pack);
  gemm_serial(4 * Hc, c_z, N, {dproj, 1, Op}, {x, c_z, 1}, part, c_z, false, pack);
  AddPartial(acc + bl.a_wcat, part, 4 * Hc * c_z);
  std::fill_n(part, Hc, 0.f);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t e = 0; e < Hc; ++e) part[e] += dproj[j * Op + 3 * Hc + e];
  AddPartial(acc + bl.a_bg, part, Hc);

  // Layer norm backward into dz (z's layout): every pair (i, ·) is row i's alone.
  for (int64_t b = 0; b < N; ++b) {
    float* dz = a.g->dz + d.pair(i, b) * c_z;
    std::fill_n(dz, c_z, 0.f);
    cpu_triangle::layer_norm_pair_backward(c_z, dx + b * c_z, n + b * c_z, rstd[b], w.ln_w, dz, acc + bl.a_lnw,
                                           acc + bl.a_lnb);
  }
}

/// Row j of the pair bias's backward, once its gradient db (H, N, Np; summed over rows i) is
/// complete: dx_jk = Σ_h db^h_jk W_b[h], dW_b += db_jk x_jkᵀ, the layer norm's backward added to dz.
static void TriangleBackwardBias(const cpu_triangle::BackwardArgs& a, const double* db, int64_t j, float* slab,
                                 double* acc) {
  const triangle::TriangleShape& d = *a.d;
  const cpu_triangle::BackwardLayout& bl = *a.lay;
  const int64_t N = d.N, c_z = d.c_z, H = d.H, Np = bl.fwd.Np;
  float* x = slab + bl.t_x;
  float* n = slab + bl.t_n;
  float* dx = slab + bl.t_dx;
  float* part = slab + bl.t_part;
  std::fill_n(part, H * c_z, 0.f);
  for (int64_t k = 0; k < N; ++k) {
    float rstd = 0.f;
    cpu_triangle::layer_norm_pair(d, a.z, a.z_dtype, *a.w, j, k, x, n, &rstd);
    std::fill_n(dx, c_z, 0.f);
    for (int64_t h = 0; h < H; ++h) {
      const float gb = float(db[(h * N + j) * Np + k]);
      const float* wbh = a.w->wb + h * c_z;
      float* ph = part + h * c_z;
      for (int64_t e = 0; e < c_z; ++e) {
        dx[e] += gb * wbh[e];
        ph[e] += gb * x[e];
      }
    }
    cpu_triangle::layer_norm_pair_backward(c_z, dx, n, rstd, a.w->ln_w, a.g->dz + d.pair(j, k) * c_z, acc + bl.a_lnw,
                                           acc + bl.a_lnb);
  }
  AddPartial(acc + bl.a_wb, part, H * c_z);
}

/// The backward: the row pass (OpenMP over rows i, static so the per-thread sums are
/// deterministic for a thread count), the pair bias's gradient summed over the threads, the
/// bias pass over rows j, every accumulator summed over the threads in order and stored in f32.
void TriangleBackward(const cpu_triangle::BackwardArgs& a, int threads) {
  const cpu_triangle::BackwardLayout& bl = *a.lay;
  const triangle::TriangleShape& d = *a.d;
  auto* acc0 = reinterpret_cast<double*>(a.base + bl.dblock);
  const int64_t per = bl.per_thread_d, n_db = d.H * d.N * bl.fwd.Np;
  auto reduce = [&](int64_t lo, int64_t hi) {
#pragma omp for schedule(static)
    for (int64_t t = lo; t < hi; ++t)
      for (int th = 1; th < threads; ++th) acc0[t] += acc0[int64_t(th) * per + t];
  };
#pragma omp parallel num_threads(threads)
  {
    const int th = omp_get_thread_num();
    float* slab = a.base + bl.slab + int64_t(th) * bl.per_thread;
    double* acc = acc0 + int64_t(th) * per;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < d.N; ++i) TriangleBackwardRow(a, i, slab, acc);
    reduce(bl.a_db, bl.a_db + n_db);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < d.N; ++j) TriangleBackwardBias(a, acc0 + bl.a_db, j, slab, acc);
    reduce(0, bl.a_db);
  }
  const int64_t Hc = d.hidden(), c_z = d.c_z;
  const TriangleGradsF32& g = *a.g;
  auto store = [&](float* out, int64_t at, int64_t n) {
    for (int64_t t = 0; t < n; ++t) out[t] = float(acc0[at + t]);
  };
  float* wparts[4] = {g.wq, g.wk, g.wv, g.wg};
  for (int p = 0; p < 4; ++p) store(wparts[p], bl.a_wcat + p * Hc * c_z, Hc * c_z);
  store(g.wo, bl.a_wo, c_z * Hc);
  store(g.bo, bl.a_bo, c_z);
  store(g.bg, bl.a_bg, Hc);
  store(g.ln_w, bl.a_lnw, c_z);
  store(g.ln_b, bl.a_lnb, c_z);
  store(g.wb, bl.a_wb, d.H * c_z);
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu {
HWY_EXPORT(TriangleAttend);
HWY_EXPORT(TriangleBackward);
}  // namespace cpu

size_t triangle_attention_forward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads) {
  return size_t(cpu_triangle::Layout(shape, threads).total) * sizeof(float);
}

namespace {

/// The regions the forward and the backward share (lay: the forward's layout): the packed
/// [q·log2(e)/√c | k | v | g] weights and biases, W_oᵀ, the pair bias b^h_jk and every row's mask
/// bias, in log2 units (one layer norm per pair; thread t's layer-norm row at xbufs + t·xstride).
void prepare(const triangle::TriangleShape& d, const TriangleWeightsF32& w, const TriangleActivations& x,
             float* base, const cpu_triangle::Layout& lay, float* xbufs, int64_t xstride, int threads) {
  using cpu_triangle::kLog2e;
  const int64_t N = d.N, H = d.H, c = d.c, c_z = d.c_z, Hc = lay.Hc, Np = lay.Np, Op = lay.Op;
  // Packed weights: [q·log2(e)/√c | k | v | g] transposed, biases; W_oᵀ.
  float* wproj = base + lay.wproj;
  float* bproj = base + lay.bproj;
  std::fill(wproj, wproj + c_z * Op, 0.f);
  std::fill(bproj, bproj + Op, 0.f);
  const float qscale = float(kLog2e / std::sqrt(double(c)));
  const float* parts[4] = {w.wq, w.wk, w.wv, w.wg};
  for (int p = 0; p < 4; ++p)
    for (int64_t o = 0; o < Hc; ++o)
      for (int64_t k = 0; k < c_z; ++k) wproj[k * Op + p * Hc + o] = (p == 0 ? qscale : 1.f) * parts[p][o * c_z + k];
#if !defined(ATTNBENCH_MUTANT_triangle_no_gate_bias)  // scripts/mutation-test.sh: the gate's bias is missing
  for (int64_t o = 0; o < Hc; ++o) bproj[3 * Hc + o] = w.bg[o];
#endif
  float* wo = base + lay.wo;
  float* bo = base + lay.bo;
  std::fill(wo, wo + Hc * lay.czp, 0.f);
  std::fill(bo, bo + lay.czp, 0.f);
  for (int64_t o = 0; o < c_z; ++o) {
    for (int64_t k = 0; k < Hc; ++k) wo[k * lay.czp + o] = w.wo[o * Hc + k];
    bo[o] = w.bo[o];
  }

  // Pair bias b^h_jk and mask bias of every row, in log2 units (one layer norm per pair).
  float* bias = base + lay.bias;
  float* mbias = base + lay.mbias;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t j = 0; j < N; ++j) {
    float* xr = xbufs + int64_t(omp_get_thread_num()) * xstride;
    for (int64_t k = 0; k < N; ++k) {
      cpu_triangle::layer_norm_pair(d, x.z, x.z_dtype, w, j, k, xr);
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.f;
        const float* wbh = w.wb + h * c_z;
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < c_z; ++e) acc += xr[e] * wbh[e];
        bias[(h * N + j) * Np + k] = float(kLog2e) * acc;
      }
    }
    for (int64_t h = 0; h < H; ++h)
      std::fill(bias + (h * N + j) * Np + N, bias + (h * N + j) * Np + Np, -std::numeric_limits<float>::infinity());
    float mmax = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < N; ++k) mmax = std::max(mmax, x.mask[d.pair(j, k)]);
#if defined(ATTNBENCH_MUTANT_triangle_ignore_mask)  // scripts/mutation-test.sh: the mask is ignored
    for (int64_t k = 0; k < N; ++k) mbias[j * Np + k] = 0.f * mmax;
#else
    for (int64_t k = 0; k < N; ++k) mbias[j * Np + k] = float(kLog2e) * triangle::mask_bias(x.mask[d.pair(j, k)], mmax);
#endif
    std::fill(mbias + j * Np + N, mbias + j * Np + Np, 0.f);
  }
}

}  // namespace

void triangle_attention_forward_fused(float* out, const triangle::TriangleShape& d, const TriangleWeightsF32& w,
                                      const TriangleActivations& x, void* scratch, int threads,
                                      const TriangleSaved* saved) {
  if (threads < 1) throw std::invalid_argument("triangle_attention_forward_fused: threads must be >= 1");
  const cpu_triangle::Layout lay(d, threads);
  float* base = static_cast<float*>(scratch);
  float* slabs = base + lay.slab;
  prepare(d, w, x, base, lay, slabs + lay.t_x, lay.per_thread, threads);
  const cpu_triangle::RowArgs args{&d, &lay, base, slabs, x.z, x.z_dtype, &w, out, saved};
  using namespace cpu;  // HWY_DYNAMIC_DISPATCH names a kernel unqualified (see trimul_forward)
  HWY_DYNAMIC_DISPATCH(TriangleAttend)(args, threads);
}

namespace {
int64_t backward_pack_floats(const triangle::TriangleShape& d) {
  return cpu::gemm_pack_floats(std::max(d.hidden(), d.c_z));
}
}  // namespace

size_t triangle_attention_backward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads) {
  return size_t(cpu_triangle::BackwardLayout(shape, threads, backward_pack_floats(shape)).total) * sizeof(float);
}

void triangle_attention_backward_fused(const TriangleGradsF32& g, const triangle::TriangleShape& d,
                                       const TriangleWeightsF32& w, const TriangleActivations& x, const void* dout,
                                       const TriangleSaved& saved, void* scratch, int threads) {
  if (threads < 1) throw std::invalid_argument("triangle_attention_backward_fused: threads must be >= 1");
  const cpu_triangle::BackwardLayout bl(d, threads, backward_pack_floats(d));
  float* base = static_cast<float*>(scratch);
  prepare(d, w, x, base, bl.fwd, base + bl.slab + bl.t_x, bl.per_thread, threads);
  // [W_q; W_k; W_v; W_g] (4·H·c rows of c_z): dx = dproj · this.
  const int64_t Hc = d.hidden();
  const float* parts[4] = {w.wq, w.wk, w.wv, w.wg};
  for (int p = 0; p < 4; ++p) std::copy_n(parts[p], Hc * d.c_z, base + bl.wcat + p * Hc * d.c_z);
  std::fill(base + bl.dblock, base + bl.total, 0.f);  // the double accumulators (0.0 is all-zero bits)
  const cpu_triangle::BackwardArgs args{&d, &bl, base, x.z, x.z_dtype, &w, dout, &saved, &g};
  using namespace cpu;
  HWY_DYNAMIC_DISPATCH(TriangleBackward)(args, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
