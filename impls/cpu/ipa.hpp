// Fused CPU forward of Invariant Point Attention (see impls/cpu/ipa.cpp).
#pragma once

#include <cstddef>

#include "harness/dtype.hpp"
#include "impls/cuda/ipa_math.hpp"

namespace attnbench {

/// Weights in f32, PyTorch [out, in] layout, OpenFold names.
struct IpaWeightsF32 {
  const float* linear_q_w;     // (H·c, c_s)
  const float* linear_q_b;     // (H·c)
  const float* linear_kv_w;    // (2·H·c, c_s)
  const float* linear_kv_b;    // (2·H·c)
  const float* linear_qp_w;    // (3·H·P, c_s)       linear_q_points.linear
  const float* linear_qp_b;    // (3·H·P)
  const float* linear_kvp_w;   // (3·H·(P+P_v), c_s) linear_kv_points.linear
  const float* linear_kvp_b;   // (3·H·(P+P_v))
  const float* linear_b_w;     // (H, c_z)
  const float* linear_b_b;     // (H)
  const float* head_weights;   // (H)
  const float* linear_out_w;   // (c_s, H·(c + 4·P_v + c_z))
  const float* linear_out_b;   // (c_s)
};

/// Activations. z is f32, bf16 or f16 (raw 16-bit patterns; f16 on the CPU only); everything else f32. For the factorized
/// model (ipa_factorized) z is null and z_ij = Σ_r z_factor_1[i, r] ⊙ z_factor_2[j, r].
struct IpaActivations {
  const float* s;             // (N, c_s)
  const void* z;              // (N, N, c_z)
  DType z_dtype;
  const float* rotations;     // (N, 3, 3)
  const float* translations;  // (N, 3)
  const float* mask;          // (N)
  const float* z_factor_1 = nullptr;  // (N, rank, c_z)
  const float* z_factor_2 = nullptr;  // (N, rank, c_z)
  int64_t rank = 0;
};

/// Bytes of scratch ipa_forward_fused needs with `threads` OpenMP threads: O(N) — the
/// per-residue projections and the concatenation — plus O(H·(tile + c_z)) per thread.
/// Nothing O(N²): the pair bias is computed from z tile by tile. With factors (rank > 0)
/// each thread also holds one materialized row of z, N·c_z floats.
size_t ipa_forward_fused_scratch_bytes(const ipa::IpaShape& shape, int threads, int64_t rank = 0);

/// out: (N, c_s). `scratch`: ipa_forward_fused_scratch_bytes(shape, threads) bytes,
/// 64-byte aligned (take it from the Workspace once, at setup); runs on `threads` threads.
void ipa_forward_fused(float* out, const ipa::IpaShape& shape, const IpaWeightsF32& w, const IpaActivations& x,
                       void* scratch, int threads);

}  // namespace attnbench
