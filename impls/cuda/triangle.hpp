// Host launcher of the CUDA triangle attention forward (impls/cuda/triangle.cu). Plain C++: the
// arguments are the CPU entry point's (impls/cpu/triangle.hpp), holding device pointers.
#pragma once

#include <cstddef>

#include "impls/cpu/triangle.hpp"

namespace attnbench::cuda {

/// Device scratch of triangle_attention_forward_cuda: the layer-normed x (N², c_z), the
/// projections [q | k | v | g] (N², 4·H·c), the pair bias (H, N, N) and the gated
/// concatenation (N², H·c) — O(N²), nothing O(N³).
size_t triangle_attention_forward_cuda_scratch_bytes(const triangle::TriangleShape& shape);

/// Enqueues the forward on `stream` (a cudaStream_t). `w` and `x` hold device pointers (z f32
/// or bf16, everything else f32); out (N, N, c_z) f32 on the device; `scratch` holds
/// triangle_attention_forward_cuda_scratch_bytes(shape) bytes. Throws std::runtime_error on
/// launch errors.
void triangle_attention_forward_cuda(float* out, const triangle::TriangleShape& shape, const TriangleWeightsF32& w,
                                     const TriangleActivations& x, void* scratch, void* stream);

}  // namespace attnbench::cuda
