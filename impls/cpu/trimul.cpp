// Triangle multiplicative update, CPU forward and backward (AF2 Alg. 11/12, AF3 Alg. 12/13;
// math in reference/trimul.hpp, write-up and FLOP model in docs/trimul.md).
//
// Everything heavy is the kernels' register-blocked GEMM (impls/cpu/gemm.hpp), C = A·B, with A
// read through strides (so a transposed A costs nothing) and B packed into panels of NR columns
// per block of 256 k (so a transposed B costs one strided copy). Layouts (NN = N², M = 4·c_h + c_z):
//   pair-major   [NN, ·]  z, x = LN_in(z), P = x·[W_ap; W_ag; W_bp; W_bg; W_g]ᵀ + b (the gate
//                         columns hold the sigmoids), n_out, u = LN_out(t), y, out
//   channel-major [c_h, NN]  a, b and t: channel c is an N × N matrix, and the triangle product
//                         is one N × N × N GEMM per channel: outgoing T_c = A_c·B_cᵀ, incoming
//                         T_c = A_cᵀ·B_c (OpenMP over channels)
// Forward: LN_in → projection GEMM (NN × c_z × M) → gates (vectorized sigmoid) and the blocked
// transpose of a, b to channel-major → per-channel GEMMs → LN_out (blocked transpose back) →
// output GEMM (NN × c_h × c_z) → gate. Every stage is kept in the scratch for the backward.
// Backward: dy, the output gate's gradient → dW_o (a reduction GEMM over the NN pairs,
// split over threads) and du = dy·W_o → LN_out backward → per channel dA_c, dB_c as two GEMMs
// → the gates' chain rule into dP → dW = dPᵀ·x (reduction GEMM), dx = dP·W → LN_in backward.
// z and the cotangent may be bf16 or f16: they are widened to f32 where they are read (LN_in, dy);
// every product is f32 with f32 accumulation.
#include "impls/cpu/trimul.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "harness/dtype.hpp"
#include "impls/cpu/gemm.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_TRIMUL_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_TRIMUL_LAYOUT_
namespace attnbench::cpu_trimul {

inline constexpr int64_t kPairTile = 64;  // pairs per blocked transpose tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions, each 64-byte aligned.
struct Layout {
  int64_t NN, M, pack, tile, per_thread;
  // forward
  int64_t wcat, bcat, mean_in, rstd_in, x, P, A, B, T, nout, rstd_out, U, Y, slabs, fwd_total;
  // backward
  int64_t dy, dU, dA, dB, dP, dx, wpart, cpart, dwcat, dwo, csum, bwd_total;
  Layout(const TrimulShape& s, int threads) {
    NN = s.N * s.N;
    M = 4 * s.c_h + s.c_z;
    pack = cpu::gemm_pack_floats(std::max({M, s.N, s.c_z, s.c_h}));
    tile = std::max(s.c_h, s.c_z) * kPairTile;
    per_thread = round_up(pack + tile, 16);
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    wcat = take(M * s.c_z);
    bcat = take(M);
    mean_in = take(NN);
    rstd_in = take(NN);
    x = take(NN * s.c_z);
    P = take(NN * M);
    A = take(s.c_h * NN);
    B = take(s.c_h * NN);
    T = take(s.c_h * NN);
    nout = take(NN * s.c_h);
    rstd_out = take(NN);
    U = take(NN * s.c_h);
    Y = take(NN * s.c_z);
    slabs = take(per_thread * threads);
    fwd_total = at;
    dy = take(NN * s.c_z);
    dU = take(NN * s.c_h);
    dA = take(s.c_h * NN);
    dB = take(s.c_h * NN);
    dP = take(NN * M);
    dx = take(NN * s.c_z);
    wpart = take(int64_t(threads) * (M * s.c_z + s.c_z * s.c_h));
    cpart = take(2 * int64_t(threads) * (M + 3 * s.c_z + 2 * s.c_h));  // doubles
    dwcat = take(M * s.c_z);
    dwo = take(s.c_z * s.c_h);
    csum = take(M + 3 * s.c_z + 2 * s.c_h);
    bwd_total = at;
  }
};



}  // namespace attnbench::cpu_trimul
#endif  // ATTNBENCH_IMPLS_CPU_TRIMUL_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/trimul.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "impls/cpu/layer_norm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_trimul::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace attnbench::cpu_rows::HWY_NAMESPACE;  // Moments, LayerNormRows, ColumnSums, LayerNormBackwardRows

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

/// x[i] = sigmoid(x[i]) for n contiguous floats.
static HWY_INLINE void SigmoidInPlace(float* x, int64_t n) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  const VF one = hn::Set(d, 1.0f);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const VF v = hn::LoadU(d, x + i);
    hn::StoreU(hn::Div(one, hn::Add(one, hn::Exp(d, hn::Neg(v)))), d, x + i);
  }
  for (; i < n; ++i) x[i] = 1.0f / (1.0f + std::exp(-x[i]));
}

void Forward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& xa, void* scratch,
             int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t N = s.N, NN = lay.NN, M = lay.M, h = s.c_h, cz = s.c_z;
  float* wcat = base + lay.wcat;
  float* bcat = base + lay.bcat;
  float* mean_in = base + lay.mean_in;
  float* rstd_in = base + lay.rstd_in;
  float* X = base + lay.x;
  float* P = base + lay.P;
  float* Ac = base + lay.A;
  float* Bc = base + lay.B;
  float* Tc = base + lay.T;
  float* nout = base + lay.nout;
  float* rstd_out = base + lay.rstd_out;
  float* U = base + lay.U;
  float* Y = base + lay.Y;
  float* slabs = base + lay.slabs;

  // Concatenated projection weights [W_ap; W_ag; W_bp; W_bg; W_g] (M, c_z) and biases.
  const float* ws[5] = {w.w_ap, w.w_ag, w.w_bp, w.w_bg, w.w_g};
  const float* bs[5] = {w.b_ap, w.b_ag, w.b_bp, w.b_bg, w.b_g};
  for (int q = 0; q < 5; ++q) {
    const int64_t rows = q < 4 ? h : cz, r0 = q * h;
    std::memcpy(wcat + r0 * cz, ws[q], size_t(rows * cz) * sizeof(float));
    for (int64_t r = 0; r < rows; ++r) bcat[r0 + r] = bs[q] ? bs[q][r] : 0.0f;
  }

  // LN_in, pair-major.
  LayerNormRows(xa.z, xa.z_dtype, NN, cz, w.ln_in_w, w.ln_in_b, X, mean_in, rstd_in, threads);

  // P = x · Wcatᵀ, then biases and the sigmoids of the gate columns.
  cpu::gemm_rows(NN, M, cz, {X, cz, 1}, {wcat, 1, cz}, P, M, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < NN; ++r) {
    float* pr = P + r * M;
#pragma omp simd
    for (int64_t k = 0; k < M; ++k) pr[k] += bcat[k];
    SigmoidInPlace(pr + h, h);
    SigmoidInPlace(pr + 3 * h, h);
    SigmoidInPlace(pr + 4 * h, cz);
  }
  // a, b = mask ⊙ gate ⊙ projection, to channel-major, a tile of pairs at a time.
  const int64_t tiles = (NN + kPairTile - 1) / kPairTile;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kPairTile, r1 = std::min(NN, r0 + kPairTile);
    for (int64_t c = 0; c < h; ++c) {
      float* ac = Ac + c * NN;
      float* bc = Bc + c * NN;
      for (int64_t r = r0; r < r1; ++r) {
        const float* pr = P + r * M;
#if defined(ATTNBENCH_MUTANT_trimul_ignore_mask)  // scripts/mutation-test.sh: the mask is ignored
        const float m = 1.0f;
#else
        const float m = xa.mask[r];
#endif
        ac[r] = m * pr[c] * pr[h + c];
        bc[r] = m * pr[2 * h + c] * pr[3 * h + c];
      }
    }
  }

  // Triangle product per channel.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < h; ++c) {
    float* pack = slabs + omp_get_thread_num() * lay.per_thread;
    const float* A = Ac + c * NN;
    const float* B = Bc + c * NN;
    if (s.outgoing)  // T = A Bᵀ
      cpu::gemm_serial(N, N, N, {A, N, 1}, {B, 1, N}, Tc + c * NN, N, false, pack);
    else  // T = Aᵀ B
      cpu::gemm_serial(N, N, N, {A, 1, N}, {B, N, 1}, Tc + c * NN, N, false, pack);
  }

  // LN_out: a tile of pairs transposed back to pair-major.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kPairTile, r1 = std::min(NN, r0 + kPairTile);
    float* tile = slabs + omp_get_thread_num() * lay.per_thread + lay.pack;
    for (int64_t c = 0; c < h; ++c) {
      const float* tc = Tc + c * NN;
      for (int64_t r = r0; r < r1; ++r) tile[(r - r0) * h + c] = tc[r];
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float* tr = tile + (r - r0) * h;
      double mean, rstd;
      Moments(tr, h, mean, rstd);
      rstd_out[r] = float(rstd);
      float* nr = nout + r * h;
      float* ur = U + r * h;
#pragma omp simd
      for (int64_t c = 0; c < h; ++c) {
        nr[c] = float((double(tr[c]) - mean) * rstd);
        ur[c] = nr[c] * w.ln_out_w[c] + w.ln_out_b[c];
      }
    }
  }

  // y = u · W_oᵀ + b_o; out = sigmoid(g) ⊙ y.
  cpu::gemm_rows(NN, cz, h, {U, h, 1}, {w.w_o, 1, h}, Y, cz, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < NN; ++r) {
    float* yr = Y + r * cz;
    const float* g = P + r * M + 4 * h;
    float* o = xa.out + r * cz;
#pragma omp simd
    for (int64_t k = 0; k < cz; ++k) {
      yr[k] += w.b_o ? w.b_o[k] : 0.0f;
      o[k] = g[k] * yr[k];
    }
  }
}

void Backward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& xa, const TrimulGradsF32& gr,
              void* scratch, int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t N = s.N, NN = lay.NN, M = lay.M, h = s.c_h, cz = s.c_z;
  const float* wcat = base + lay.wcat;
  const float* mean_in = base + lay.mean_in;
  const float* rstd_in = base + lay.rstd_in;
  const float* X = base + lay.x;
  const float* P = base + lay.P;
  const float* Ac = base + lay.A;
  const float* Bc = base + lay.B;
  float* dTc = base + lay.T;  // t is not read again: its buffer holds dt
  const float* nout = base + lay.nout;
  const float* rstd_out = base + lay.rstd_out;
  const float* U = base + lay.U;
  const float* Y = base + lay.Y;
  float* dX = base + lay.dx;
  float* slabs = base + lay.slabs;
  float* dy = base + lay.dy;
  float* dU = base + lay.dU;
  float* dA = base + lay.dA;
  float* dB = base + lay.dB;
  float* dP = base + lay.dP;
  float* wpart = base + lay.wpart;
  double* cpart = reinterpret_cast<double*>(base + lay.cpart);
  float* dwcat = base + lay.dwcat;
  float* dwo = base + lay.dwo;
  float* csum = base + lay.csum;

  // dy = dout ⊙ g; the gate's pre-activation gradient dout ⊙ y ⊙ g (1 − g) into dP.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < NN; ++r) {
    const float* g = P + r * M + 4 * h;
    const float* yr = Y + r * cz;
    float* dyr = dy + r * cz;
    float* dg = dP + r * M + 4 * h;
    for (int64_t k = 0; k < cz; ++k) {
      const float d = load_float(xa.dout, xa.z_dtype, r * cz + k);
      dyr[k] = d * g[k];
      dg[k] = d * yr[k] * g[k] * (1.0f - g[k]);
    }
  }
  // dW_o = dyᵀ u (c_z, c_h); db_o = Σ dy; du = dy W_o.
  cpu::gemm_reduce(cz, h, NN, {dy, 1, cz}, {U, h, 1}, dwo, h, wpart, slabs, lay.per_thread, threads);
  ColumnSums(dy, NN, cz, cz, cpart, csum, threads);
  if (gr.w_o) std::memcpy(gr.w_o, dwo, size_t(cz * h) * sizeof(float));
  if (gr.b_o) std::memcpy(gr.b_o, csum, size_t(cz) * sizeof(float));
  cpu::gemm_rows(NN, h, cz, {dy, cz, 1}, {w.w_o, h, 1}, dU, h, false, slabs, lay.per_thread, threads);
  // LN_out backward (dU becomes dt, pair-major), then dt to channel-major.
  LayerNormBackwardRows(dU, {nout}, rstd_out, w.ln_out_w, NN, h, cpart, gr.ln_out_w, gr.ln_out_b, slabs + lay.pack,
                        lay.per_thread, threads);
  const int64_t tiles = (NN + kPairTile - 1) / kPairTile;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kPairTile, r1 = std::min(NN, r0 + kPairTile);
    for (int64_t c = 0; c < h; ++c)
      for (int64_t r = r0; r < r1; ++r) dTc[c * NN + r] = dU[r * h + c];
  }

  // Triangle product backward, per channel.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < h; ++c) {
    float* pack = slabs + omp_get_thread_num() * lay.per_thread;
    const float* A = Ac + c * NN;
    const float* B = Bc + c * NN;
    const float* dT = dTc + c * NN;
    if (s.outgoing) {  // T = A Bᵀ: dA = dT B, dB = dTᵀ A
      cpu::gemm_serial(N, N, N, {dT, N, 1}, {B, N, 1}, dA + c * NN, N, false, pack);
      cpu::gemm_serial(N, N, N, {dT, 1, N}, {A, N, 1}, dB + c * NN, N, false, pack);
    } else {  // T = Aᵀ B: dA = B dTᵀ, dB = A dT
      cpu::gemm_serial(N, N, N, {B, N, 1}, {dT, 1, N}, dA + c * NN, N, false, pack);
      cpu::gemm_serial(N, N, N, {A, N, 1}, {dT, N, 1}, dB + c * NN, N, false, pack);
    }
  }

  // The gates' chain rule into dP (pair-major), a tile of pairs at a time.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * kPairTile, r1 = std::min(NN, r0 + kPairTile);
    for (int64_t c = 0; c < h; ++c) {
      const float* da = dA + c * NN;
      const float* db = dB + c * NN;
      for (int64_t r = r0; r < r1; ++r) {
        const float* pr = P + r * M;
        float* dr = dP + r * M;
        const float m = xa.mask[r];
        const float ga = pr[h + c], gb = pr[3 * h + c];
        const float a_ = da[r] * m, b_ = db[r] * m;
        dr[c] = a_ * ga;
        dr[h + c] = a_ * pr[c] * ga * (1.0f - ga);
        dr[2 * h + c] = b_ * gb;
        dr[3 * h + c] = b_ * pr[2 * h + c] * gb * (1.0f - gb);
      }
    }
  }

  // dWcat = dPᵀ x (M, c_z); dbcat = Σ dP; dx = dP Wcat.
  cpu::gemm_reduce(M, cz, NN, {dP, 1, M}, {X, cz, 1}, dwcat, cz, wpart, slabs, lay.per_thread, threads);
  ColumnSums(dP, NN, M, M, cpart, csum, threads);
  float* gw[5] = {gr.w_ap, gr.w_ag, gr.w_bp, gr.w_bg, gr.w_g};
  float* gb[5] = {gr.b_ap, gr.b_ag, gr.b_bp, gr.b_bg, gr.b_g};
  for (int q = 0; q < 5; ++q) {
    const int64_t rows = q < 4 ? h : cz, r0 = q * h;
    if (gw[q]) std::memcpy(gw[q], dwcat + r0 * cz, size_t(rows * cz) * sizeof(float));
    if (gb[q]) std::memcpy(gb[q], csum + r0, size_t(rows) * sizeof(float));
  }
  cpu::gemm_rows(NN, cz, M, {dP, M, 1}, {wcat, cz, 1}, dX, cz, false, slabs, lay.per_thread, threads);
  // LN_in backward: dx → dz.
  LayerNormBackwardRows(dX, {nullptr, xa.z, xa.z_dtype, mean_in}, rstd_in, w.ln_in_w, NN, cz, cpart, gr.ln_in_w,
                        gr.ln_in_b, slabs + lay.pack, lay.per_thread, threads);
  std::memcpy(xa.dz, dX, size_t(NN * cz) * sizeof(float));
}

}  // namespace attnbench::cpu_trimul::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu_trimul {
HWY_EXPORT(Forward);
HWY_EXPORT(Backward);
}  // namespace cpu_trimul

size_t trimul_forward_scratch_bytes(const TrimulShape& s, int threads) {
  return size_t(cpu_trimul::Layout(s, threads).fwd_total) * sizeof(float);
}
size_t trimul_backward_scratch_bytes(const TrimulShape& s, int threads) {
  return size_t(cpu_trimul::Layout(s, threads).bwd_total) * sizeof(float);
}

void trimul_forward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& x, void* scratch,
                    int threads) {
  // Unqualified, from the namespace of its HWY_EXPORT: a build of one Highway target
  // (ATTNBENCH_HWY_TARGETS=native|baseline) expands this to HWY_NAMESPACE::Forward.
  using namespace cpu_trimul;
  HWY_DYNAMIC_DISPATCH(Forward)(s, w, x, scratch, threads);
}
void trimul_backward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& x,
                     const TrimulGradsF32& g, void* scratch, int threads) {
  using namespace cpu_trimul;
  HWY_DYNAMIC_DISPATCH(Backward)(s, w, x, g, scratch, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
