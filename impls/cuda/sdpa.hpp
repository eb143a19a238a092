// Host launchers of the CUDA SDPA forward and backward (impls/cuda/sdpa.cu). Plain C++:
// the parameters are the CPU entry points' (impls/cpu/sdpa.hpp), with device pointers.
#pragma once

#include <cstddef>

#include "impls/cpu/sdpa.hpp"

namespace attnbench::cuda {

/// Largest head dimension the kernel supports.
inline constexpr int64_t kSdpaMaxHeadDim = 256;

/// Device scratch the launcher needs: the RoPE cos/sin table and, with
/// weights, the per-row softmax statistics (m, l).
size_t sdpa_forward_flash_scratch_bytes(const SdpaParams& p);

/// Enqueues the forward on `stream` (a cudaStream_t). q, k, v: f32, bf16 or
/// f16; o (and weights) f32. `scratch` holds sdpa_forward_flash_scratch_bytes(p)
/// bytes of device memory. Throws std::invalid_argument for unsupported shapes
/// (D > kSdpaMaxHeadDim) and std::runtime_error for launch errors.
/// With p.lse set the forward also writes each row's natural-log log-sum-exp (the backward
/// reads it).
void sdpa_forward_flash(const SdpaParams& p, void* scratch, void* stream);

/// Device scratch of the backward: the RoPE cos/sin table and Δ_i = dO_i·O_i (B·H·Nq floats).
size_t sdpa_backward_flash_scratch_bytes(const SdpaBackwardParams& p);

/// Enqueues the backward on `stream` (a cudaStream_t): dq, dk, dv (f32) = the gradients of
/// Σ ⟨dout, o⟩ with respect to q, k, v, from the forward's o and lse (p.fwd.o, p.fwd.lse,
/// as sdpa_forward_flash wrote them) and dout (in p.fwd.dtype). Every gradient element is
/// written (0 for keys no query sees and for rows without keys). `scratch` holds
/// sdpa_backward_flash_scratch_bytes(p) bytes of device memory. Throws as the forward does,
/// and std::invalid_argument when o, lse, dout or a gradient is missing.
void sdpa_backward_flash(const SdpaBackwardParams& p, void* scratch, void* stream);

}  // namespace attnbench::cuda
