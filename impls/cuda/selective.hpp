// Host launchers of the CUDA fused selective attention (impls/cuda/selective.cu). Plain
// C++: the parameters are the CPU entry points' (impls/cpu/selective.hpp), holding device
// pointers.
#pragma once

#include <cstddef>

#include "impls/cpu/selective.hpp"

namespace attnbench::cuda {

/// Device scratch of the forward and of the backward: f32 copies of x and the weights,
/// the five projections, the augmented queries/keys/values, the row statistics and the
/// SDPA kernels' own scratch (the backward adds the gradients of those).
size_t selective_forward_fused_cuda_scratch_bytes(const SelectiveParams& p);
size_t selective_backward_fused_cuda_scratch_bytes(const SelectiveParams& p);

/// Enqueue the fused exact form on `stream` (a cudaStream_t): the forward writes o, the
/// backward dx, dwq, dwk, dwv (recomputing the forward; the CPU entry point reads a saved one).
/// x, the weights and dout: f32 or bf16; everything written is f32. Throws
/// std::invalid_argument when the augmented head dimension exceeds the SDPA kernel's limit,
/// std::runtime_error on launch errors.
void selective_forward_fused_cuda(const SelectiveParams& p, void* scratch, void* stream);
void selective_backward_fused_cuda(const SelectiveParams& p, void* scratch, void* stream);

}  // namespace attnbench::cuda
