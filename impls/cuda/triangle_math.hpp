// Per-element arithmetic of triangle attention, shared by the CUDA kernels, the CPU kernel's
// scalar parts and the host tests (ATTNBENCH_HD: host and device).
//
//   x = LayerNorm(z) (eps 1e-5), logit^h_ijk = q^h_ij·k^h_ik/√c + b^h_jk + inf·(m_ik − max_k m_ik)
//   o^h_ij = sigmoid(g^h_ij) ⊙ Σ_k softmax_k(logit) v^h_ik,   inf = 1e9
// (see reference/triangle.hpp for the mask's row-constant shift).
#pragma once

#include <math.h>
#include <stdint.h>

#include "impls/common.hpp"
#include "impls/cuda/online_softmax_math.hpp"

namespace attnbench::triangle {

/// Shapes of one triangle attention problem (AF2: c_z 128, c 32, H 4).
struct TriangleShape {
  int64_t N = 0, c_z = 0, c = 0, H = 0;
  bool starting = true;
  ATTNBENCH_HD int64_t hidden() const { return H * c; }
  /// Offset (in pairs) in z / mask / out of pair (a, b) of the problem: (a, b) for the
  /// starting node, (b, a) for the ending node (which runs on zᵀ).
  ATTNBENCH_HD int64_t pair(int64_t a, int64_t b) const { return starting ? a * N + b : b * N + a; }
};

inline constexpr float kInf = 1e9f;
inline constexpr float kLnEps = 1e-5f;

/// 1/sqrt(var + eps) from the sum of squared deviations from the mean of n values (biased
/// variance, as torch.nn.LayerNorm; two passes over the values, no cancellation).
ATTNBENCH_HD float layer_norm_inv_std(float sum_sq_dev, int64_t n) {
  return 1.0f / sqrtf(sum_sq_dev / float(n) + kLnEps);
}

/// One layer-normed value: (z − mean) · inv_std · w + b.
ATTNBENCH_HD float layer_norm_apply(float z, float mean, float inv_std, float w, float b) {
  return (z - mean) * inv_std * w + b;
}

/// Mask bias of key k in a row whose largest mask value is `row_max`.
ATTNBENCH_HD float mask_bias(float m, float row_max) { return kInf * (m - row_max); }

ATTNBENCH_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/// Online softmax state of one row and its update (online_softmax_math.hpp).
using online_softmax_math::OnlineSoftmax;
using online_softmax_math::online_softmax_inv_sum;
using online_softmax_math::online_softmax_rescale;

}  // namespace attnbench::triangle
