// The Pairformer's SwiGLU transition (AF3 Alg. 11, Boltz `Transition`): CPU forward and backward
// as GEMMs (impls/cpu/transition.cpp). Math: reference/transition.hpp. Write-up: docs/transition.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"

namespace attnbench {

/// rows = N² (pair track) or N (single track); every row is transformed alone.
struct TransitionShape {
  int64_t rows = 0, c = 0, hidden = 0;
};

/// Weights in f32, PyTorch [out, in] layout, Boltz names.
struct TransitionWeightsF32 {
  const float *ln_w, *ln_b;  // (c)          norm.weight, norm.bias
  const float* w1;           // (hidden, c)  fc1.weight
  const float* w2;           // (hidden, c)  fc2.weight
  const float* w3;           // (c, hidden)  fc3.weight
};

/// Gradients (f32, overwritten), the same layout.
struct TransitionGradsF32 {
  float *ln_w, *ln_b, *w1, *w2, *w3;
};

/// x (rows, c) in f32, bf16 or f16 (raw bits); out (rows, c) f32.
struct TransitionActivations {
  const void* x;
  DType x_dtype;
  float* out;
  // Backward: the cotangent of out (x's dtype) and dx (f32, overwritten).
  const void* dout = nullptr;
  float* dx = nullptr;
};

/// Bytes of 64-byte aligned scratch for the forward (it keeps what the backward reads: run the
/// forward, then the backward, on the same scratch) and for forward + backward.
size_t transition_forward_scratch_bytes(const TransitionShape& s, int threads);
size_t transition_backward_scratch_bytes(const TransitionShape& s, int threads);

/// out from x; keeps LN(x), fc1 | fc2 and the SwiGLU product in `scratch`.
void transition_forward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& x,
                        void* scratch, int threads);

/// Gradients of Σ dout ⊙ out for x and every weight, after transition_forward on the same
/// scratch (which must hold transition_backward_scratch_bytes). The forward's part of the
/// scratch is only read, so the backward may run again on it.
void transition_backward(const TransitionShape& s, const TransitionWeightsF32& w, const TransitionActivations& x,
                         const TransitionGradsF32& g, void* scratch, int threads);

}  // namespace attnbench
