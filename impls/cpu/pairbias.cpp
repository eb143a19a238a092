// Attention with pair bias on the single representation, CPU forward and backward (math in
// reference/pairbias.hpp, write-up and FLOP model in docs/pairbias.md).
//
// The pair track dominates the bytes (z is N²·c_z), the attention the FLOPs only for large N:
//   ŝ = LN_s(s) → [q | k | v | g] = ŝ·[W_q; W_k; W_v; W_g]ᵀ (one GEMM, the gate's sigmoid after)
//   ẑ = LN_z(z) → b = ẑ·W_zᵀ (N² × H × c_z GEMM) → transposed to per-head rows (H, N, N)
//   per (head, tile of 64 query rows), OpenMP: S = q·kᵀ (GEMM), + b + μ, an exact softmax over
//   the whole row (N keys fit: the tile is 64 × N floats), its log-sum-exp kept, O = P·v (GEMM)
//   y = g ⊙ O → out = y·W_oᵀ.
// Backward (FlashAttention-2's, per head, recomputing P from the log-sum-exp, one head per
// thread at a time so dk and dv accumulate without races): dv += Pᵀ·do, dP = do·vᵀ,
// dS = P ⊙ (dP − Δ) written into the pair bias's gradient, dq = dS·k, dk += dSᵀ·q; then
// dW_z = dbᵀ·ẑ and dẑ = db·W_z → LN_z backward → dz; dW = d[q|k|v|g]ᵀ·ŝ, dŝ → LN_s backward.
// Every GEMM is the kernels' register-blocked one (impls/cpu/gemm.hpp). s, z and the cotangent
// may be bf16 or f16: widened to f32 where read.
#include "impls/cpu/pairbias.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "harness/dtype.hpp"
#include "impls/cpu/gemm.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_PAIRBIAS_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_PAIRBIAS_LAYOUT_
namespace attnbench::cpu_pair_bias {

inline constexpr int64_t kTileQ = 64;  // query rows per attention tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions, each 64-byte aligned.
struct Layout {
  int64_t NN, Np, P4, pack, per_thread;
  // forward (kept for the backward)
  int64_t wcat, bcat, mean_s, rstd_s, sh, proj, mean_z, rstd_z, zh, bz, bias, mu, o, lse, y, slabs, fwd_total;
  int64_t t_s, t_dp, t_row;  // within a slab, after the GEMM packing
  // backward
  int64_t dout, dy, dproj, delta, dbias, dbz, wpart, dpart, dwcat, csum, bwd_total;
  Layout(const PairBiasShape& s, int threads) {
    NN = s.N * s.N;
    Np = round_up(s.N, 16);
    P4 = 4 * s.c_s;
    pack = round_up(cpu::gemm_pack_floats(std::max({P4, s.N, s.c_z, s.c_s})), 16);
    t_s = pack;
    t_dp = t_s + kTileQ * Np;
    t_row = t_dp + kTileQ * Np;
    per_thread = t_row + round_up(std::max(s.c_s, s.c_z), 16);
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    wcat = take(P4 * s.c_s);
    bcat = take(P4);
    mean_s = take(s.N);
    rstd_s = take(s.N);
    sh = take(s.N * s.c_s);
    proj = take(s.N * P4);
    mean_z = take(NN);
    rstd_z = take(NN);
    zh = take(NN * s.c_z);
    bz = take(NN * s.H);
    bias = take(s.H * s.N * Np);
    mu = take(Np);
    o = take(s.N * s.c_s);
    lse = take(s.H * s.N);
    y = take(s.N * s.c_s);
    slabs = take(per_thread * threads);
    fwd_total = at;
    dout = take(s.N * s.c_s);
    dy = take(s.N * s.c_s);
    dproj = take(s.N * P4);
    delta = take(s.H * s.N);
    dbias = take(s.H * s.N * Np);
    dbz = take(NN * s.H);
    wpart = take(int64_t(threads) * std::max({P4 * s.c_s, s.H * s.c_z}));
    dpart = take(2 * int64_t(threads) * 2 * std::max(s.c_s, s.c_z));  // doubles
    dwcat = take(P4 * s.c_s);
    csum = take(s.c_s);
    bwd_total = at;
  }
};

}  // namespace attnbench::cpu_pair_bias
#endif  // ATTNBENCH_IMPLS_CPU_PAIRBIAS_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/pairbias.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "impls/cpu/layer_norm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_pair_bias::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace attnbench::cpu_rows::HWY_NAMESPACE;  // LayerNormRows, ColumnSums, LayerNormBackwardRows

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

/// The operands of one head's attention, shared by the forward and the backward.
struct Head {
  const PairBiasShape* s;
  const Layout* lay;
  const float* base;
  int64_t h;
  float scale;
};

/// Probabilities of query rows [i0, i0 + rows) of a head into p (rows × Np): the scores
/// q·kᵀ·scale + b + μ, then either the softmax (lse null: the forward, which stores each
/// row's log-sum-exp into lse_out) or exp(score − lse) from the forward's log-sum-exp.
static void Probabilities(const Head& hd, int64_t i0, int64_t rows, float* p, float* pack, const float* lse,
                          float* lse_out) {
  const PairBiasShape& s = *hd.s;
  const Layout& lay = *hd.lay;
  const int64_t N = s.N, Np = lay.Np, dh = s.c_s / s.H, P4 = lay.P4;
  const float* q = hd.base + lay.proj + i0 * P4 + hd.h * dh;
  const float* k = hd.base + lay.proj + s.c_s + hd.h * dh;
  cpu::gemm_serial(rows, N, dh, {q, P4, 1}, {k, 1, P4}, p, Np, false, pack);
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  const VF vscale = hn::Set(d, hd.scale);
  const float* mu = hd.base + lay.mu;
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = p + r * Np;
    const float* br = hd.base + lay.bias + (hd.h * N + i0 + r) * Np;
    int64_t j = 0;
    VF vmax = hn::Set(d, -std::numeric_limits<float>::infinity());
    for (; j + L <= N; j += L) {
      const VF x = hn::Add(hn::MulAdd(hn::LoadU(d, pr + j), vscale, hn::Load(d, br + j)), hn::Load(d, mu + j));
      hn::StoreU(x, d, pr + j);
      vmax = hn::Max(vmax, x);
    }
    float m = hn::GetLane(hn::MaxOfLanes(d, vmax));
    for (; j < N; ++j) {
      pr[j] = pr[j] * hd.scale + br[j] + mu[j];
      m = std::max(m, pr[j]);
    }
    // Shift: the row maximum (forward) or the saved log-sum-exp (backward).
    const float shift = lse ? lse[hd.h * N + i0 + r] : m;
    const VF vshift = hn::Set(d, shift);
    VF vsum = hn::Zero(d);
    for (j = 0; j + L <= N; j += L) {
      const VF e = hn::Exp(d, hn::Sub(hn::LoadU(d, pr + j), vshift));
      hn::StoreU(e, d, pr + j);
      vsum = hn::Add(vsum, e);
    }
    float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
    for (; j < N; ++j) {
      pr[j] = pr[j] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(pr[j] - shift);
      sum += pr[j];
    }
    if (lse) continue;
    // Some key of every row is valid (μ keeps all keys when every key is masked): sum ≥ 1.
    const float inv = 1.0f / sum;
    for (j = 0; j < N; ++j) pr[j] *= inv;
    lse_out[hd.h * N + i0 + r] = m + std::log(sum);
  }
}

void Forward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& xa, void* scratch,
             int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t N = s.N, NN = lay.NN, Np = lay.Np, cs = s.c_s, cz = s.c_z, H = s.H, P4 = lay.P4, dh = cs / H;
  float* wcat = base + lay.wcat;
  float* bcat = base + lay.bcat;
  float* proj = base + lay.proj;
  float* slabs = base + lay.slabs;
  const float* ws[4] = {w.wq, w.wk, w.wv, w.wg};
  for (int p = 0; p < 4; ++p) std::memcpy(wcat + p * cs * cs, ws[p], size_t(cs * cs) * sizeof(float));
  std::fill(bcat, bcat + P4, 0.0f);
  std::memcpy(bcat, w.bq, size_t(cs) * sizeof(float));

  // The single track: ŝ, then [q | k | v | g] with q's bias and the gate's sigmoid.
  LayerNormRows(xa.s, xa.dtype, N, cs, w.ln_s_w, w.ln_s_b, base + lay.sh, base + lay.mean_s, base + lay.rstd_s,
                threads);
  cpu::gemm_rows(N, P4, cs, {base + lay.sh, cs, 1}, {wcat, 1, cs}, proj, P4, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i) {
    float* pr = proj + i * P4;
    for (int64_t e = 0; e < cs; ++e) pr[e] += bcat[e];
    for (int64_t e = 3 * cs; e < P4; ++e) pr[e] = 1.0f / (1.0f + std::exp(-pr[e]));
  }

  // The pair track: ẑ, the bias b (N², H), per-head rows (H, N, Np); μ.
  LayerNormRows(xa.z, xa.dtype, NN, cz, w.ln_z_w, w.ln_z_b, base + lay.zh, base + lay.mean_z, base + lay.rstd_z,
                threads);
  cpu::gemm_rows(NN, H, cz, {base + lay.zh, cz, 1}, {w.wz, 1, cz}, base + lay.bz, H, false, slabs, lay.per_thread,
                 threads);
  float* bias = base + lay.bias;
  const float* bz = base + lay.bz;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h) {
      float* row = bias + (h * N + i) * Np;
      for (int64_t j = 0; j < N; ++j) row[j] = bz[(i * N + j) * H + h];
      std::fill(row + N, row + Np, 0.0f);
    }
  float* mu = base + lay.mu;
  bool any = false;
  for (int64_t j = 0; j < N; ++j) any = any || xa.mask[j] != 0.0f;
  for (int64_t j = 0; j < Np; ++j) {
#if defined(ATTNBENCH_MUTANT_pairbias_ignore_mask)  // scripts/mutation-test.sh: the key mask is ignored
    const bool masked = j >= N;
#else
    const bool masked = j >= N || (any && xa.mask[j] == 0.0f);
#endif
    mu[j] = masked ? -std::numeric_limits<float>::infinity() : 0.0f;
  }

  // Attention, per (head, query tile).
  const int64_t tiles = (N + kTileQ - 1) / kTileQ;
  const float scale = 1.0f / std::sqrt(float(dh));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < H * tiles; ++t) {
    float* slab = slabs + omp_get_thread_num() * lay.per_thread;
    const int64_t h = t / tiles, i0 = (t % tiles) * kTileQ, rows = std::min(kTileQ, N - i0);
    const Head hd{&s, &lay, base, h, scale};
    float* p = slab + lay.t_s;
    Probabilities(hd, i0, rows, p, slab, nullptr, base + lay.lse);
    cpu::gemm_serial(rows, dh, N, {p, Np, 1}, {proj + 2 * cs + h * dh, P4, 1}, base + lay.o + i0 * cs + h * dh, cs,
                     false, slab);
  }

  // y = g ⊙ O; out = y W_oᵀ.
  float* y = base + lay.y;
  const float* o = base + lay.o;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t e = 0; e < cs; ++e) y[i * cs + e] = proj[i * P4 + 3 * cs + e] * o[i * cs + e];
  cpu::gemm_rows(N, cs, cs, {y, cs, 1}, {w.wo, 1, cs}, xa.out, cs, false, slabs, lay.per_thread, threads);
}

void Backward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& xa,
              const PairBiasGradsF32& g, void* scratch, int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t N = s.N, NN = lay.NN, Np = lay.Np, cs = s.c_s, cz = s.c_z, H = s.H, P4 = lay.P4, dh = cs / H;
  const float* proj = base + lay.proj;
  const float* o = base + lay.o;
  float* slabs = base + lay.slabs;
  float* dy = base + lay.dy;
  float* dproj = base + lay.dproj;
  float* delta = base + lay.delta;
  float* dbias = base + lay.dbias;
  float* dbz = base + lay.dbz;
  float* wpart = base + lay.wpart;
  double* dpart = reinterpret_cast<double*>(base + lay.dpart);

  // The cotangent in f32 (read in place when it is f32 already); dW_o = doutᵀ y; dy = dout W_o.
  const float* dout = static_cast<const float*>(xa.dout);
  if (xa.dtype != DType::f32) {
    float* widened = base + lay.dout;
    for (int64_t i = 0; i < N * cs; ++i) widened[i] = load_float(xa.dout, xa.dtype, i);
    dout = widened;
  }
  cpu::gemm_reduce(cs, cs, N, {dout, 1, cs}, {base + lay.y, cs, 1}, g.wo, cs, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(N, cs, cs, {dout, cs, 1}, {w.wo, cs, 1}, dy, cs, false, slabs, lay.per_thread, threads);
  // do = dy ⊙ g (in place), the gate's pre-activation gradient into dproj; Δ = rowsum(do ⊙ O) per head.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t e = 0; e < cs; ++e) {
      const float gv = proj[i * P4 + 3 * cs + e], d = dy[i * cs + e];
      dproj[i * P4 + 3 * cs + e] = d * o[i * cs + e] * gv * (1.0f - gv);
      dy[i * cs + e] = d * gv;
    }
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0;
#if defined(ATTNBENCH_MUTANT_pairbias_bwd_delta_gated)  // scripts/mutation-test.sh: Δ from the gated output
      for (int64_t e = h * dh; e < (h + 1) * dh; ++e) acc += dy[i * cs + e] * o[i * cs + e] * proj[i * P4 + 3 * cs + e];
#else
      for (int64_t e = h * dh; e < (h + 1) * dh; ++e) acc += dy[i * cs + e] * o[i * cs + e];
#endif
      delta[h * N + i] = acc;
    }
  }

  // Per head: recompute P per query tile; dv, dk accumulate over the tiles (one thread per head).
  const int64_t tiles = (N + kTileQ - 1) / kTileQ;
  const float scale = 1.0f / std::sqrt(float(dh));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t h = 0; h < H; ++h) {
    float* slab = slabs + omp_get_thread_num() * lay.per_thread;
    float* p = slab + lay.t_s;
    float* dp = slab + lay.t_dp;
    const Head hd{&s, &lay, base, h, scale};
    const float* q = proj + h * dh;
    const float* k = proj + cs + h * dh;
    const float* v = proj + 2 * cs + h * dh;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i0 = t * kTileQ, rows = std::min(kTileQ, N - i0);
      const bool acc = t > 0;
      Probabilities(hd, i0, rows, p, slab, base + lay.lse, nullptr);
      const float* dot = dy + i0 * cs + h * dh;  // do of the tile's rows
      cpu::gemm_serial(N, dh, rows, {p, 1, Np}, {dot, cs, 1}, dproj + 2 * cs + h * dh, P4, acc, slab);  // dv
      cpu::gemm_serial(rows, N, dh, {dot, cs, 1}, {v, 1, P4}, dp, Np, false, slab);                     // dP
      float* ds = dbias + (h * N + i0) * Np;  // dS is the pair bias's gradient
      for (int64_t r = 0; r < rows; ++r) {
        const float dl = delta[h * N + i0 + r];
        for (int64_t j = 0; j < N; ++j) ds[r * Np + j] = p[r * Np + j] * (dp[r * Np + j] - dl);
      }
      cpu::gemm_serial(rows, dh, N, {ds, Np, 1}, {k, P4, 1}, dproj + i0 * P4 + h * dh, P4, false, slab);     // dq
      cpu::gemm_serial(N, dh, rows, {ds, 1, Np}, {q + i0 * P4, P4, 1}, dproj + cs + h * dh, P4, acc, slab);  // dk
    }
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t e = 0; e < 2 * cs; ++e) dproj[i * P4 + e] *= scale;

      // The pair track: db to pair-major, dW_z = dbᵀ ẑ, dẑ = db W_z → LN_z backward → dz.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const float* row = dbias + (h * N + i) * Np;
      for (int64_t j = 0; j < N; ++j) dbz[(i * N + j) * H + h] = row[j];
    }
  cpu::gemm_reduce(H, cz, NN, {dbz, 1, H}, {base + lay.zh, cz, 1}, g.wz, cz, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(NN, cz, H, {dbz, H, 1}, {w.wz, cz, 1}, xa.dz, cz, false, slabs, lay.per_thread, threads);
  LayerNormBackwardRows(xa.dz, {nullptr, xa.z, xa.dtype, base + lay.mean_z}, base + lay.rstd_z, w.ln_z_w, NN, cz, dpart,
                        g.ln_z_w, g.ln_z_b, slabs + lay.t_row, lay.per_thread, threads);

  // The single track: dW = d[q|k|v|g]ᵀ ŝ, db_q = Σ dq, dŝ = d[q|k|v|g] [W_q; W_k; W_v; W_g] → LN_s backward.
  float* dwcat = base + lay.dwcat;
  cpu::gemm_reduce(P4, cs, N, {dproj, 1, P4}, {base + lay.sh, cs, 1}, dwcat, cs, wpart, slabs, lay.per_thread, threads);
  float* gw[4] = {g.wq, g.wk, g.wv, g.wg};
  for (int p = 0; p < 4; ++p) std::memcpy(gw[p], dwcat + p * cs * cs, size_t(cs * cs) * sizeof(float));
  ColumnSums(dproj, N, cs, P4, dpart, g.bq, threads);
  cpu::gemm_rows(N, cs, P4, {dproj, P4, 1}, {base + lay.wcat, cs, 1}, xa.ds, cs, false, slabs, lay.per_thread, threads);
  LayerNormBackwardRows(xa.ds, {nullptr, xa.s, xa.dtype, base + lay.mean_s}, base + lay.rstd_s, w.ln_s_w, N, cs, dpart,
                        g.ln_s_w, g.ln_s_b, slabs + lay.t_row, lay.per_thread, threads);
}

}  // namespace attnbench::cpu_pair_bias::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu_pair_bias {
HWY_EXPORT(Forward);
HWY_EXPORT(Backward);
}  // namespace cpu_pair_bias

size_t pair_bias_forward_scratch_bytes(const PairBiasShape& s, int threads) {
  return size_t(cpu_pair_bias::Layout(s, threads).fwd_total) * sizeof(float);
}
size_t pair_bias_backward_scratch_bytes(const PairBiasShape& s, int threads) {
  return size_t(cpu_pair_bias::Layout(s, threads).bwd_total) * sizeof(float);
}

void pair_bias_forward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& x, void* scratch,
                       int threads) {
  using namespace cpu_pair_bias;  // a one-target build expands the macro to HWY_NAMESPACE::Forward
  HWY_DYNAMIC_DISPATCH(Forward)(s, w, x, scratch, threads);
}
void pair_bias_backward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& x,
                        const PairBiasGradsF32& g, void* scratch, int threads) {
  using namespace cpu_pair_bias;
  HWY_DYNAMIC_DISPATCH(Backward)(s, w, x, g, scratch, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
