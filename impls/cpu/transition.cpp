// The Pairformer's SwiGLU transition, CPU forward and backward (math in reference/transition.hpp,
// write-up and FLOP model in docs/transition.md).
//
// Three GEMMs forward and five backward, all on the kernels' register-blocked GEMM
// (impls/cpu/gemm.hpp); everything else is row-wise and memory-bound. Layouts (R rows, h hidden):
//   X  [R, c]   x̂ = LN(x) ⊙ γ + β
//   P  [R, 2h]  [a | b] = x̂ · [W_1; W_2]ᵀ (one GEMM over the stacked weights)
//   H  [R, h]   silu(a) ⊙ b
// Forward: LN → P → H → out = H · W_3ᵀ. Backward: dW_3 = doutᵀ·H (a reduction GEMM over the
// rows, split over threads), dH = dout·W_3 → the SwiGLU chain rule into dP → dW_1, dW_2 =
// dPᵀ·x̂ (reduction GEMMs), dx̂ = dP·[W_1; W_2] → LN backward (recomputing the normalized x).
// x and the cotangent may be bf16 or f16: widened to f32 where they are read.
#include "impls/cpu/transition.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "harness/dtype.hpp"
#include "impls/cpu/gemm.hpp"

#ifndef ATTNBENCH_IMPLS_CPU_TRANSITION_LAYOUT_
#define ATTNBENCH_IMPLS_CPU_TRANSITION_LAYOUT_
namespace attnbench::cpu_transition {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Offsets (in floats) of the scratch regions, each 64-byte aligned.
struct Layout {
  int64_t per_thread;
  int64_t wcat, mean, rstd, x, P, H, slabs, fwd_total;  // forward (kept for the backward)
  int64_t dO, dH, dP, wpart, lnpart, bwd_total;         // backward
  Layout(const TransitionShape& s, int threads) {
    const int64_t R = s.rows, c = s.c, h = s.hidden;
    per_thread = round_up(cpu::gemm_pack_floats(std::max(2 * h, c)) + c, 16);  // GEMM packing, one row
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += round_up(n, 16);
      return o;
    };
    wcat = take(2 * h * c);
    mean = take(R);
    rstd = take(R);
    x = take(R * c);
    P = take(R * 2 * h);
    H = take(R * h);
    slabs = take(per_thread * threads);
    fwd_total = at;
    dO = take(R * c);
    dH = take(R * h);
    dP = take(R * 2 * h);
    wpart = take(int64_t(threads) * h * c);
    lnpart = take(2 * int64_t(threads) * 2 * c);  // doubles
    bwd_total = at;
  }
};

}  // namespace attnbench::cpu_transition
#endif  // ATTNBENCH_IMPLS_CPU_TRANSITION_LAYOUT_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/transition.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "impls/cpu/layer_norm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_transition::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace attnbench::cpu_rows::HWY_NAMESPACE;  // LayerNormRows, LayerNormBackwardRows

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

static HWY_INLINE VF Sigmoid(DF d, VF a) {
  const VF one = hn::Set(d, 1.0f);
  return hn::Div(one, hn::Add(one, hn::Exp(d, hn::Neg(a))));
}

/// One row of the SwiGLU product: hid[j] = a[j] σ(a[j]) b[j] (a = p[0, h), b = p[h, 2h)).
static void SwigluRow(const float* p, int64_t h, float* hid) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  int64_t j = 0;
#if defined(ATTNBENCH_MUTANT_transition_no_silu)  // scripts/mutation-test.sh: the SiLU left out (a ⊙ b)
  (void)L;
  for (; j < h; ++j) hid[j] = p[j] * p[h + j];
#else
  for (; j + L <= h; j += L) {
    const VF a = hn::LoadU(d, p + j), b = hn::LoadU(d, p + h + j);
    hn::StoreU(hn::Mul(hn::Mul(a, Sigmoid(d, a)), b), d, hid + j);
  }
  for (; j < h; ++j) hid[j] = p[j] / (1.0f + std::exp(-p[j])) * p[h + j];
#endif
}

/// One row of the SwiGLU chain rule: da = dh b σ(a)(1 + a(1 − σ(a))), db = dh a σ(a).
static void SwigluBackwardRow(const float* p, const float* dh, int64_t h, float* dp) {
  const DF d;
  const int64_t L = int64_t(hn::Lanes(d));
  const VF one = hn::Set(d, 1.0f);
  int64_t j = 0;
  for (; j + L <= h; j += L) {
    const VF a = hn::LoadU(d, p + j), b = hn::LoadU(d, p + h + j), g = hn::LoadU(d, dh + j);
    const VF sg = Sigmoid(d, a);
    const VF dsilu = hn::Mul(sg, hn::MulAdd(a, hn::Sub(one, sg), one));
    hn::StoreU(hn::Mul(hn::Mul(g, b), dsilu), d, dp + j);
    hn::StoreU(hn::Mul(g, hn::Mul(a, sg)), d, dp + h + j);
  }
  for (; j < h; ++j) {
    const float a = p[j], b = p[h + j], sg = 1.0f / (1.0f + std::exp(-a));
    dp[j] = dh[j] * b * (sg * (a * (1.0f - sg) + 1.0f));
    dp[h + j] = dh[j] * (a * sg);
  }
}

void Forward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& xa, void* scratch,
             int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t R = s.rows, c = s.c, h = s.hidden;
  float* wcat = base + lay.wcat;
  float* X = base + lay.x;
  float* P = base + lay.P;
  float* H = base + lay.H;
  float* slabs = base + lay.slabs;
  std::memcpy(wcat, w.w1, size_t(h * c) * sizeof(float));
  std::memcpy(wcat + h * c, w.w2, size_t(h * c) * sizeof(float));

  LayerNormRows(xa.x, xa.x_dtype, R, c, w.ln_w, w.ln_b, X, base + lay.mean, base + lay.rstd, threads);
  cpu::gemm_rows(R, 2 * h, c, {X, c, 1}, {wcat, 1, c}, P, 2 * h, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < R; ++r) {
    SwigluRow(P + r * 2 * h, h, H + r * h);
  }
  cpu::gemm_rows(R, c, h, {H, h, 1}, {w.w3, 1, h}, xa.out, c, false, slabs, lay.per_thread, threads);
}

void Backward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& xa,
              const TransitionGradsF32& g, void* scratch, int threads) {
  const Layout lay(s, threads);
  float* base = static_cast<float*>(scratch);
  const int64_t R = s.rows, c = s.c, h = s.hidden;
  const float* wcat = base + lay.wcat;
  const float* X = base + lay.x;
  const float* P = base + lay.P;
  const float* H = base + lay.H;
  float* slabs = base + lay.slabs;
  float* dH = base + lay.dH;
  float* dP = base + lay.dP;
  float* wpart = base + lay.wpart;
  double* lnpart = reinterpret_cast<double*>(base + lay.lnpart);

  // The cotangent in f32 (read in place when it is f32 already).
  const float* dO = static_cast<const float*>(xa.dout);
  if (xa.x_dtype != DType::f32) {
    float* widened = base + lay.dO;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < R * c; ++i) widened[i] = load_float(xa.dout, xa.x_dtype, i);
    dO = widened;
  }
  // dW_3 = doutᵀ H (c, h); dH = dout W_3.
  cpu::gemm_reduce(c, h, R, {dO, 1, c}, {H, h, 1}, g.w3, h, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(R, h, c, {dO, c, 1}, {w.w3, h, 1}, dH, h, false, slabs, lay.per_thread, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < R; ++r) SwigluBackwardRow(P + r * 2 * h, dH + r * h, h, dP + r * 2 * h);
  // dW_1, dW_2 = dPᵀ x̂ (the two column halves of dP); dx̂ = dP [W_1; W_2], into dx.
  cpu::gemm_reduce(h, c, R, {dP, 1, 2 * h}, {X, c, 1}, g.w1, c, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_reduce(h, c, R, {dP + h, 1, 2 * h}, {X, c, 1}, g.w2, c, wpart, slabs, lay.per_thread, threads);
  cpu::gemm_rows(R, c, 2 * h, {dP, 2 * h, 1}, {wcat, c, 1}, xa.dx, c, false, slabs, lay.per_thread, threads);
  // LN backward in place: dx̂ → dx, with the normalized x recomputed from x.
  LayerNormBackwardRows(xa.dx, {nullptr, xa.x, xa.x_dtype, base + lay.mean}, base + lay.rstd, w.ln_w, R, c, lnpart,
                        g.ln_w, g.ln_b, slabs + (lay.per_thread - c), lay.per_thread, threads);
}

}  // namespace attnbench::cpu_transition::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench {
namespace cpu_transition {
HWY_EXPORT(Forward);
HWY_EXPORT(Backward);
}  // namespace cpu_transition

size_t transition_forward_scratch_bytes(const TransitionShape& s, int threads) {
  return size_t(cpu_transition::Layout(s, threads).fwd_total) * sizeof(float);
}
size_t transition_backward_scratch_bytes(const TransitionShape& s, int threads) {
  return size_t(cpu_transition::Layout(s, threads).bwd_total) * sizeof(float);
}

void transition_forward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& x,
                        void* scratch, int threads) {
  using namespace cpu_transition;  // a one-target build expands the macro to HWY_NAMESPACE::Forward
  HWY_DYNAMIC_DISPATCH(Forward)(s, w, x, scratch, threads);
}
void transition_backward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& x,
                         const TransitionGradsF32& g, void* scratch, int threads) {
  using namespace cpu_transition;
  HWY_DYNAMIC_DISPATCH(Backward)(s, w, x, g, scratch, threads);
}

}  // namespace attnbench
#endif  // HWY_ONCE
