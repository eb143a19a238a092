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
// (query tile, key tile) and writes 2^(S − m)/l.
//
// Strategies (no GPU was available while writing this; not yet measured):
// | strategy                                                     | status              |
// |--------------------------------------------------------------|---------------------|
// | SIMT flash forward, f32 FMA, K/V share one smem buffer       | this file           |
// | tensor-core mma (bf16/f16) and cp.async double buffering     | next, needs a GPU   |

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "impls/cuda/sdpa.hpp"
#include "impls/cuda/sdpa_math.hpp"

namespace attnbench::cuda {
namespace {

namespace sm = attnbench::sdpa_math;

/// Tile shapes of the forward kernel for a head dimension padded to kHeadDim.
template <int kHeadDim>
struct SdpaFlashTraits {
  static constexpr int kD = kHeadDim;
  static constexpr int kBlockM = 64;  // query rows per CTA
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  // Thread grid over the S and O tiles: 8 row groups × 16 column lanes; thread
  // (ty, tx) owns rows ty·8 + r and columns tx + 16·c.
  static constexpr int kRowGroups = 8, kColLanes = 16;
  static constexpr int kRowsPerThread = kBlockM / kRowGroups;
  static constexpr int kSCols = kBlockN / kColLanes;
  static constexpr int kOCols = kD / kColLanes;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;  // softmax rows of one warp
  // Shared memory in floats; strides padded so the access patterns above are
  // conflict-free (row groups of one warp land 8 or 16 banks apart).
  static constexpr int kQStride = kD + 1;
  static constexpr int kKVStride = kD + 1;
  static constexpr int kSStride = kBlockN + 2;
  static constexpr int kQFloats = kBlockM * kQStride;
  static constexpr int kKVFloats = kBlockN * kKVStride;
  static constexpr int kSFloats = kBlockM * kSStride;
  static constexpr int kStatFloats = 3 * kBlockM;  // m, l, alpha
  static constexpr size_t kSmemBytes = sizeof(float) * (kQFloats + kKVFloats + kSFloats + kStatFloats);
  static constexpr size_t kWeightsSmemBytes = sizeof(float) * (kQFloats + kKVFloats);

  static_assert(kD % 32 == 0, "head dim padded to a multiple of 32");
  static_assert(kBlockM == kBlockN, "one tile loader for Q and K/V rows");
  static_assert(kRowGroups * kColLanes == kThreads, "thread grid covers the block");
  static_assert(kBlockN == 64, "softmax: each lane owns two columns of a row");
  static_assert(kBlockM % kWarps == 0, "softmax rows split evenly over warps");
  static_assert(kSmemBytes <= 163 * 1024, "fits an A100's shared memory per block (sm_80)");
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

/// Loads rows [row0, row0 + 64) of a (rows, D) slice into shared memory as f32
/// (stride kD + 1), zero beyond n_rows and beyond D, RoPE-rotated at positions
/// pos0 + r when the table is set, times `scale`.
template <DType kT, class Tr>
__device__ void load_tile(float* dst, const typename sm::Elem<kT>::type* src, int64_t row_stride, int64_t row0,
                          int64_t n_rows, int64_t pos0, const KernelArgs& a, bool rotate, float scale) {
  using E = sm::Elem<kT>;
  const int D = int(a.p.D), half = D / 2;
  for (int idx = threadIdx.x; idx < Tr::kBlockN * Tr::kD; idx += Tr::kThreads) {
    const int r = idx / Tr::kD, d = idx % Tr::kD;
    float x = 0.0f;
    if (row0 + r < n_rows && d < D) {
      const typename E::type* row = src + (row0 + r) * row_stride;
      x = E::to_f32(row[d]);
      if (rotate) {
        const sm::RopePair pr = sm::rope_pair(int(a.p.rope), D, d);
        const int64_t t = (pos0 + r - a.pos_min) * half + pr.freq;
        x = sm::rope_rotate(x, E::to_f32(row[pr.partner]), a.cos_t[t], a.sin_t[t], pr.second);
      }
      x *= scale;
    }
    dst[r * Tr::kQStride + d] = x;
  }
}

/// acc[r][c] = q_row(ty·8 + r) · k_row(tx + 16c) over the padded head dim.
template <class Tr>
__device__ __forceinline__ void tile_scores(const float* q_s, const float* k_s, int ty, int tx,
                                            float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) acc[r][c] = 0.0f;
#pragma unroll 4
  for (int d = 0; d < Tr::kD; ++d) {
    float kv[Tr::kSCols];
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) kv[c] = k_s[(tx + Tr::kColLanes * c) * Tr::kKVStride + d];
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r) {
      const float qv = q_s[(ty * Tr::kRowsPerThread + r) * Tr::kQStride + d];
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) acc[r][c] = fmaf(qv, kv[c], acc[r][c]);
    }
  }
}

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

template <DType kT, int kD, bool kCausal>
__global__ void __launch_bounds__(SdpaFlashTraits<kD>::kThreads) sdpa_forward_flash_kernel(const KernelArgs a) {
  using Tr = SdpaFlashTraits<kD>;
  using Store = typename sm::Elem<kT>::type;
  const SdpaParams& p = a.p;
  extern __shared__ float smem[];
  float* q_s = smem;                   // (kBlockM, kQStride)
  float* kv_s = q_s + Tr::kQFloats;    // (kBlockN, kKVStride) K, then V
  float* s_s = kv_s + Tr::kKVFloats;   // (kBlockM, kSStride) scores, then probabilities
  float* m_s = s_s + Tr::kSFloats;     // (kBlockM,) running max
  float* l_s = m_s + Tr::kBlockM;      // (kBlockM,) running sum
  float* alpha_s = l_s + Tr::kBlockM;  // (kBlockM,) rescale of the current tile

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
  load_tile<kT, Tr>(q_s, q, p.q_strides.n, i0, p.Nq, sm::query_position(i0, p.Nq, p.Nkv), a, rotate, a.q_scale);
  if (tid < Tr::kBlockM) {
    m_s[tid] = sm::kNegInf;
    l_s[tid] = 0.0f;
  }
  int64_t lim[Tr::kRowsPerThread];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int64_t i = i0 + ty * Tr::kRowsPerThread + r;
    lim[r] = i < p.Nq ? sm::row_limit(i, p.Nq, p.Nkv, kv_len, kCausal) : 0;
  }
  float o[Tr::kRowsPerThread][Tr::kOCols];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = 0.0f;
  __syncthreads();

  for (int64_t j0 = 0; j0 < hi; j0 += Tr::kBlockN) {
    // S = Q·Kᵀ, masked.
    load_tile<kT, Tr>(kv_s, k, p.k_strides.n, j0, p.Nkv, j0, a, rotate, 1.0f);
    __syncthreads();
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    tile_scores<Tr>(q_s, kv_s, ty, tx, acc);
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) {
        const int col = tx + Tr::kColLanes * c;
        s_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + col] = j0 + col < lim[r] ? acc[r][c] : sm::kNegInf;
      }
    __syncthreads();

    // Online softmax, one warp per kRowsPerWarp rows, two columns per lane.
    for (int rr = 0; rr < Tr::kRowsPerWarp; ++rr) {
      const int row = warp * Tr::kRowsPerWarp + rr;
      float* srow = s_s + row * Tr::kSStride;
      const float m_old = m_s[row], l_old = l_s[row];
      const float s0 = srow[lane], s1 = srow[lane + 32];
      const float m_new = sm::softmax_new_max(m_old, warp_max(fmaxf(s0, s1)));
      const float p0 = sm::softmax_prob(s0, m_new), p1 = sm::softmax_prob(s1, m_new);
      const float sum = warp_sum(p0 + p1);
      srow[lane] = p0;
      srow[lane + 32] = p1;
      __syncwarp();
      if (lane == 0) {
        const float alpha = sm::softmax_alpha(m_old, m_new);
        alpha_s[row] = alpha;
        l_s[row] = alpha * l_old + sum;
        m_s[row] = m_new;
      }
    }
    // V replaces K (every thread finished reading K before the barrier above).
    load_tile<kT, Tr>(kv_s, v, p.v_strides.n, j0, p.Nkv, j0, a, false, 1.0f);
    __syncthreads();

    // O = alpha·O + P·V.
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r) {
      const float alpha = alpha_s[ty * Tr::kRowsPerThread + r];
#pragma unroll
      for (int c = 0; c < Tr::kOCols; ++c) o[r][c] *= alpha;
    }
#pragma unroll 2
    for (int j = 0; j < Tr::kBlockN; ++j) {
      float vv[Tr::kOCols];
#pragma unroll
      for (int c = 0; c < Tr::kOCols; ++c) vv[c] = kv_s[j * Tr::kKVStride + tx + Tr::kColLanes * c];
#pragma unroll
      for (int r = 0; r < Tr::kRowsPerThread; ++r) {
        const float pv = s_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + j];
#pragma unroll
        for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = fmaf(pv, vv[c], o[r][c]);
      }
    }
    __syncthreads();
  }

  float* out = p.o + b * p.o_strides.b + h * p.o_strides.h;
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int row = ty * Tr::kRowsPerThread + r;
    if (i0 + row >= p.Nq) continue;
    const float l = l_s[row];
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) {
      const int d = tx + Tr::kColLanes * c;
      if (d < p.D) out[(i0 + row) * p.o_strides.n + d] = sm::softmax_finish(o[r][c], l);
    }
  }
  if (a.stat_m != nullptr && tid < Tr::kBlockM && i0 + tid < p.Nq) {
    a.stat_m[bh * p.Nq + i0 + tid] = m_s[tid];
    a.stat_l[bh * p.Nq + i0 + tid] = l_s[tid];
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
  load_tile<kT, Tr>(q_s, q, p.q_strides.n, i0, p.Nq, sm::query_position(i0, p.Nq, p.Nkv), a, rotate, a.q_scale);
  load_tile<kT, Tr>(k_s, k, p.k_strides.n, j0, p.Nkv, j0, a, rotate, 1.0f);
  __syncthreads();
  float acc[Tr::kRowsPerThread][Tr::kSCols];
  tile_scores<Tr>(q_s, k_s, ty, tx, acc);
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

template <DType kT, int kD>
void launch_causal(const KernelArgs& a, cudaStream_t stream) {
  if (a.p.causal)
    launch_typed<kT, kD, true>(a, stream);
  else
    launch_typed<kT, kD, false>(a, stream);
}

template <DType kT>
void launch_head_dim(const KernelArgs& a, cudaStream_t stream) {
  const int64_t D = a.p.D;
  if (D <= 32) return launch_causal<kT, 32>(a, stream);
  if (D <= 64) return launch_causal<kT, 64>(a, stream);
  if (D <= 128) return launch_causal<kT, 128>(a, stream);
  launch_causal<kT, 256>(a, stream);
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
  switch (p.dtype) {
    case DType::f32:
      return launch_head_dim<DType::f32>(a, stream);
    case DType::bf16:
      return launch_head_dim<DType::bf16>(a, stream);
    case DType::f16:
      return launch_head_dim<DType::f16>(a, stream);
    default:
      throw std::invalid_argument("sdpa cuda: q, k, v must be f32, bf16 or f16");
  }
}

}  // namespace attnbench::cuda
