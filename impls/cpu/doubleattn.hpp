// The double-attention pair block (the protein seed project's cheaper alternative to triangle
// attention): CPU forward and backward (impls/cpu/doubleattn.cpp). Math: reference/doubleattn.hpp.
// Write-up: docs/doubleattn.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"

namespace attnbench {

struct DoubleAttnShape {
  int64_t N = 0, c_z = 0, D = 0;  // E = N² edges, D reduced channels
};

/// Weights in f32, PyTorch [out, in] layout.
struct DoubleAttnWeightsF32 {
  const float* wf;       // (D, c_z)        proj_f: the gather maps (no bias: it would cancel)
  const float *wg, *bg;  // (D, c_z), (D)   proj_g: the features gathered
  const float *wh, *bh;  // (D, c_z), (D)   proj_h: the distribution maps
  const float *wo, *bo;  // (c_z, D), (c_z) proj_o
};

/// Gradients (f32, overwritten), the same layout.
struct DoubleAttnGradsF32 {
  float *wf, *wg, *bg, *wh, *bh, *wo, *bo;
};

/// z (N, N, c_z) in f32, bf16 or f16 (raw bits); out (N, N, c_z) f32.
struct DoubleAttnActivations {
  const void* z;
  DType z_dtype;
  float* out;
  // Backward: the cotangent of out (z's dtype) and dz (f32, overwritten).
  const void* dout = nullptr;
  float* dz = nullptr;
};

/// Bytes of 64-byte aligned scratch for the forward (it keeps what the backward reads) and for
/// forward + backward: O(N²·D) (and an f32 copy of z when z is 16-bit).
size_t doubleattn_forward_scratch_bytes(const DoubleAttnShape& s, int threads);
size_t doubleattn_backward_scratch_bytes(const DoubleAttnShape& s, int threads);

void doubleattn_forward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& x,
                        void* scratch, int threads);

/// Gradients of Σ dout ⊙ out for z and every weight, after doubleattn_forward on the same
/// scratch (which must hold doubleattn_backward_scratch_bytes); the forward's part is only read.
void doubleattn_backward(const DoubleAttnShape& s, const DoubleAttnWeightsF32& w, const DoubleAttnActivations& x,
                         const DoubleAttnGradsF32& g, void* scratch, int threads);

}  // namespace attnbench
