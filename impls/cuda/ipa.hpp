// Host launcher of the CUDA IPA forward (impls/cuda/ipa.cu). Plain C++: the arguments are
// the CPU entry point's (impls/cpu/ipa.hpp), holding device pointers.
#pragma once

#include <cstddef>

#include "impls/cpu/ipa.hpp"

namespace attnbench::cuda {

/// Device scratch of ipa_forward_fused_cuda: O(N) projections and the concatenation.
size_t ipa_forward_fused_cuda_scratch_bytes(const ipa::IpaShape& shape);

/// Enqueues the forward on `stream` (a cudaStream_t). `w` and `x` hold device pointers
/// (z f32 or bf16, everything else f32); out (N, c_s) f32 on the device; `scratch` holds
/// ipa_forward_fused_cuda_scratch_bytes(shape) bytes. Throws std::invalid_argument when the
/// per-block shared memory of the shape exceeds the device's limit, std::runtime_error on
/// launch errors.
void ipa_forward_fused_cuda(float* out, const ipa::IpaShape& shape, const IpaWeightsF32& w, const IpaActivations& x,
                            void* scratch, void* stream);

}  // namespace attnbench::cuda
