// The double-attention pair block, CPU forward and backward (math in reference/doubleattn.hpp,
// write-up and FLOP model in docs/doubleattn.md).
//
// Layouts (E = N² edges, P = [F | G | K] is E × 3D): one GEMM for the three projections, a
// column softmax of F over the E edges (per-thread partial maxima and sums, combined in thread
// order: deterministic for a thread count), a row softmax of K, V = Aᵀ·G (a reduction GEMM over
// the edges), Y = Q·V, out = Y·W_oᵀ + b_o (the block adds z). The backward runs the same GEMMs transposed
// (docs/doubleattn.md). Every product is the kernels' register-blocked GEMM
// (impls/cpu/gemm.hpp); z and the cotangent may be bf16 or f16, widened to f32 once.
#include "impls/cpu/doubleattn.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "harness/dtype.hpp"
#include "impls/cpu/gemm.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_DOUBLEATTN_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_DOUBLEATTN_LAYOUT_
namespace attnbench::cpu_doubleattn {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions, each 64-byte aligned.
struct Layout {
  int64_t E, P3, per_thread;
  int64_t wcat, bcat, x, P, V, Y, vpart, cpart, slabs, fwd_total;  // forward (kept for the backward)
  int64_t dout, dY, dP, dV, wpart, dwcat, csum, bwd_total;         // backward
  Layout(const DoubleAttnShape& s, int threads) {
    E = s.N * s.N;
    P3 = 3 * s.D;
    per_thread = round_up(cpu::gemm_pack_floats(std::max(P3, s.c_z)), 16);
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    wcat = take(P3 * s.c_z);
    bcat = take(P3);
    x = take(E * s.c_z);  // z in f32 (used only when z is 16-bit)
    P = take(E * P3);
    V = take(s.D * s.D);
    Y = take(E * s.D);
    vpart = take(int64_t(threads) * s.D * s.D);                         // V's partial sums
    cpart = take(4 * int64_t(threads) * std::max(P3, s.c_z) + 4 * P3);  // doubles
    slabs = take(per_thread * threads);
    fwd_total = at;
    dout = take(E * s.c_z);
    dY = take(E * s.D);
    dP = take(E * P3);
    dV = take(s.D * s.D);
    wpart = take(int64_t(threads) * std::max({P3 * s.c_z, s.c_z * s.D, s.D * s.D}));
    dwcat = take(P3 * s.c_z);
    csum = take(std::max(P3, s.c_z));
    bwd_total = at;
  }
};

}  // namespace attnbench::cpu_doubleattn
#endif  // ATTNBENCH_IMPLS_CPU_DOUBLEATTN_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/doubleattn.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "impls/cpu/layer_norm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_doubleattn::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace attnbench::cpu_rows::HWY_NAMESPACE;  // ColumnSums

/// x[i] = exp(x[i] − shift) for n floats.
static void ExpShifted(float* x, int64_t n, float shift) {
  const hn::ScalableTag<float> d;
  const int64_t L = int64_t(hn::Lanes(d));
  const auto vs = hn::Set(d, shift);
  int64_t i = 0;
  for (; i + L <= n; i += L) hn::StoreU(hn::Exp(d, hn::Sub(hn::LoadU(d, x + i), vs)), d, x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i] - shift);
}

/// The columns [0, D) of P (rows of stride ld) become their softmax over the E rows: per-thread
/// partial maxima, then exp and per-thread partial sums in double, combined in thread order.
static void SoftmaxColumns(float* P, int64_t E, int64_t D, int64_t ld, double* part, int threads) {
  double* gmax = part + 2 * int64_t(threads) * D;
  double* gsum = gmax + D;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    double* pm = part + t * D;
    std::fill(pm, pm + D, -std::numeric_limits<double>::infinity());
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) pm[d] = std::max(pm[d], double(P[e * ld + d]));
#pragma omp single
    for (int64_t d = 0; d < D; ++d) {
      double m = -std::numeric_limits<double>::infinity();
      for (int u = 0; u < nt; ++u) m = std::max(m, part[u * D + d]);
      gmax[d] = m;
    }
    double* ps = part + (nt + t) * D;
    std::fill(ps, ps + D, 0.0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) {
        const float v = std::exp(P[e * ld + d] - float(gmax[d]));
        P[e * ld + d] = v;
        ps[d] += double(v);
      }
#pragma omp single
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int u = 0; u < nt; ++u) s += part[(nt + u) * D + d];
      gsum[d] = 1.0 / s;
    }
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) P[e * ld + d] = float(double(P[e * ld + d]) * gsum[d]);
  }
}

void Forward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& xa, void* scratch,
             int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t E = lay.E, D = s.D, cz = s.c_z, P3 = lay.P3;
  float* wcat = base + lay.wcat;
  float* bcat = base + lay.bcat;
  float* P = base + lay.P;
  float* slabs = base + lay.slabs;
  const float* ws[3] = {w.wf, w.wg, w.wh};
  const float* bs[3] = {nullptr, w.bg, w.bh};  // F has no bias
  for (int q = 0; q < 3; ++q) {
    std::memcpy(wcat + q * D * cz, ws[q], size_t(D * cz) * sizeof(float));
    for (int64_t k = 0; k < D; ++k) bcat[q * D + k] = bs[q] ? bs[q][k] : 0.0f;
  }
  const float* X = static_cast<const float*>(xa.z);
  if (xa.z_dtype != DType::f32) {
    float* x = base + lay.x;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < E * cz; ++i) x[i] = load_float(xa.z, xa.z_dtype, i);
    X = x;
  }
  // [F | G | K] = X Wcatᵀ + b; A = column softmax of F; Q = row softmax of K.
  cpu::gemm_rows(E, P3, cz, {X, cz, 1}, {wcat, 1, cz}, P, P3, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t e = 0; e < E; ++e) {
    float* pr = P + e * P3;
    for (int64_t k = 0; k < P3; ++k) pr[k] += bcat[k];
    float* q = pr + 2 * D;
    const float m = *std::max_element(q, q + D);
    ExpShifted(q, D, m);
    float sum = 0;
    for (int64_t k = 0; k < D; ++k) sum += q[k];
#if defined(ATTNBENCH_MUTANT_doubleattn_unnormalized_distribute)  // scripts/mutation-test.sh: Q not normalized
    sum = 1.0f;
#endif
    for (int64_t k = 0; k < D; ++k) q[k] /= sum;
  }
  SoftmaxColumns(P, E, D, P3, reinterpret_cast<double*>(base + lay.cpart), threads);
  // V = Aᵀ G (D × D, a sum over the edges); Y = Q V; out = Y W_oᵀ + b_o.
  float* V = base + lay.V;
  float* Y = base + lay.Y;
  cpu::gemm_reduce(D, D, E, {P, 1, P3}, {P + D, P3, 1}, V, D, base + lay.vpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(E, D, D, {P + 2 * D, P3, 1}, {V, D, 1}, Y, D, false, slabs, lay.per_thread, threads);
  cpu::gemm_rows(E, cz, D, {Y, D, 1}, {w.wo, 1, D}, xa.out, cz, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t k = 0; k < cz; ++k) xa.out[e * cz + k] += w.bo[k];
}

void Backward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& xa,
              const DoubleAttnGradsF32& g, void* scratch, int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t E = lay.E, D = s.D, cz = s.c_z, P3 = lay.P3;
  const float* P = base + lay.P;
  const float* V = base + lay.V;
  const float* Y = base + lay.Y;
  float* slabs = base + lay.slabs;
  float* dY = base + lay.dY;
  float* dP = base + lay.dP;
  float* dV = base + lay.dV;
  float* wpart = base + lay.wpart;
  double* cpart = reinterpret_cast<double*>(base + lay.cpart);
  const float* X = xa.z_dtype == DType::f32 ? static_cast<const float*>(xa.z) : base + lay.x;
  const float* dout = static_cast<const float*>(xa.dout);
  if (xa.z_dtype != DType::f32) {
    float* widened = base + lay.dout;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < E * cz; ++i) widened[i] = load_float(xa.dout, xa.z_dtype, i);
    dout = widened;
  }
  // dW_o = doutᵀ Y, db_o = Σ dout; dY = dout W_o.
  cpu::gemm_reduce(cz, D, E, {dout, 1, cz}, {Y, D, 1}, g.wo, D, wpart, slabs, lay.per_thread, threads);
  ColumnSums(dout, E, cz, cz, cpart, g.bo, threads);
  cpu::gemm_rows(E, D, cz, {dout, cz, 1}, {w.wo, D, 1}, dY, D, false, slabs, lay.per_thread, threads);
  // dV = Qᵀ dY; dQ = dY Vᵀ, then the row softmax's backward into dK.
  cpu::gemm_reduce(D, D, E, {P + 2 * D, 1, P3}, {dY, D, 1}, dV, D, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(E, D, D, {dY, D, 1}, {V, 1, D}, dP + 2 * D, P3, false, slabs, lay.per_thread, threads);
  // dA = G dVᵀ; dG = A dV.
  cpu::gemm_rows(E, D, D, {P + D, P3, 1}, {dV, 1, D}, dP, P3, false, slabs, lay.per_thread, threads);
  cpu::gemm_rows(E, D, D, {P, P3, 1}, {dV, D, 1}, dP + D, P3, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t e = 0; e < E; ++e) {
    const float* q = P + e * P3 + 2 * D;
    float* dq = dP + e * P3 + 2 * D;
    float r = 0;
    for (int64_t k = 0; k < D; ++k) r += dq[k] * q[k];
    for (int64_t k = 0; k < D; ++k) dq[k] = q[k] * (dq[k] - r);
  }
  // The column softmax's backward: dF = A ⊙ (dA − Σ_e dA ⊙ A), the sums in double.
  double* ca = cpart + 2 * int64_t(threads) * std::max(P3, cz);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    double* pc = cpart + t * D;
    std::fill(pc, pc + D, 0.0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) pc[d] += double(dP[e * P3 + d]) * double(P[e * P3 + d]);
#pragma omp single
    for (int64_t d = 0; d < D; ++d) {
      double sum = 0;
      for (int u = 0; u < nt; ++u) sum += cpart[u * D + d];
      ca[d] = sum;
    }
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) dP[e * P3 + d] = P[e * P3 + d] * (dP[e * P3 + d] - float(ca[d]));
  }
  // dWcat = dPᵀ X, dbcat = Σ dP; dz = dP Wcat.
  float* dwcat = base + lay.dwcat;
  float* csum = base + lay.csum;
  cpu::gemm_reduce(P3, cz, E, {dP, 1, P3}, {X, cz, 1}, dwcat, cz, wpart, slabs, lay.per_thread, threads);
  ColumnSums(dP, E, P3, P3, cpart, csum, threads);
  float* gw[3] = {g.wf, g.wg, g.wh};
  float* gb[3] = {nullptr, g.bg, g.bh};
  for (int q = 0; q < 3; ++q) {
    std::memcpy(gw[q], dwcat + q * D * cz, size_t(D * cz) * sizeof(float));
    if (gb[q]) std::memcpy(gb[q], csum + q * D, size_t(D) * sizeof(float));
  }
  cpu::gemm_rows(E, cz, P3, {dP, P3, 1}, {base + lay.wcat, cz, 1}, xa.dz, cz, false, slabs, lay.per_thread, threads);
}

}  // namespace attnbench::cpu_doubleattn::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu_doubleattn {
HWY_EXPORT(Forward);
HWY_EXPORT(Backward);
}  // namespace cpu_doubleattn

size_t doubleattn_forward_scratch_bytes(const DoubleAttnShape& s, int threads) {
  return size_t(cpu_doubleattn::Layout(s, threads).fwd_total) * sizeof(float);
}
size_t doubleattn_backward_scratch_bytes(const DoubleAttnShape& s, int threads) {
  return size_t(cpu_doubleattn::Layout(s, threads).bwd_total) * sizeof(float);
}

void doubleattn_forward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& x,
                        void* scratch, int threads) {
  using namespace cpu_doubleattn;  // a one-target build expands the macro to HWY_NAMESPACE::Forward
  HWY_DYNAMIC_DISPATCH(Forward)(s, w, x, scratch, threads);
}
void doubleattn_backward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& x,
                         const DoubleAttnGradsF32& g, void* scratch, int threads) {
  using namespace cpu_doubleattn;
  HWY_DYNAMIC_DISPATCH(Backward)(s, w, x, g, scratch, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
