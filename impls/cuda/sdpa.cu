// Scaled-dot-product attention, flash-style CUDA forward (DESIGN §5 "SDPA").
//
//   q: (B, H, Nq, D)   k, v: (B, Hkv, Nkv, D)   kv_len: (B,)   head h reads kv head h/(H/Hkv)
//   o_i = Σ_j softmax_j(RoPE(q_i)·RoPE(k_j)/√D + mask_ij) v_j            o: (B, H, Nq, D) f32
//   mask_ij = 0 if j < lim_i else −inf,  lim_i = min(kv_len[b], causal ? i + Nkv − Nq + 1 : Nkv)
//   weights (need_weights): the probabilities, (B, H, Nq, Nkv) f32
//
// One CTA of 128 threads per (64-query tile, b, h); it walks the 64-key tiles
// [0, lim of its last row) (later tiles are fully masked: row limits grow with
// i) keeping Q, one K-or-V tile and the 64×64 score tile in shared memory and
// the 64×D output accumulator in registers (8 rows × D/16 columns per thread).
// Per key tile: S = Q·Kᵀ (8×4 scores per thread) → mask → online softmax (one
// warp per 16 rows, two columns per lane, base-2 with log2(e)/√D folded into Q)
// → V replaces K in shared memory → O = alpha·O + P·V. f32 accumulation for all
// input dtypes (f32, bf16, f16, widened while loading the tiles). RoPE uses a
// cos/sin table computed in double once per call. need_weights: the forward
// also stores each row's (m, l), then a second kernel recomputes S per
// (query tile, key tile) and writes 2^(S − m)/l. The tile steps (traits and shared
// memory, tile loading, S = Q·Kᵀ, online softmax, O update, output) are shared with
// masked.cu in flash_tile.cuh; this file keeps the row limits, the walk over
// [0, lim), the RoPE position table and the weights pass.
//
// Strategies (no GPU was available while writing this; not yet measured):
// | strategy                                                     | status              |
// |--------------------------------------------------------------|---------------------|
// | SIMT flash forward, f32 FMA, K/V share one smem buffer       | this file           |
// | tensor-core mma (bf16/f16) and cp.async double buffering     | next, needs a GPU   |

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "impls/cuda/flash_tile.cuh"
#include "impls/cuda/sdpa.hpp"
#include "impls/cuda/sdpa_math.hpp"

namespace attnbench::cuda {
namespace {

namespace sm = attnbench::sdpa_math;

/// Tile shapes of the forward (flash_tile.cuh) for a head dimension padded to kD.
template <int kD>
struct SdpaFlashTraits : flash::TileTraits<kD> {
  using Base = flash::TileTraits<kD>;
  // __launch_bounds__ minimum CTAs per SM: 1 lets ptxas use up to 255 registers. Without it
  // ptxas aimed at 168 registers at D = 128 (3 CTAs per SM) and spilled 20 bytes (60 bytes
  // reloaded) in five of the six D = 128 forward instances; occupancy is bounded by the
  // shared memory anyway (83 712 bytes per CTA at D = 128).
  static constexpr int kMinBlocks = 1;
  static constexpr size_t kWeightsSmemBytes = sizeof(float) * (Base::kQFloats + Base::kKVFloats);  // Q, K
};

struct KernelArgs {
  SdpaParams p;
  const float* cos_t;  // (n_pos, D/2) RoPE table from position pos_min, or null
  const float* sin_t;
  float* stat_m;  // (B, H, Nq) softmax statistics for the weights pass, or null
  float* stat_l;
  int64_t pos_min;
  float q_scale;  // log2(e)/√D
};

/// A q, k or v slice of n rows as flash::load_tile reads it: RoPE (mode p.rope) when
/// `rot`, tile row r at position pos0 + r, i.e. row pos0 + r − pos_min of the table.
struct SliceRows {
  int64_t n;
  int64_t pos0;
  const KernelArgs& a;
  bool rot;
  __device__ __forceinline__ int64_t n_rows() const { return n; }
  __device__ __forceinline__ int dim() const { return int(a.p.D); }
  __device__ __forceinline__ bool rotate() const { return rot; }
  __device__ __forceinline__ sm::RopePair pair(int D, int d) const { return sm::rope_pair(int(a.p.rope), D, d); }
  __device__ __forceinline__ int64_t index(int half, int64_t /*i*/, int r, int freq) const {
    return (pos0 + r - a.pos_min) * half + freq;
  }
  __device__ __forceinline__ const float* cos_t() const { return a.cos_t; }
  __device__ __forceinline__ const float* sin_t() const { return a.sin_t; }
};

template <DType kT, int kD, bool kCausal>
__global__ void __launch_bounds__(SdpaFlashTraits<kD>::kThreads, SdpaFlashTraits<kD>::kMinBlocks)
    sdpa_forward_flash_kernel(const KernelArgs a) {
  using Tr = SdpaFlashTraits<kD>;
  using Store = typename sm::Elem<kT>::type;
  const SdpaParams& p = a.p;
  extern __shared__ float smem[];
  const flash::Smem<Tr> sh(smem);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int warp = tid / 32, lane = tid % 32;
  const int64_t qt = int64_t(gridDim.x) - 1 - blockIdx.x;  // heaviest causal tiles first
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int64_t i0 = qt * Tr::kBlockM;
  const int64_t kv_len = p.kv_len ? p.kv_len[b] : p.Nkv;
  // Row limits are non-decreasing in i: the last row of the tile sees the most keys.
  const int64_t last = (i0 + Tr::kBlockM < p.Nq ? i0 + Tr::kBlockM : p.Nq) - 1;
  const int64_t hi = sm::row_limit(last, p.Nq, p.Nkv, kv_len, kCausal);
  const bool rotate = a.cos_t != nullptr;

  const Store* q = static_cast<const Store*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
  const Store* k = static_cast<const Store*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const Store* v = static_cast<const Store*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  flash::load_tile<kT, Tr>(sh.q, q, p.q_strides.n, SliceRows{p.Nq, sm::query_position(i0, p.Nq, p.Nkv), a, rotate}, i0,
                           a.q_scale);
  flash::init_row_stats(sh, tid);
  int64_t lim[Tr::kRowsPerThread];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int64_t i = i0 + ty * Tr::kRowsPerThread + r;
    lim[r] = i < p.Nq ? sm::row_limit(i, p.Nq, p.Nkv, kv_len, kCausal) : 0;
  }
  float o[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(o);
  __syncthreads();

  for (int64_t j0 = 0; j0 < hi; j0 += Tr::kBlockN) {
    // S = Q·Kᵀ, masked: keys j ≥ lim_i → −inf.
    flash::load_tile<kT, Tr>(sh.kv, k, p.k_strides.n, SliceRows{p.Nkv, j0, a, rotate}, j0, 1.0f);
    __syncthreads();
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    flash::tile_scores<Tr>(sh.q, sh.kv, ty, tx, acc);
    flash::store_scores<Tr>(sh.s, ty, tx, acc,
                            [&](int r, int col, float s) { return j0 + col < lim[r] ? s : sm::kNegInf; });
    __syncthreads();

    flash::online_softmax(sh, warp, lane);
    // V replaces K (every thread finished reading K before the barrier above).
    flash::load_tile<kT, Tr>(sh.kv, v, p.v_strides.n, SliceRows{p.Nkv, j0, a, false}, j0, 1.0f);
    __syncthreads();
    flash::accumulate_pv(sh, ty, tx, o);
    __syncthreads();
  }

  flash::store_output<Tr>(p.o + b * p.o_strides.b + h * p.o_strides.h, p.o_strides.n, i0, p.Nq, p.D, sh.l, ty, tx, o);
  if (a.stat_m != nullptr && tid < Tr::kBlockM && i0 + tid < p.Nq) {
    a.stat_m[bh * p.Nq + i0 + tid] = sh.m[tid];
    a.stat_l[bh * p.Nq + i0 + tid] = sh.l[tid];
  }
}

/// weights[b, h, i, j] = 2^(s_ij − m_i)/l_i for allowed keys, 0 otherwise; one CTA
/// per (key tile, query tile, b·h), from the statistics the forward stored.
template <DType kT, int kD>
__global__ void __launch_bounds__(SdpaFlashTraits<kD>::kThreads) sdpa_weights_kernel(const KernelArgs a) {
  using Tr = SdpaFlashTraits<kD>;
  using Store = typename sm::Elem<kT>::type;
  const SdpaParams& p = a.p;
  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_s = q_s + Tr::kQFloats;
  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int64_t j0 = int64_t(blockIdx.x) * Tr::kBlockN, i0 = int64_t(blockIdx.y) * Tr::kBlockM;
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int64_t kv_len = p.kv_len ? p.kv_len[b] : p.Nkv;
  const bool rotate = a.cos_t != nullptr;
  const Store* q = static_cast<const Store*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
  const Store* k = static_cast<const Store*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  flash::load_tile<kT, Tr>(q_s, q, p.q_strides.n, SliceRows{p.Nq, sm::query_position(i0, p.Nq, p.Nkv), a, rotate}, i0,
                           a.q_scale);
  flash::load_tile<kT, Tr>(k_s, k, p.k_strides.n, SliceRows{p.Nkv, j0, a, rotate}, j0, 1.0f);
  __syncthreads();
  float acc[Tr::kRowsPerThread][Tr::kSCols];
  flash::tile_scores<Tr>(q_s, k_s, ty, tx, acc);
  float* w = p.weights + b * p.w_strides.b + h * p.w_strides.h;
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int64_t i = i0 + ty * Tr::kRowsPerThread + r;
    if (i >= p.Nq) continue;
    const int64_t lim = sm::row_limit(i, p.Nq, p.Nkv, kv_len, p.causal);
    const float m = a.stat_m[bh * p.Nq + i], l = a.stat_l[bh * p.Nq + i];
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) {
      const int64_t j = j0 + tx + Tr::kColLanes * c;
      if (j >= p.Nkv) continue;
      w[i * p.w_strides.n + j] = j < lim ? sm::softmax_finish(sm::softmax_prob(acc[r][c], m), l) : 0.0f;
    }
  }
}

/// cos/sin of θ_f · pos for pos ∈ [pos_min, pos_min + n_pos), f < D/2, in double.
__global__ void sdpa_rope_table_kernel(float* cos_t, float* sin_t, int64_t n_pos, int64_t pos_min, int D) {
  const int half = D / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_pos * half) return;
  double s, c;
  sincos(sm::rope_angle(pos_min + idx / half, int(idx % half), D), &s, &c);
  cos_t[idx] = float(c);
  sin_t[idx] = float(s);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("sdpa cuda: ") + what + ": " + cudaGetErrorString(e));
}

template <DType kT, int kD, bool kCausal>
void launch_typed(const KernelArgs& a, cudaStream_t stream) {
  using Tr = SdpaFlashTraits<kD>;
  const SdpaParams& p = a.p;
  const auto forward = sdpa_forward_flash_kernel<kT, kD, kCausal>;
  check(cudaFuncSetAttribute(forward, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)),
        "shared memory attribute (forward)");
  const dim3 grid(unsigned((p.Nq + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(p.B * p.H));
  forward<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  check(cudaGetLastError(), "forward kernel");
  if (p.weights == nullptr) return;
  const auto weights = sdpa_weights_kernel<kT, kD>;
  check(cudaFuncSetAttribute(weights, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kWeightsSmemBytes)),
        "shared memory attribute (weights)");
  const dim3 wgrid(unsigned((p.Nkv + Tr::kBlockN - 1) / Tr::kBlockN), grid.x, grid.y);
  weights<<<wgrid, Tr::kThreads, Tr::kWeightsSmemBytes, stream>>>(a);
  check(cudaGetLastError(), "weights kernel");
}

struct ScratchLayout {
  int64_t pos_min = 0, n_pos = 0;
  size_t rope_floats = 0, stat_floats = 0;
  explicit ScratchLayout(const SdpaParams& p) {
    pos_min = p.Nkv - p.Nq < 0 ? p.Nkv - p.Nq : 0;
    n_pos = p.Nkv - pos_min;
    if (p.rope != SdpaRope::none) rope_floats = size_t(2 * n_pos * (p.D / 2));
    if (p.weights != nullptr) stat_floats = size_t(2 * p.B * p.H * p.Nq);
  }
  // Each part starts on a 256-byte boundary.
  static size_t padded(size_t floats) { return (floats + 63) / 64 * 64; }
  size_t bytes() const { return sizeof(float) * (padded(rope_floats) + padded(stat_floats)); }
};

}  // namespace

size_t sdpa_forward_flash_scratch_bytes(const SdpaParams& p) { return ScratchLayout(p).bytes(); }

void sdpa_forward_flash(const SdpaParams& p, void* scratch, void* stream_ptr) {
  if (p.D < 1 || p.D > kSdpaMaxHeadDim)
    throw std::invalid_argument("sdpa cuda: D must be in [1, " + std::to_string(kSdpaMaxHeadDim) + "], got " +
                                std::to_string(p.D));
  if (p.H % p.Hkv != 0) throw std::invalid_argument("sdpa cuda: H must be a multiple of Hkv");
  if (p.rope != SdpaRope::none && p.D % 2 != 0) throw std::invalid_argument("sdpa cuda: RoPE needs an even D");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const ScratchLayout lay(p);
  float* base = static_cast<float*>(scratch);

  KernelArgs a{};
  a.p = p;
  a.pos_min = lay.pos_min;
  a.q_scale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  if (lay.rope_floats != 0) {
    float* cos_t = base;
    float* sin_t = cos_t + lay.rope_floats / 2;
    const int64_t n = lay.n_pos * (p.D / 2);
    sdpa_rope_table_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(cos_t, sin_t, lay.n_pos, lay.pos_min,
                                                                          int(p.D));
    check(cudaGetLastError(), "rope table kernel");
    a.cos_t = cos_t;
    a.sin_t = sin_t;
  }
  if (lay.stat_floats != 0) {
    a.stat_m = base + ScratchLayout::padded(lay.rope_floats);
    a.stat_l = a.stat_m + lay.stat_floats / 2;
  }
  const bool launched = flash::dispatch(p.dtype, p.D, [&]<DType kT, int kD>(flash::Instance<kT, kD>) {
    if (p.causal)
      launch_typed<kT, kD, true>(a, stream);
    else
      launch_typed<kT, kD, false>(a, stream);
  });
  if (!launched) throw std::invalid_argument("sdpa cuda: q, k, v must be f32, bf16 or f16");
}

}  // namespace attnbench::cuda
