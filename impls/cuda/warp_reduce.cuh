// Warp-wide reductions over the 32 lanes of a full warp (every lane gets the result), used by
// the online softmax of every CUDA attention kernel: impls/cuda/flash_tile.cuh (sdpa.cu,
// masked.cu), impls/cuda/ipa.cu and impls/cuda/triangle.cu. Butterfly order (xor 16, 8, 4, 2,
// 1), so the float sum is the same on every lane.
#pragma once

#include <cuda_runtime.h>

namespace attnbench::cuda {

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace attnbench::cuda
