// Shared by CPU kernels, CUDA kernels and the tests that exercise CUDA
// arithmetic on the host: ATTNBENCH_HD marks helpers usable on both sides.
#pragma once

#if defined(__CUDACC__)
#define ATTNBENCH_HD __host__ __device__ __forceinline__
#else
#define ATTNBENCH_HD inline
#endif
