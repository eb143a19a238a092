// Triangle attention, CUDA forward (AlphaFold2 Alg. 13/14, OpenFold `TriangleAttention`).
//
//   z (N, N, c_z) f32 or bf16, mask m (N, N)  →  out (N, N, c_z) f32         (starting node)
//   x = LayerNorm(z);  q, k, v, g = x W_{q,k,v,g}ᵀ (+ b_g);  b^h_jk = x_jk · W_b[h]
//   o^h_ij = sigmoid(g^h_ij) ⊙ Σ_k softmax_k(q^h_ij·k^h_ik/√c + b^h_jk + inf·(m_ik − max_k m_ik)) v^h_ik
//   out_ij = concat_h(o^h_ij) W_oᵀ + b_o;  ending node: the same on zᵀ, written back transposed.
// Same semantics and per-element arithmetic (impls/cuda/triangle_math.hpp) as the CPU kernel.
//
// Kernels, in launch order:
//   tri_layer_norm_bias_kernel  one warp per pair: layer norm into x (N², c_z), pair bias (H, N, N)
//   tri_mask_max_kernel         max_k m_ik per row (the mask's row-constant shift)
//   tri_linear_kernel           q | k | v | g projections and the output: 16×16 shared-memory tiles
//                               (tiled_linear.cuh, shared with ipa.cu)
//   tri_attend_kernel           one warp per (i, j, h), streaming over keys 32 at a time with an
//                               online softmax (warp shuffles); the accumulator lives in shared
//                               memory, one c-vector per warp. O(N²) memory, nothing O(N³).
//
// Strategies (no GPU was available while writing this file: it is built for sm_80/sm_90 with
// warnings as errors and its per-element arithmetic is the host-tested triangle_math.hpp; timings
// are to be measured with `attnbench run suites/triangle.json --impl cuda`):
//   | strategy                                                | status                             |
//   |---------------------------------------------------------|------------------------------------|
//   | materialized logits (like the reference)                | not written: O(H·N³) memory        |
//   | one warp per (i, j, h), keys from global memory         | this file (straightforward)        |
//   | query tiles per (i, h) block, K/V tiles in shared memory | next step: flash-attention tiling  |
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "impls/cuda/tiled_linear.cuh"
#include "impls/cuda/triangle.hpp"
#include "impls/cuda/triangle_math.hpp"
#include "impls/cuda/warp_reduce.cuh"

namespace attnbench::cuda {
namespace {

struct AttendTraits {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0, "whole warps");
};

/// Float offsets of the scratch regions (each a multiple of 4 floats, 16-byte aligned).
struct DeviceLayout {
  int64_t x, proj, bias, mmax, cat, total;
  explicit DeviceLayout(const triangle::TriangleShape& d) {
    const int64_t NN = d.N * d.N;
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t o = at;
      at += (n + 3) / 4 * 4;
      return o;
    };
    x = take(NN * d.c_z);              // layer-normed pairs, problem order (N², c_z)
    proj = take(NN * 4 * d.hidden());  // [q | k | v | g] (N², 4·H·c)
    bias = take(d.H * NN);             // b^h_jk (H, N, N)
    mmax = take(d.N);                  // max_k m_ik
    cat = take(NN * d.hidden());       // gated concatenation (N², H·c)
    total = at;
  }
};

__device__ __forceinline__ float load_z(const float* z, int64_t i) { return z[i]; }
__device__ __forceinline__ float load_z(const uint16_t* z, int64_t i) { return __uint_as_float(uint32_t(z[i]) << 16); }

/// One warp per pair (a, b) of the problem: x[a·N + b] = LayerNorm(z at pair(a, b)) and
/// bias[h, a, b] = x · W_b[h].
template <class ZT>
__global__ void tri_layer_norm_bias_kernel(triangle::TriangleShape d, const ZT* __restrict__ z,
                                           const float* __restrict__ ln_w, const float* __restrict__ ln_b,
                                           const float* __restrict__ wb, float* __restrict__ x,
                                           float* __restrict__ bias) {
  const int64_t NN = d.N * d.N;
  const int64_t pair = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = int(threadIdx.x % 32);
  if (pair >= NN) return;  // whole warps leave together
  const int64_t a = pair / d.N, b = pair % d.N, c_z = d.c_z;
  const ZT* zp = z + d.pair(a, b) * c_z;
  float s = 0.f;
  for (int64_t k = lane; k < c_z; k += 32) s += load_z(zp, k);
  const float mean = warp_sum(s) / float(c_z);
  float v = 0.f;
  for (int64_t k = lane; k < c_z; k += 32) {
    const float dv = load_z(zp, k) - mean;
    v += dv * dv;
  }
  const float inv = triangle::layer_norm_inv_std(warp_sum(v), c_z);
  float* xp = x + pair * c_z;
  for (int64_t k = lane; k < c_z; k += 32)
    xp[k] = triangle::layer_norm_apply(load_z(zp, k), mean, inv, ln_w[k], ln_b[k]);
  __syncwarp();
  for (int64_t h = 0; h < d.H; ++h) {
    float acc = 0.f;
    for (int64_t k = lane; k < c_z; k += 32) acc += xp[k] * wb[h * c_z + k];
    acc = warp_sum(acc);
    if (lane == 0) bias[h * NN + pair] = acc;
  }
}

/// mmax[a] = max_k mask at pair(a, k).
__global__ void tri_mask_max_kernel(triangle::TriangleShape d, const float* __restrict__ mask,
                                    float* __restrict__ mmax) {
  const int64_t a = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= d.N) return;
  float m = -INFINITY;
  for (int64_t k = 0; k < d.N; ++k) m = fmaxf(m, mask[d.pair(a, k)]);
  mmax[a] = m;
}

/// y (rows, outs; stride ldy) = x (rows, in; stride ldx) · wᵀ + b (b may be null), w (outs, in).
/// With remap_N > 0, row r = a·remap_N + b is stored at row b·remap_N + a (the ending node).
__global__ void tri_linear_kernel(const float* __restrict__ x, int64_t ldx, int64_t rows, int64_t in,
                                  const float* __restrict__ w, const float* __restrict__ b, int64_t outs,
                                  float* __restrict__ y, int64_t ldy, int64_t remap_N) {
  constexpr int T = tiled_linear::kTile;
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  // Row tiles on grid x (up to 2³¹ − 1 blocks: N² rows), output tiles on grid y (≤ 65 535).
  const int64_t r = int64_t(blockIdx.x) * T + ty;
  const int64_t o0 = int64_t(blockIdx.y) * T;
  const float acc = tiled_linear::tile_dot(x, ldx, rows, in, w, outs, r, o0, tx, ty);
  if (r < rows && o0 + tx < outs) {
    const int64_t dst = remap_N > 0 ? (r % remap_N) * remap_N + r / remap_N : r;
    y[dst * ldy + o0 + tx] = acc + (b ? b[o0 + tx] : 0.f);
  }
}

struct AttendParams {
  triangle::TriangleShape d;
  const float* proj;  // (N², 4·H·c) [q | k | v | g], problem order
  const float* bias;  // (H, N, N)
  const float* mask;  // (N, N) as stored (pair() maps)
  const float* mmax;  // (N)
  float* cat;         // (N², H·c)
};

/// One warp per (i, j, h); see the file comment. Dynamic shared memory: kWarps · c floats.
__global__ void __launch_bounds__(AttendTraits::kThreads) tri_attend_kernel(AttendParams a) {
  extern __shared__ float smem[];
  const triangle::TriangleShape& d = a.d;
  const int64_t N = d.N, c = d.c, Hc = d.hidden(), ld = 4 * Hc;
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int64_t task = int64_t(blockIdx.x) * AttendTraits::kWarps + warp;
  if (task >= N * N * d.H) return;  // whole warps leave together
  const int64_t h = task % d.H, ij = task / d.H, i = ij / N, j = ij % N;
  float* acc = smem + warp * c;
  for (int64_t e = lane; e < c; e += 32) acc[e] = 0.f;
  const float scale = rsqrtf(float(c));
  const float* q = a.proj + ij * ld + h * c;
  const float* bias = a.bias + (h * N + j) * N;
  const float row_max = a.mmax[i];
  triangle::OnlineSoftmax st;
  for (int64_t k0 = 0; k0 < N; k0 += 32) {
    const int64_t k = k0 + lane;
    float logit = -INFINITY;
    if (k < N) {
      const float* kr = a.proj + (i * N + k) * ld + Hc + h * c;
      float dot = 0.f;
      for (int64_t e = 0; e < c; ++e) dot += q[e] * kr[e];
      logit = dot * scale + bias[k] + triangle::mask_bias(a.mask[d.pair(i, k)], row_max);
    }
    const float rescale = triangle::online_softmax_rescale(st, warp_max(logit));
    const float p = k < N ? expf(logit - st.m) : 0.f;
    st.l += warp_sum(p);
    const int64_t nk = N - k0 < 32 ? N - k0 : 32;
    for (int64_t e = lane; e < c; e += 32) acc[e] *= rescale;
    for (int64_t kk = 0; kk < nk; ++kk) {
      const float pk = __shfl_sync(0xffffffffu, p, int(kk));
      const float* vr = a.proj + (i * N + k0 + kk) * ld + 2 * Hc + h * c;
      for (int64_t e = lane; e < c; e += 32) acc[e] += pk * vr[e];
    }
  }
  const float inv = triangle::online_softmax_inv_sum(st);
  const float* g = a.proj + ij * ld + 3 * Hc + h * c;
  for (int64_t e = lane; e < c; e += 32) a.cat[ij * Hc + h * c + e] = acc[e] * inv * triangle::sigmoid(g[e]);
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("triangle_attention cuda: ") + what + ": " + cudaGetErrorString(e));
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* w, const float* b, int64_t outs,
            float* y, int64_t ldy, int64_t remap_N, cudaStream_t s) {
  constexpr int T = tiled_linear::kTile;
  const dim3 grid(unsigned((rows + T - 1) / T), unsigned((outs + T - 1) / T));
  tri_linear_kernel<<<grid, dim3(T, T), 0, s>>>(x, ldx, rows, in, w, b, outs, y, ldy, remap_N);
  check_launch("tri_linear_kernel");
}

unsigned blocks_for(int64_t n, int64_t per_block) { return unsigned((n + per_block - 1) / per_block); }

}  // namespace

size_t triangle_attention_forward_cuda_scratch_bytes(const triangle::TriangleShape& shape) {
  return size_t(DeviceLayout(shape).total) * sizeof(float);
}

void triangle_attention_forward_cuda(float* out, const triangle::TriangleShape& d, const TriangleWeightsF32& w,
                                     const TriangleActivations& x, void* scratch, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const DeviceLayout lay(d);
  float* base = static_cast<float*>(scratch);
  const int64_t N = d.N, NN = d.N * d.N, Hc = d.hidden(), c_z = d.c_z;

  const unsigned ln_blocks = blocks_for(NN * 32, 128);
  if (x.z_dtype == DType::bf16)
    tri_layer_norm_bias_kernel<uint16_t><<<ln_blocks, 128, 0, s>>>(d, static_cast<const uint16_t*>(x.z), w.ln_w, w.ln_b,
                                                                   w.wb, base + lay.x, base + lay.bias);
  else
    tri_layer_norm_bias_kernel<float><<<ln_blocks, 128, 0, s>>>(d, static_cast<const float*>(x.z), w.ln_w, w.ln_b, w.wb,
                                                                base + lay.x, base + lay.bias);
  check_launch("tri_layer_norm_bias_kernel");
  tri_mask_max_kernel<<<blocks_for(N, 128), 128, 0, s>>>(d, x.mask, base + lay.mmax);
  check_launch("tri_mask_max_kernel");

  float* proj = base + lay.proj;
  const float* parts[4] = {w.wq, w.wk, w.wv, w.wg};
  for (int p = 0; p < 4; ++p)
    linear(base + lay.x, c_z, NN, c_z, parts[p], p == 3 ? w.bg : nullptr, Hc, proj + p * Hc, 4 * Hc, 0, s);

  const AttendParams ap{d, proj, base + lay.bias, x.mask, base + lay.mmax, base + lay.cat};
  const size_t smem = size_t(AttendTraits::kWarps) * size_t(d.c) * sizeof(float);
  tri_attend_kernel<<<blocks_for(NN * d.H, AttendTraits::kWarps), AttendTraits::kThreads, smem, s>>>(ap);
  check_launch("tri_attend_kernel");
  linear(base + lay.cat, Hc, NN, Hc, w.wo, w.bo, c_z, out, c_z, d.starting ? 0 : N, s);
}

}  // namespace attnbench::cuda
