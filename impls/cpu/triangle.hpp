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

/// What the forward saves for the backward (FlashAttention's convention: the output and the
/// log-sum-exp, O(N²·H·c) and O(N²·H) — the probabilities (N³·H) are recomputed).
struct TriangleSaved {
  float* lse;  // (N, H, N)    natural-log log-sum-exp of row i, head h, query j
  float* o;    // (N, N, H·c)  the ungated attention output of problem pair (i, j), heads concatenated
};

/// Gradients (f32): dz in z's layout, the weights' in theirs.
struct TriangleGradsF32 {
  float* dz;
  float *ln_w, *ln_b, *wb, *wq, *wk, *wv, *wg, *bg, *wo, *bo;
};

/// Bytes of scratch triangle_attention_forward_fused needs with `threads` OpenMP threads:
/// the packed weights, the pair bias (H, N, N) and mask bias (N, N), and per thread one row's
/// layer-normed x, projections and tiles — O(N²·H + threads·N·(c_z + 4·H·c)), nothing O(N³).
size_t triangle_attention_forward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads);

/// out: (N, N, c_z) f32. `scratch`: triangle_attention_forward_fused_scratch_bytes(shape,
/// threads) bytes, 64-byte aligned (take it from the Workspace once, at setup). `saved` (may
/// be null): where to keep what the backward reads.
void triangle_attention_forward_fused(float* out, const triangle::TriangleShape& shape, const TriangleWeightsF32& w,
                                      const TriangleActivations& x, void* scratch, int threads,
                                      const TriangleSaved* saved = nullptr);

/// Bytes of scratch triangle_attention_backward_fused needs: the forward's packed weights and
/// biases, per thread one row's recomputed layer norm and projections, its gradients, one
/// head's packed query side and key tile, and double accumulators for the weight gradients and
/// the pair bias's (H, N, N) — O(threads·N²·H + threads·N·(c_z + H·c)), nothing O(N³).
size_t triangle_attention_backward_fused_scratch_bytes(const triangle::TriangleShape& shape, int threads);

/// Gradients of Σ dout ⊙ out for z and every weight (the mask is not differentiable), from
/// the inputs, the cotangent `dout` (N, N, c_z; z's dtype) and what the forward saved.
void triangle_attention_backward_fused(const TriangleGradsF32& g, const triangle::TriangleShape& shape,
                                       const TriangleWeightsF32& w, const TriangleActivations& x, const void* dout,
                                       const TriangleSaved& saved, void* scratch, int threads);

}  // namespace attnbench
