// Attention with pair bias on the single representation (Boltz `AttentionPairBias`, AF3 Alg. 24
// without conditioning): CPU forward and backward (impls/cpu/pairbias.cpp). Math:
// reference/pairbias.hpp. Write-up: docs/pairbias.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"

namespace attnbench {

struct PairBiasShape {
  int64_t N = 0, c_s = 0, c_z = 0, H = 0;  // head width c_s / H
};

/// Weights in f32, PyTorch [out, in] layout, Boltz names.
struct PairBiasWeightsF32 {
  const float *ln_s_w, *ln_s_b;  // (c_s)        norm_s.weight, norm_s.bias
  const float *wq, *bq;          // (c_s, c_s), (c_s)   proj_q.weight, proj_q.bias
  const float *wk, *wv, *wg;     // (c_s, c_s)  proj_k.weight, proj_v.weight, proj_g.weight
  const float *ln_z_w, *ln_z_b;  // (c_z)        proj_z.0.weight, proj_z.0.bias
  const float* wz;               // (H, c_z)     proj_z.1.weight
  const float* wo;               // (c_s, c_s)   proj_o.weight
};

/// Gradients (f32, overwritten), the same layout.
struct PairBiasGradsF32 {
  float *ln_s_w, *ln_s_b, *wq, *bq, *wk, *wv, *wg, *ln_z_w, *ln_z_b, *wz, *wo;
};

/// s (N, c_s) and z (N, N, c_z) in f32, bf16 or f16 (raw bits, one dtype for both), the key
/// mask (N) f32 (1 = valid), out (N, c_s) f32.
struct PairBiasActivations {
  const void* s;
  const void* z;
  DType dtype;
  const float* mask;
  float* out;
  // Backward: the cotangent of out (the activations' dtype); ds, dz (f32, overwritten).
  const void* dout = nullptr;
  float* ds = nullptr;
  float* dz = nullptr;
};

/// Bytes of 64-byte aligned scratch for the forward (it keeps what the backward reads: the
/// layer-normed s and z, the projections, the pair bias, the attention output and its per-row
/// log-sum-exp) and for forward + backward. O(N²·(c_z + H)) — the probabilities are never
/// stored whole (one tile of query rows per thread), the pair bias and its gradient are.
size_t pair_bias_forward_scratch_bytes(const PairBiasShape& s, int threads);
size_t pair_bias_backward_scratch_bytes(const PairBiasShape& s, int threads);

void pair_bias_forward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& x, void* scratch,
                       int threads);

/// Gradients of Σ dout ⊙ out for s, z and every weight, after pair_bias_forward on the same
/// scratch (which must hold pair_bias_backward_scratch_bytes); the forward's part is only read.
void pair_bias_backward(const PairBiasShape& s, const PairBiasWeightsF32& w, const PairBiasActivations& x,
                        const PairBiasGradsF32& g, void* scratch, int threads);

}  // namespace attnbench
