// Per-pair arithmetic of Invariant Point Attention, shared by the CUDA kernel, the
// CPU kernel's scalar parts and the host tests (ATTNBENCH_HD: host and device).
//
//   logit_ij^h = α q_i·k_j + β b_ij^h − ½ γ_h Σ_p ‖q_ip − k_jp‖² + inf · m_i (m_j − 1)
//   α = sqrt(1/(3c)), β = sqrt(1/3), γ_h = softplus(w_h) · sqrt(1/(3 · P · 9/2)), inf = 1e5
//
// Frames are (R row-major [3,3], t [3]); points are [3] in x, y, z order.
#pragma once

#include <math.h>
#include <stdint.h>

#include "impls/common.hpp"
#include "impls/cuda/online_softmax_math.hpp"

namespace attnbench::ipa {

/// Shapes of one IPA problem (AF2: c_s 384, c_z 128, c 16, H 12, P 4, P_v 8).
struct IpaShape {
  int64_t N = 0, c_s = 0, c_z = 0, c = 0, H = 0, P = 0, Pv = 0;
  /// Width of concat[o, o_pt x|y|z, ‖o_pt‖, o_pair]: H·(c + 4·P_v + c_z).
  ATTNBENCH_HD int64_t concat_dim() const { return H * (c + 4 * Pv + c_z); }
  /// Per head, the values accumulated besides the pair output: c scalars + 3·P_v point coordinates.
  ATTNBENCH_HD int64_t value_dim() const { return c + 3 * Pv; }
};

inline constexpr float kInf = 1e5f;
inline constexpr float kNormEps = 1e-8f;

ATTNBENCH_HD float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

/// γ_h: softplus(w_h) · sqrt(1 / (3 · P · 9/2)).
ATTNBENCH_HD float point_weight(float head_weight, int64_t P) {
  return softplus(head_weight) * sqrtf(1.0f / (3.0f * float(P) * 4.5f));
}

/// out = R x + t (OpenFold Rigid.apply).
ATTNBENCH_HD void frame_apply(const float* R, const float* t, const float* x, float* out) {
  for (int r = 0; r < 3; ++r) out[r] = R[3 * r] * x[0] + R[3 * r + 1] * x[1] + R[3 * r + 2] * x[2] + t[r];
}

/// out = Rᵀ (x − t) (OpenFold Rigid.invert_apply).
ATTNBENCH_HD void frame_invert_apply(const float* R, const float* t, const float* x, float* out) {
  const float d0 = x[0] - t[0], d1 = x[1] - t[1], d2 = x[2] - t[2];
  for (int k = 0; k < 3; ++k) out[k] = R[k] * d0 + R[3 + k] * d1 + R[6 + k] * d2;
}

/// Σ_p ‖q_p − k_p‖² over P points stored [P][3], as differences (not ‖q‖² + ‖k‖² − 2q·k,
/// which cancels catastrophically far from the origin).
ATTNBENCH_HD float point_sqdist(const float* qp, const float* kp, int64_t P) {
  float acc = 0.f;
  for (int64_t i = 0; i < 3 * P; ++i) {
    const float d = qp[i] - kp[i];
    acc += d * d;
  }
  return acc;
}

/// The logit from its parts: qk = α q·k (already scaled), b = β b_ij (already scaled),
/// d2 = Σ_p ‖q_ip − k_jp‖², gamma = γ_h.
ATTNBENCH_HD float logit(float qk, float b, float d2, float gamma, float mask_i, float mask_j) {
  return qk + b - 0.5f * gamma * d2 + kInf * mask_i * (mask_j - 1.0f);
}

/// Online softmax state of one row and its update (online_softmax_math.hpp).
using online_softmax_math::OnlineSoftmax;
using online_softmax_math::online_softmax_inv_sum;
using online_softmax_math::online_softmax_rescale;

/// ‖o_pt‖ as OpenFold computes it: sqrt(x² + y² + z² + 1e-8).
ATTNBENCH_HD float point_norm(const float* x) { return sqrtf(x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + kNormEps); }

}  // namespace attnbench::ipa
