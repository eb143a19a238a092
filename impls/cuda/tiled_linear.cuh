// The inner product of the small nn.Linear layers y = x·wᵀ + b of the CUDA IPA and triangle
// attention forwards (ipa_linear_kernel in impls/cuda/ipa.cu, tri_linear_kernel in
// impls/cuda/triangle.cu): a kTile × kTile thread block computes a kTile × kTile tile of
// y, staging kTile-wide slices of x and w through shared memory. The kernels keep what
// differs: which grid axis walks rows and which outputs, the bias and where a row is stored.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attnbench::cuda::tiled_linear {

inline constexpr int kTile = 16;  // rows × outputs × k per step

/// Σ_k x[r, k] · w[o0 + tx, k] for thread (tx, ty) of a kTile × kTile block whose tile starts
/// at row r − ty and output o0; x (rows, in; stride ldx), w (outs, in). Rows ≥ rows and
/// outputs ≥ outs read zeros (the result of such a thread is not to be stored). Every thread
/// of the block must call it: it synchronizes the block.
__device__ __forceinline__ float tile_dot(const float* __restrict__ x, int64_t ldx, int64_t rows, int64_t in,
                                          const float* __restrict__ w, int64_t outs, int64_t r, int64_t o0, int tx,
                                          int ty) {
  constexpr int T = kTile;
  __shared__ float xs[T][T + 1];
  __shared__ float ws[T][T + 1];
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < in; k0 += T) {
    xs[ty][tx] = (r < rows && k0 + tx < in) ? x[r * ldx + k0 + tx] : 0.f;
    ws[ty][tx] = (o0 + ty < outs && k0 + tx < in) ? w[(o0 + ty) * in + k0 + tx] : 0.f;
    __syncthreads();
    for (int kk = 0; kk < T; ++kk) acc += xs[ty][kk] * ws[tx][kk];
    __syncthreads();
  }
  return acc;
}

}  // namespace attnbench::cuda::tiled_linear
