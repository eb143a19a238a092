// The per-token arithmetic of the fused selective attention (impls/cpu/selective.cpp,
// impls/cuda/selective.cu) as host/device helpers, so that the CPU kernel and the CPU
// tests run exactly what the CUDA kernels compute: the augmented query and key of one
// RoPE pair and its gradient (the derivation is in impls/cpu/selective.cpp and
// docs/selective.md).
//
// Per head (d_head = dh, half = dh / 2), token i at angle φ_t = θ_t·i of pair t:
//   q'[t], q'[t + half]           = γ R_i q          (the RoPE'd query)
//   q'[dh + t], q'[dh + t + half] = γ u_i            (the A q_i term's per-query factor)
//   k'[t], k'[t + half]           = R_i b            (b = B x, the ordinary key)
//   k'[dh + t], k'[dh + t + half] = (cos φ_t, sin φ_t)
// with P_t = q1 a1 + q2 a2, Q_t = q2 a1 − q1 a2 (a = A q),
//   u[t] = P cos φ − Q sin φ,  u[t + half] = P sin φ + Q cos φ.
#pragma once

#include <cstdint>

#include "impls/common.hpp"
#include "impls/cpu/sdpa.hpp"
#include "impls/cpu/selective.hpp"

namespace attnbench::selective_math {

/// The augmented query q2 and key k2 (2·dh each) at pair t of one head: q, a = A q and
/// kb = B x are that head's dh-slices, (c, s) the pair's cos/sin at the token's position,
/// gamma the query's scale (√2: the sdpa kernel's 1/√(2 dh) becomes 1/√dh).
ATTNBENCH_HD void augment_pair(const float* q, const float* a, const float* kb, float c, float s, float gamma,
                               int64_t t, int64_t half, float* q2, float* k2) {
  const int64_t dh = 2 * half;
  const float q1 = q[t], qh = q[t + half], a1 = a[t], ah = a[t + half];
  q2[t] = gamma * (q1 * c - qh * s);
  q2[t + half] = gamma * (qh * c + q1 * s);
  k2[t] = kb[t] * c - kb[t + half] * s;
  k2[t + half] = kb[t + half] * c + kb[t] * s;
  const float P = q1 * a1 + qh * ah, Qt = qh * a1 - q1 * ah;
  q2[dh + t] = gamma * (P * c - Qt * s);
  q2[dh + t + half] = gamma * (P * s + Qt * c);
  k2[dh + t] = c;
  k2[dh + t + half] = s;
}

/// The gradient through augment_pair at pair t: from dq2 (the gradient of q2, 2·dh) and
/// dk2 (of k2; only its first dh entries matter, the rest is a constant) to dq, da = d(A q)
/// and dkb = d(B x) of the head's dh-slices (overwritten at t and t + half).
ATTNBENCH_HD void augment_pair_backward(const float* dq2, const float* dk2, const float* q, const float* a, float c,
                                        float s, float gamma, int64_t t, int64_t half, float* dq, float* da,
                                        float* dkb) {
  const int64_t dh = 2 * half;
  const float g1 = gamma * dq2[t], g2 = gamma * dq2[t + half];
  const float u1 = gamma * dq2[dh + t], u2 = gamma * dq2[dh + t + half];
  const float q1 = q[t], q2 = q[t + half], a1 = a[t], a2 = a[t + half];
  const float dP = u1 * c + u2 * s, dQt = -u1 * s + u2 * c;
  dq[t] = g1 * c + g2 * s + dP * a1 - dQt * a2;  // R_iᵀ dq' + ∂u/∂q
  dq[t + half] = -g1 * s + g2 * c + dP * a2 + dQt * a1;
  da[t] = dP * q1 + dQt * q2;
  da[t + half] = dP * q2 - dQt * q1;
  const float k1 = dk2[t], k2 = dk2[t + half];
  dkb[t] = k1 * c + k2 * s;  // R_iᵀ d(R b)
  dkb[t + half] = -k1 * s + k2 * c;
}

/// The attention both forms run on the SDPA kernels (shapes and strides; the caller sets
/// the pointers): causal, f32, one head dimension Dk = 2·dh with RoPE (q' = [γ R q, γ u],
/// k' = [R b, c], v zero-padded: (B·T, H, Dk) buffers), dh without (q = Q, k = B x,
/// v = D x: heads are slices of (B·T, d) buffers). o is laid out like q.
inline SdpaParams attention_params(const SelectiveParams& p) {
  const int64_t dh = p.d / p.H, Dk = p.rope ? 2 * dh : dh;
  SdpaParams s;
  s.B = p.B, s.H = s.Hkv = p.H, s.Nq = s.Nkv = p.T, s.D = Dk;
  s.causal = true;
  s.rope = SdpaRope::none;
  s.dtype = DType::f32;
  const SdpaStrides st = p.rope ? SdpaStrides{p.T * p.H * Dk, Dk, p.H * Dk} : SdpaStrides{p.T * p.d, dh, p.d};
  s.q_strides = s.k_strides = s.v_strides = s.o_strides = st;
  return s;
}

/// √2 with RoPE (the kernel's 1/√(2 dh) becomes the layer's 1/√dh), else 1.
inline float query_gamma(const SelectiveParams& p) { return p.rope ? 1.4142135623730951f : 1.0f; }

}  // namespace attnbench::selective_math
