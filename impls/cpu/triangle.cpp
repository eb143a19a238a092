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
};


/// x (c_z) = LayerNorm of pair (a, b) of the problem.
inline void layer_norm_pair(const triangle::TriangleShape& d, const void* z, DType zt, const TriangleWeightsF32& w,
                            int64_t a, int64_t b, float* x) {
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
  for (int64_t k = 0; k < d.c_z; ++k) x[k] = triangle::layer_norm_apply(x[k], mean, inv, w.ln_w[k], w.ln_b[k]);
}

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
      // Normalize and gate into the concatenation.
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
        const float* g = proj + (j0 + r) * Op + 3 * Hc + h * c;
        for (int64_t e = 0; e < c; ++e) cat[(j0 + r) * Hc + h * c + e] = o[r * Dp + e] * inv * triangle::sigmoid(g[e]);
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

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu {
HWY_EXPORT(TriangleAttend);
}  // namespace cpu

size_t triangle_attention_forward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads) {
  return size_t(cpu_triangle::Layout(shape, threads).total) * sizeof(float);
}

void triangle_attention_forward_fused(float* out, const triangle::TriangleShape& d, const TriangleWeightsF32& w,
                                      const TriangleActivations& x, void* scratch, int threads) {
  using cpu_triangle::kLog2e;
  using cpu_triangle::Layout;
  if (threads < 1) throw std::invalid_argument("triangle_attention_forward_fused: threads must be >= 1");
  const Layout lay(d, threads);
  float* base = static_cast<float*>(scratch);
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
  float* slabs = base + lay.slab;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t j = 0; j < N; ++j) {
    float* xr = slabs + int64_t(omp_get_thread_num()) * lay.per_thread + lay.t_x;
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

  const cpu_triangle::RowArgs args{&d, &lay, base, slabs, x.z, x.z_dtype, &w, out};
  HWY_DYNAMIC_DISPATCH(cpu::TriangleAttend)(args, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
