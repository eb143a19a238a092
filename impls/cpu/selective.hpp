// Selective attention (per-query keys and values, DESIGN §5): parameters and
// the CPU entry points, forward and backward, in two algorithms:
//   materialized  the seed's: k_ij, v_ij = W_k,v [q_i ; x_j] built per query
//   (O(T² d²)) fused         exact, never materializing them: ordinary
//   attention over
//                 augmented queries/keys (impls/cpu/selective.cpp has the
//                 derivation)
// Math: reference/selective.hpp. Write-up and FLOP model: docs/selective.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"

namespace attnbench {

/// Element strides of a (B, T, d) tensor; d is contiguous.
struct SelectiveStrides {
  int64_t b = 0, t = 0;
};

inline SelectiveStrides selective_dense_strides(int64_t T, int64_t d) { return {T * d, d}; }

/// One call. The weights are dense row-major in PyTorch's [out, in] layout.
struct SelectiveParams {
  int64_t B = 1, T = 1, d = 2, H = 1;  // d a multiple of H; d / H even with RoPE
  bool rope = true;                    // half-split RoPE on q_i (position i) and k_ij (position j)
  DType dtype = DType::f32;            // of x, the weights and dout (f32, bf16, f16); causal always

  float* o = nullptr;  // (B, T, d) f32, forward output
  SelectiveStrides o_strides;
  const void* x = nullptr;  // (B, T, d) in dtype
  SelectiveStrides x_strides;
  const void* wq = nullptr;  // (d, d) in dtype
  const void* wk = nullptr;  // (d, 2d) in dtype
  const void* wv = nullptr;  // (d, 2d) in dtype

  // Backward: the cotangent of o and the gradients (f32, overwritten).
  const void* dout = nullptr;  // (B, T, d) in dtype
  SelectiveStrides dout_strides;
  float* dx = nullptr;  // (B, T, d)
  SelectiveStrides dx_strides;
  float* dwq = nullptr;  // (d, d) dense
  float* dwk = nullptr;  // (d, 2d) dense
  float* dwv = nullptr;  // (d, 2d) dense
};

/// What the fused forward keeps for the backward (FlashAttention's convention:
/// the attention's inputs, output and log-sum-exp; the probabilities are
/// recomputed per tile). Every buffer is (B·T, ·) f32, token-major:
struct SelectiveSaved {
  float* Q = nullptr;    // (B·T, d)       q = wq x
  float* A = nullptr;    // (B·T, d)       A q (RoPE only, else null)
  float* KB = nullptr;   // (B·T, d)       B x
  float* VD = nullptr;   // (B·T, d)       D x, the attention's values
  float* q2 = nullptr;   // (B·T, H, 2dh)  the augmented queries q' (RoPE only)
  float* k2 = nullptr;   // (B·T, H, 2dh)  the augmented keys k' (RoPE only)
  float* o = nullptr;    // (B·T, d)       the attention output Σ_j p_ij D x_j (o − C q)
  float* lse = nullptr;  // (B, H, T)      its rows' natural-log log-sum-exp
};

namespace cpu {

/// Bytes of a SelectiveSaved (64-byte aligned buffers) and its buffers carved
/// from `base` (that many bytes, 64-byte aligned).
size_t selective_saved_bytes(const SelectiveParams& p);
SelectiveSaved selective_saved_at(const SelectiveParams& p, void* base);

/// Bytes of 64-byte aligned scratch each entry point needs with `threads`
/// OpenMP threads (`saving`: the forward is given a SelectiveSaved, so its
/// state is not in the scratch).
size_t selective_forward_fused_scratch_bytes(const SelectiveParams& p, int threads, bool saving = false);
size_t selective_backward_fused_scratch_bytes(const SelectiveParams& p, int threads);
size_t selective_forward_materialized_scratch_bytes(const SelectiveParams& p, int threads);
size_t selective_backward_materialized_scratch_bytes(const SelectiveParams& p, int threads);

/// o (f32 arithmetic and output) from x, wq, wk, wv; with `saved`, what the
/// backward reads is kept there.
void selective_forward_fused(const SelectiveParams& p, void* scratch, int threads,
                             const SelectiveSaved* saved = nullptr);
/// dx, dwq, dwk, dwv from x, the weights, dout and what the forward with the
/// same x and weights saved (nothing of the forward is recomputed but the
/// attention's probabilities, per tile).
void selective_backward_fused(const SelectiveParams& p, const SelectiveSaved& saved, void* scratch, int threads);
/// The materialized form keeps nothing: its backward rebuilds every query's
/// keys and values (the seed's cost).
void selective_forward_materialized(const SelectiveParams& p, void* scratch, int threads);
void selective_backward_materialized(const SelectiveParams& p, void* scratch, int threads);

}  // namespace cpu
}  // namespace attnbench
