// Triangle multiplicative update (AF2 Alg. 11/12, AF3 Alg. 12/13): CPU forward and backward
// as GEMMs (impls/cpu/trimul.cpp). Math: reference/trimul.hpp. Write-up: docs/trimul.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"

namespace attnbench {

struct TrimulShape {
  int64_t N = 0, c_z = 0, c_h = 0;
  bool outgoing = true;
};

/// Weights in f32, PyTorch [out, in] layout. Bias pointers may be null (AF3: no biases). For
/// AF3's p_in / g_in the a and b halves are the two row blocks of one tensor: point w_bp at
/// p_in + c_h·c_z.
struct TrimulWeightsF32 {
  const float *ln_in_w, *ln_in_b;    // (c_z)
  const float *w_ap, *b_ap;          // (c_h, c_z), (c_h)
  const float *w_ag, *b_ag;          // (c_h, c_z), (c_h)
  const float *w_bp, *b_bp;          // (c_h, c_z), (c_h)
  const float *w_bg, *b_bg;          // (c_h, c_z), (c_h)
  const float *w_g, *b_g;            // (c_z, c_z), (c_z)
  const float *ln_out_w, *ln_out_b;  // (c_h)
  const float *w_o, *b_o;            // (c_z, c_h), (c_z)
};

/// Gradients (f32, overwritten), the same layout; a null pointer is not written (AF3 biases).
struct TrimulGradsF32 {
  float *ln_in_w, *ln_in_b, *w_ap, *b_ap, *w_ag, *b_ag, *w_bp, *b_bp, *w_bg, *b_bg, *w_g, *b_g, *ln_out_w,
      *ln_out_b, *w_o, *b_o;
};

/// z (N, N, c_z) in f32, bf16 or f16 (raw bits), mask (N, N) f32, out (N, N, c_z) f32.
struct TrimulActivations {
  const void* z;
  DType z_dtype;
  const float* mask;
  float* out;
  // Backward: the cotangent of out (f32, bf16 or f16, like z) and dz (f32, overwritten).
  const void* dout = nullptr;
  float* dz = nullptr;
};

/// Bytes of 64-byte aligned scratch for the forward (everything the backward reads is kept
/// in it: run the forward, then the backward, on the same scratch) and for forward + backward.
size_t trimul_forward_scratch_bytes(const TrimulShape& s, int threads);
size_t trimul_backward_scratch_bytes(const TrimulShape& s, int threads);

/// out from z and mask; keeps the activations the backward reads in `scratch`.
void trimul_forward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& x, void* scratch,
                    int threads);
/// dz and every gradient from dout, reading what trimul_forward left in `scratch` (which must
/// hold trimul_backward_scratch_bytes).
void trimul_backward(const TrimulShape& s, const TrimulWeightsF32& w, const TrimulActivations& x,
                     const TrimulGradsF32& g, void* scratch, int threads);

}  // namespace attnbench
