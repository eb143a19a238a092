// Online softmax state in natural units (exp), shared by the CUDA IPA and triangle attention
// kernels (impls/cuda/ipa.cu, impls/cuda/triangle.cu), the CPU IPA kernel and the host tests
// (ATTNBENCH_HD: host and device). ipa_math.hpp and triangle_math.hpp re-export it as
// ipa::OnlineSoftmax / triangle::OnlineSoftmax and their online_softmax_* functions. (The
// flash kernels sdpa.cu / masked.cu keep their scores in base 2: sdpa_math.hpp.)
#pragma once

#include <math.h>

#include "impls/common.hpp"

namespace attnbench::online_softmax_math {

/// Online softmax state of one row: running max m and sum l of exp(x − m).
struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;
};

/// Folds a block whose max is `block_max` into the state; returns the factor by which
/// accumulators of earlier blocks must be multiplied (0 on the first block). The caller
/// then adds exp(x − s.m) of the block's entries to l and to its accumulators.
ATTNBENCH_HD float online_softmax_rescale(OnlineSoftmax& s, float block_max) {
  const float m_new = s.m > block_max ? s.m : block_max;
  const float scale = s.m == -INFINITY ? 0.f : expf(s.m - m_new);
  s.l *= scale;
  s.m = m_new;
  return scale;
}

/// 1/l, or 0 for an empty row (never NaN).
ATTNBENCH_HD float online_softmax_inv_sum(const OnlineSoftmax& s) { return s.l > 0.f ? 1.0f / s.l : 0.f; }

}  // namespace attnbench::online_softmax_math
