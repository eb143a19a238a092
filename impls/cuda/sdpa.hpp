// Host launcher of the CUDA SDPA forward (impls/cuda/sdpa.cu). Plain C++: the
// parameters are the CPU entry point's (impls/cpu/sdpa.hpp), with device pointers.
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
void sdpa_forward_flash(const SdpaParams& p, void* scratch, void* stream);

}  // namespace attnbench::cuda
