// Fused CPU forward of triangle attention (see impls/cpu/triangle.cpp).
#pragma once

#include <cstddef>

#include "harness/dtype.hpp"
#include "impls/cuda/triangle_math.hpp"

namespace attnbench {

/// Weights in f32, PyTorch [out, in] layout, OpenFold names.
struct TriangleWeightsF32 {
  const float* ln_w;  // (c_z)        layer_norm.weight
  const float* ln_b;  // (c_z)        layer_norm.bias
  const float* wb;    // (H, c_z)     linear.weight (pair bias)
  const float* wq;    // (H·c, c_z)   mha.linear_q.weight
  const float* wk;    // (H·c, c_z)   mha.linear_k.weight
  const float* wv;    // (H·c, c_z)   mha.linear_v.weight
  const float* wg;    // (H·c, c_z)   mha.linear_g.weight
  const float* bg;    // (H·c)        mha.linear_g.bias
  const float* wo;    // (c_z, H·c)   mha.linear_o.weight
  const float* bo;    // (c_z)        mha.linear_o.bias
};

/// Activations: z f32, bf16 or f16 (raw 16-bit patterns; f16 on the CPU only), mask f32.
struct TriangleActivations {
  const void* z;  // (N, N, c_z)
  DType z_dtype;
  const float* mask;  // (N, N)
};

/// Bytes of scratch triangle_attention_forward_fused needs with `threads` OpenMP threads:
/// the packed weights, the pair bias (H, N, N) and mask bias (N, N), and per thread one row's
/// layer-normed x, projections and tiles — O(N²·H + threads·N·(c_z + 4·H·c)), nothing O(N³).
size_t triangle_attention_forward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads);

/// out: (N, N, c_z) f32. `scratch`: triangle_attention_forward_fused_scratch_bytes(shape,
/// threads) bytes, 64-byte aligned (take it from the Workspace once, at setup).
void triangle_attention_forward_fused(float* out, const triangle::TriangleShape& shape, const TriangleWeightsF32& w,
                                      const TriangleActivations& x, void* scratch, int threads);

}  // namespace attnbench
