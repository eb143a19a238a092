// Scaled-dot-product attention, flash-style CUDA forward and backward (DESIGN §5 "SDPA").
//
//   q: (B, H, Nq, D)   k, v: (B, Hkv, Nkv, D)   kv_len: (B,)   head h reads kv head h/(H/Hkv)
//   o_i = Σ_j softmax_j(RoPE(q_i)·RoPE(k_j)/√D + mask_ij) v_j            o: (B, H, Nq, D) f32
//   mask_ij = 0 if j < lim_i else −inf,  lim_i = min(kv_len[b], causal ? i + Nkv − Nq + 1 : Nkv)
//   weights (need_weights): the probabilities, (B, H, Nq, Nkv) f32
//   lse (when set): log Σ_j exp(s_ij + mask_ij), (B, H, Nq) f32, −inf for a row without keys
//
// Forward. One CTA of 128 threads per (64-query tile, b, h); it walks the 64-key tiles
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
// Backward (FlashAttention-2), gradients of Σ ⟨dO, o⟩, dq: (B, H, Nq, D), dk, dv: (B, Hkv, Nkv, D) f32:
//   P_ij = exp(s_ij − lse_i) (recomputed)   Δ_i = dO_i·o_i   dP_ij = dO_i·v_j   dS_ij = P_ij (dP_ij − Δ_i)
//   dv_j = Σ_i P_ij dO_i    dk̃_j = Σ_i dS_ij q̃_i/√D    dq̃_i = Σ_j dS_ij k̃_j/√D    (q̃, k̃ rotated)
//   dq, dk = RoPE⁻¹(dq̃), RoPE⁻¹(dk̃) (the pair rotation by −θ);   GQA: dk, dv summed over the H/Hkv heads
// Kernels: Δ (one warp per row) → dK/dV (one CTA per (64-key tile, head-dim chunk, b, kv head),
// looping over the group's query heads and the query tiles from the first row that sees the
// tile, no atomics) → dQ (one CTA per (64-query tile, chunk, b, h) over the key tiles
// [0, lim of its last row)) → RoPE⁻¹ in place on dq and dk. dQ is a separate kernel rather
// than atomics from the dK/dV CTAs: deterministic, and no f32 atomic traffic on dq. Both
// main kernels work in head-dim chunks of kC = min(padded D, 64) columns (flash_tile.cuh's
// backward section): S and dP are sums over the chunks, each CTA accumulating one chunk of
// its output rows, so 84 KB of shared memory and ≤ 64 accumulators per thread serve every
// D ≤ 256 without spills, at the price of recomputing S and dP once per chunk. A row without
// keys has lse = −inf, so P = dS = 0 and its gradients are 0; keys that no row sees get 0.
// ptxas (CUDA 13.0, sm_80 / sm_90), no spills in any kernel: forward 135–160 / 152–160 / 189–208 /
// 255 registers at D = 32 / 64 / 128 / 256; backward dK/dV 161–168 (kC = 32) and 191–250 (kC = 64),
// dQ 128–168, Δ ≤ 32, RoPE⁻¹ 28; backward shared memory 51 200 / 83 968 bytes per CTA (kC = 32 / 64).
//
// Strategies (no GPU was available while writing this; nothing here has been measured):
// | strategy                                                          | status              |
// |-------------------------------------------------------------------|---------------------|
// | SIMT flash forward, f32 FMA, K/V share one smem buffer            | this file           |
// | __launch_bounds__(128, 1) on the forward (D = 128 spilled before) | this file           |
// | SIMT FA-2 backward, head-dim chunks of 64, separate dQ kernel     | this file           |
// | dQ by f32 atomics from the dK/dV CTAs (one pass over S, dP)       | not written         |
// | whole-D accumulators (no chunk recompute) at D ≤ 64 / 128         | next, needs a GPU   |
// | tensor-core mma (bf16/f16) and cp.async double buffering          | next, needs a GPU   |

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

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
  if (p.lse != nullptr && tid < Tr::kBlockM && i0 + tid < p.Nq)
    p.lse[bh * p.Nq + i0 + tid] = sm::lse_from_base2(sh.m[tid], sh.l[tid]);
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

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 recomputation, SIMT). The head dim is processed in chunks of
// kC = min(kD, 64) columns (BwdTraits): every tile in shared memory is (64, kC), so the same
// 84 KB of shared memory and ≤ 32 + 64 accumulators per thread serve every D ≤ 256. A CTA owns
// one chunk of its output rows (grid y); the scores S = Q·Kᵀ and dP = dO·Vᵀ are sums over all
// chunks, recomputed by the CTA of each output chunk (the D/kC-fold recompute is the price of
// no spills at D = 256; see the strategy table).

struct BwdArgs {
  SdpaBackwardParams bp;
  const float* cos_t;  // (n_pos, D/2) RoPE table from position pos_min, or null
  const float* sin_t;
  const float* delta;  // (B, H, Nq) Δ_i = dO_i·O_i
  int64_t pos_min;
  float q_scale;     // log2(e)/√D: scores in base 2, as in the forward
  float inv_sqrt_d;  // 1/√D
  int n_chunks;      // ⌈D / kC⌉
};

/// Columns [col0, col0 + kC) of a q, k, v or dO slice as flash::load_tile reads it (the
/// caller offsets the row pointer by col0): RoPE over the full head dim D when `rot`, row r
/// of the tile at position pos0 + r.
struct ChunkRows {
  int64_t n, pos0, pos_min;
  int D, col0, mode;
  bool rot;
  const float* cos;
  const float* sin;
  __device__ __forceinline__ int64_t n_rows() const { return n; }
  __device__ __forceinline__ int dim() const { return D - col0; }
  __device__ __forceinline__ bool rotate() const { return rot; }
  __device__ __forceinline__ sm::RopePair pair(int /*dim*/, int d) const {
    sm::RopePair pr = sm::rope_pair(mode, D, col0 + d);
    pr.partner -= col0;  // relative to the chunk's first column, like d
    return pr;
  }
  __device__ __forceinline__ int64_t index(int /*half*/, int64_t /*i*/, int r, int freq) const {
    return (pos0 + r - pos_min) * (D / 2) + freq;
  }
  __device__ __forceinline__ const float* cos_t() const { return cos; }
  __device__ __forceinline__ const float* sin_t() const { return sin; }
};

/// Δ_i = Σ_d dO_id · O_id for every row (b, h, i): one warp per row.
template <DType kT>
__global__ void sdpa_backward_delta_kernel(const BwdArgs a, float* delta) {
  using E = sm::Elem<kT>;
  const SdpaParams& p = a.bp.fwd;
  const int lane = int(threadIdx.x) % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.B * p.H * p.Nq) return;
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  const auto* dout = static_cast<const typename E::type*>(a.bp.dout) + b * a.bp.do_strides.b + h * a.bp.do_strides.h +
                     i * a.bp.do_strides.n;
  const float* o = p.o + b * p.o_strides.b + h * p.o_strides.h + i * p.o_strides.n;
  float sum = 0.0f;
  for (int64_t d = lane; d < p.D; d += 32) sum = fmaf(E::to_f32(dout[d]), o[d], sum);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

/// The probabilities of the score tile (query rows i0 + ty·8 + r, key columns j0 + tx + 16c)
/// from the base-2 scores in acc, in place: 2^(s − log2(e)·lse_i) for allowed keys, 0 for
/// masked keys and padding rows (lse = −inf in shared memory).
template <class Tr>
__device__ __forceinline__ void tile_probs(float (&acc)[Tr::kRowsPerThread][Tr::kSCols], const float* lse_s, int ty,
                                           int tx, int64_t i0, int64_t j0, const SdpaParams& p, int64_t kv_len) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int row = ty * Tr::kRowsPerThread + r;
    const int64_t lim = sm::row_limit(i0 + row, p.Nq, p.Nkv, kv_len, p.causal);
    const float lse = lse_s[row];
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) {
      const int64_t j = j0 + tx + Tr::kColLanes * c;
      acc[r][c] = sm::prob_from_lse(j < lim ? acc[r][c] : sm::kNegInf, lse);
    }
  }
}

/// dK, dV of one (64-key tile, head-dim chunk, b, kv head): over the query heads of the kv
/// head (GQA) and the query tiles whose rows see a key of the tile, recompute S → P from
/// the saved lse and dP = dO·Vᵀ, then dS = P∘(dP − Δ); dV += Pᵀ·dO, dK += dSᵀ·Q. Each CTA
/// owns its output rows: no atomics, deterministic. dK is in the rotated (RoPE) frame.
template <DType kT, int kC>
__global__ void __launch_bounds__(flash::BwdTraits<kC>::kThreads, flash::BwdTraits<kC>::kMinBlocks)
    sdpa_backward_dkdv_kernel(const BwdArgs a) {
  using Tr = flash::BwdTraits<kC>;
  using Store = typename sm::Elem<kT>::type;
  const SdpaBackwardParams& bp = a.bp;
  const SdpaParams& p = bp.fwd;
  extern __shared__ float smem[];
  const flash::BwdSmem<Tr> sh(smem);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int64_t j0 = int64_t(blockIdx.x) * Tr::kBlockN;
  const int chunk = int(blockIdx.y), D = int(p.D), mode = int(p.rope);
  const int64_t bhk = blockIdx.z, b = bhk / p.Hkv, hk = bhk % p.Hkv, group = p.H / p.Hkv;
  const int64_t kv_len = p.kv_len ? p.kv_len[b] : p.Nkv;
  const bool rotate = a.cos_t != nullptr;
  // Query rows before i_begin see no key of this tile (row limits grow with i).
  const int64_t i_begin = sm::first_query_row(j0, p.Nq, p.Nkv, kv_len, p.causal);

  const Store* k = static_cast<const Store*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const Store* v = static_cast<const Store*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  const ChunkRows k_rows{p.Nkv, j0, a.pos_min, D, 0, mode, rotate, a.cos_t, a.sin_t};
  const ChunkRows v_rows{p.Nkv, j0, a.pos_min, D, 0, mode, false, nullptr, nullptr};
  float dk[Tr::kRowsPerThread][Tr::kOCols], dv[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(dk);
  flash::zero_output<Tr>(dv);

  bool first = true;
  for (int64_t h = hk * group; i_begin < p.Nq && h < (hk + 1) * group; ++h) {
    const int64_t bh = b * p.H + h;
    const Store* q = static_cast<const Store*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
    const Store* dout = static_cast<const Store*>(bp.dout) + b * bp.do_strides.b + h * bp.do_strides.h;
    for (int64_t i0 = i_begin / Tr::kBlockM * Tr::kBlockM; i0 < p.Nq; i0 += Tr::kBlockM) {
      if (tid < Tr::kBlockM) {  // published by the first barrier of chunked_scores
        const int64_t i = i0 + tid;
        sh.lse[tid] = i < p.Nq ? p.lse[bh * p.Nq + i] : sm::kNegInf;
        sh.delta[tid] = i < p.Nq ? a.delta[bh * p.Nq + i] : 0.0f;
      }
      // K and V stay in shared memory across query tiles when there is a single chunk.
      const bool load_kv = first || a.n_chunks > 1;
      first = false;
      const ChunkRows q_rows{p.Nq,   sm::query_position(i0, p.Nq, p.Nkv), a.pos_min, D, 0, mode, rotate, a.cos_t,
                             a.sin_t};
      const ChunkRows do_rows{p.Nq, 0, 0, D, 0, mode, false, nullptr, nullptr};

      // P = 2^(S − lse), stored transposed (keys × queries) for dV += Pᵀ·dO.
      float acc[Tr::kRowsPerThread][Tr::kSCols];
      flash::zero_scores<Tr>(acc);
      flash::chunked_scores<kT, Tr>(sh.q, q, p.q_strides.n, q_rows, a.q_scale, i0, true, sh.k, k, p.k_strides.n, k_rows,
                                    j0, load_kv, chunk, a.n_chunks, ty, tx, acc);
      tile_probs<Tr>(acc, sh.lse, ty, tx, i0, j0, p, kv_len);
      flash::store_scores_t<Tr>(sh.s, ty, tx, acc);
      // dP = dO·Vᵀ (its barriers publish Pᵀ), then dS = P∘(dP − Δ), P read back from the
      // thread's own elements.
      flash::zero_scores<Tr>(acc);
      flash::chunked_scores<kT, Tr>(sh.dout, dout, bp.do_strides.n, do_rows, 1.0f, i0, true, sh.v, v, p.v_strides.n,
                                    v_rows, j0, load_kv, chunk, a.n_chunks, ty, tx, acc);
#pragma unroll
      for (int r = 0; r < Tr::kRowsPerThread; ++r) {
        const int row = ty * Tr::kRowsPerThread + r;
#pragma unroll
        for (int c = 0; c < Tr::kSCols; ++c)
          acc[r][c] = sm::score_grad(sh.s[(tx + Tr::kColLanes * c) * Tr::kSStride + row], acc[r][c], sh.delta[row]);
      }
      flash::accumulate_product<Tr>(sh.s, sh.dout, ty, tx, dv);  // sh.dout holds the output chunk
      __syncthreads();
      flash::store_scores_t<Tr>(sh.s, ty, tx, acc);
      __syncthreads();
      flash::accumulate_product<Tr>(sh.s, sh.q, ty, tx, dk);  // Q chunk × log2(e)/√D
      __syncthreads();
    }
  }
  const int col0 = chunk * kC;
  // sh.q held Q·log2(e)/√D: dK = ln2 · Σ dS·(Q log2(e)/√D) = Σ dS·Q/√D.
  flash::store_rows<Tr>(bp.dk + b * bp.dk_strides.b + hk * bp.dk_strides.h, bp.dk_strides.n, j0, p.Nkv, col0, D,
                        sm::kLn2, ty, tx, dk);
  flash::store_rows<Tr>(bp.dv + b * bp.dv_strides.b + hk * bp.dv_strides.h, bp.dv_strides.n, j0, p.Nkv, col0, D, 1.0f,
                        ty, tx, dv);
}

/// dQ of one (64-query tile, head-dim chunk, b, h): over the key tiles [0, lim of the last
/// row), recompute P and dP as the dK/dV kernel does, then dQ += dS·K. A separate kernel
/// rather than atomics from the dK/dV kernel: deterministic, and no f32 atomics on dq.
/// dQ is in the rotated (RoPE) frame.
template <DType kT, int kC>
__global__ void __launch_bounds__(flash::BwdTraits<kC>::kThreads, flash::BwdTraits<kC>::kMinBlocks)
    sdpa_backward_dq_kernel(const BwdArgs a) {
  using Tr = flash::BwdTraits<kC>;
  using Store = typename sm::Elem<kT>::type;
  const SdpaBackwardParams& bp = a.bp;
  const SdpaParams& p = bp.fwd;
  extern __shared__ float smem[];
  const flash::BwdSmem<Tr> sh(smem);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int64_t qt = int64_t(gridDim.x) - 1 - blockIdx.x;  // heaviest causal tiles first
  const int64_t i0 = qt * Tr::kBlockM;
  const int chunk = int(blockIdx.y), D = int(p.D), mode = int(p.rope);
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int64_t kv_len = p.kv_len ? p.kv_len[b] : p.Nkv;
  const int64_t last = (i0 + Tr::kBlockM < p.Nq ? i0 + Tr::kBlockM : p.Nq) - 1;
  const int64_t hi = sm::row_limit(last, p.Nq, p.Nkv, kv_len, p.causal);
  const bool rotate = a.cos_t != nullptr;

  const Store* q = static_cast<const Store*>(p.q) + b * p.q_strides.b + h * p.q_strides.h;
  const Store* dout = static_cast<const Store*>(bp.dout) + b * bp.do_strides.b + h * bp.do_strides.h;
  const Store* k = static_cast<const Store*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const Store* v = static_cast<const Store*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  const ChunkRows q_rows{p.Nq, sm::query_position(i0, p.Nq, p.Nkv), a.pos_min, D, 0, mode, rotate, a.cos_t, a.sin_t};
  const ChunkRows do_rows{p.Nq, 0, 0, D, 0, mode, false, nullptr, nullptr};
  if (tid < Tr::kBlockM) {  // published by the first barrier of chunked_scores
    const int64_t i = i0 + tid;
    sh.lse[tid] = i < p.Nq ? p.lse[bh * p.Nq + i] : sm::kNegInf;
    sh.delta[tid] = i < p.Nq ? a.delta[bh * p.Nq + i] : 0.0f;
  }
  float dq[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(dq);

  for (int64_t j0 = 0; j0 < hi; j0 += Tr::kBlockN) {
    // Q and dO stay in shared memory across key tiles when there is a single chunk.
    const bool load_q = j0 == 0 || a.n_chunks > 1;
    const ChunkRows k_rows{p.Nkv, j0, a.pos_min, D, 0, mode, rotate, a.cos_t, a.sin_t};
    const ChunkRows v_rows{p.Nkv, j0, a.pos_min, D, 0, mode, false, nullptr, nullptr};
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.q, q, p.q_strides.n, q_rows, a.q_scale, i0, load_q, sh.k, k, p.k_strides.n, k_rows,
                                  j0, true, chunk, a.n_chunks, ty, tx, acc);
    tile_probs<Tr>(acc, sh.lse, ty, tx, i0, j0, p, kv_len);
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [](int, int, float x) { return x; });
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.dout, dout, bp.do_strides.n, do_rows, 1.0f, i0, load_q, sh.v, v, p.v_strides.n,
                                  v_rows, j0, true, chunk, a.n_chunks, ty, tx, acc);
    // dS = P∘(dP − Δ) in place (each thread its own elements), then dQ += dS·K.
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [&](int r, int col, float dp) {
      const int row = ty * Tr::kRowsPerThread + r;
      return sm::score_grad(sh.s[row * Tr::kSStride + col], dp, sh.delta[row]);
    });
    __syncthreads();
    flash::accumulate_product<Tr>(sh.s, sh.k, ty, tx, dq);  // sh.k holds the output chunk of K
    __syncthreads();
  }
  flash::store_rows<Tr>(bp.dq + b * bp.dq_strides.b + h * bp.dq_strides.h, bp.dq_strides.n, i0, p.Nq, chunk * kC, D,
                        a.inv_sqrt_d, ty, tx, dq);
}

/// RoPE's backward, in place: the gradient g of the rotated rows (the kernels above) becomes
/// the gradient of the unrotated input, each pair rotated by −θ (sm::rope_rotate_grad). One
/// thread per (b, head, row, frequency); row r at position r + pos_offset.
__global__ void sdpa_rope_grad_kernel(float* g, SdpaStrides st, int64_t heads, int64_t rows, int64_t total, int D,
                                      int mode, const float* cos_t, const float* sin_t, int64_t pos_offset) {
  const int half = D / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int f = int(idx % half);
  const int64_t r = (idx / half) % rows, bh = idx / (int64_t(half) * rows), b = bh / heads, h = bh % heads;
  float* row = g + b * st.b + h * st.h + r * st.n;
  const int d1 = sm::rope_first_dim(mode, f), d2 = sm::rope_pair(mode, D, d1).partner;
  const int64_t t = (r + pos_offset) * half + f;
  const float c = cos_t[t], s = sin_t[t], x = row[d1], y = row[d2];
  row[d1] = sm::rope_rotate_grad(x, y, c, s, false);
  row[d2] = sm::rope_rotate_grad(y, x, c, s, true);
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

template <DType kT, int kC>
void launch_backward_typed(const BwdArgs& a, float* delta, cudaStream_t stream) {
  using Tr = flash::BwdTraits<kC>;
  const SdpaParams& p = a.bp.fwd;
  const int64_t rows = p.B * p.H * p.Nq;
  sdpa_backward_delta_kernel<kT><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, delta);
  check(cudaGetLastError(), "backward delta kernel");
  const auto dkdv = sdpa_backward_dkdv_kernel<kT, kC>;
  check(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)),
        "shared memory attribute (backward dK/dV)");
  const dim3 kv_grid(unsigned((p.Nkv + Tr::kBlockN - 1) / Tr::kBlockN), unsigned(a.n_chunks), unsigned(p.B * p.Hkv));
  dkdv<<<kv_grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  check(cudaGetLastError(), "backward dK/dV kernel");
  const auto dq = sdpa_backward_dq_kernel<kT, kC>;
  check(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)),
        "shared memory attribute (backward dQ)");
  const dim3 q_grid(unsigned((p.Nq + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(a.n_chunks), unsigned(p.B * p.H));
  dq<<<q_grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  check(cudaGetLastError(), "backward dQ kernel");
}

/// Backward scratch: the RoPE table as the forward's (ScratchLayout), then Δ (B, H, Nq).
struct BwdScratchLayout {
  ScratchLayout rope;
  size_t delta_floats;
  explicit BwdScratchLayout(const SdpaBackwardParams& bp)
      : rope(without_weights(bp.fwd)), delta_floats(size_t(bp.fwd.B * bp.fwd.H * bp.fwd.Nq)) {}
  static SdpaParams without_weights(SdpaParams p) {
    p.weights = nullptr;
    return p;
  }
  size_t bytes() const { return rope.bytes() + sizeof(float) * ScratchLayout::padded(delta_floats); }
};

void validate_common(const SdpaParams& p) {
  if (p.D < 1 || p.D > kSdpaMaxHeadDim)
    throw std::invalid_argument("sdpa cuda: D must be in [1, " + std::to_string(kSdpaMaxHeadDim) + "], got " +
                                std::to_string(p.D));
  if (p.H % p.Hkv != 0) throw std::invalid_argument("sdpa cuda: H must be a multiple of Hkv");
  if (p.rope != SdpaRope::none && p.D % 2 != 0) throw std::invalid_argument("sdpa cuda: RoPE needs an even D");
  if (sdpa_value_dim(p) != p.D)
    throw std::invalid_argument("sdpa cuda: Dv must equal D (a separate value head dimension is CPU only)");
}

/// Fills the RoPE table (when p.rope is set) at base; returns {cos, sin} or {null, null}.
std::pair<float*, float*> rope_table(const SdpaParams& p, const ScratchLayout& lay, float* base, cudaStream_t stream) {
  if (lay.rope_floats == 0) return {nullptr, nullptr};
  float* cos_t = base;
  float* sin_t = cos_t + lay.rope_floats / 2;
  const int64_t n = lay.n_pos * (p.D / 2);
  sdpa_rope_table_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(cos_t, sin_t, lay.n_pos, lay.pos_min, int(p.D));
  check(cudaGetLastError(), "rope table kernel");
  return {cos_t, sin_t};
}

}  // namespace

size_t sdpa_forward_flash_scratch_bytes(const SdpaParams& p) { return ScratchLayout(p).bytes(); }

void sdpa_forward_flash(const SdpaParams& p, void* scratch, void* stream_ptr) {
  validate_common(p);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const ScratchLayout lay(p);
  float* base = static_cast<float*>(scratch);

  KernelArgs a{};
  a.p = p;
  a.pos_min = lay.pos_min;
  a.q_scale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  std::tie(a.cos_t, a.sin_t) = rope_table(p, lay, base, stream);
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

size_t sdpa_backward_flash_scratch_bytes(const SdpaBackwardParams& bp) { return BwdScratchLayout(bp).bytes(); }

void sdpa_backward_flash(const SdpaBackwardParams& bp, void* scratch, void* stream_ptr) {
  const SdpaParams& p = bp.fwd;
  validate_common(p);
  if (p.o == nullptr || p.lse == nullptr || bp.dout == nullptr || bp.dq == nullptr || bp.dk == nullptr ||
      bp.dv == nullptr)
    throw std::invalid_argument("sdpa cuda backward: fwd.o, fwd.lse, dout, dq, dk and dv must be set");
  if (p.B * p.H > 65535) throw std::invalid_argument("sdpa cuda backward: B·H must be at most 65535 (grid z)");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const BwdScratchLayout lay(bp);
  float* base = static_cast<float*>(scratch);

  BwdArgs a{};
  a.bp = bp;
  a.pos_min = lay.rope.pos_min;
  a.q_scale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  a.inv_sqrt_d = float(1.0 / std::sqrt(double(p.D)));
  std::tie(a.cos_t, a.sin_t) = rope_table(p, lay.rope, base, stream);
  float* delta = base + lay.rope.bytes() / sizeof(float);
  a.delta = delta;
  const bool launched = flash::dispatch(p.dtype, p.D, [&]<DType kT, int kD>(flash::Instance<kT, kD>) {
    constexpr int kC = kD < 64 ? kD : 64;
    a.n_chunks = int((p.D + kC - 1) / kC);
    launch_backward_typed<kT, kC>(a, delta, stream);
  });
  if (!launched) throw std::invalid_argument("sdpa cuda: q, k, v must be f32, bf16 or f16");
  if (a.cos_t != nullptr) {
    // Gradients of the rotated q, k → of the inputs (after the dQ and dK/dV kernels, same stream).
    const int half = int(p.D / 2);
    const int64_t nq = p.B * p.H * p.Nq * half, nk = p.B * p.Hkv * p.Nkv * half;
    sdpa_rope_grad_kernel<<<unsigned((nq + 255) / 256), 256, 0, stream>>>(
        bp.dq, bp.dq_strides, p.H, p.Nq, nq, int(p.D), int(p.rope), a.cos_t, a.sin_t, p.Nkv - p.Nq - a.pos_min);
    check(cudaGetLastError(), "rope gradient kernel (dq)");
    sdpa_rope_grad_kernel<<<unsigned((nk + 255) / 256), 256, 0, stream>>>(
        bp.dk, bp.dk_strides, p.Hkv, p.Nkv, nk, int(p.D), int(p.rope), a.cos_t, a.sin_t, -a.pos_min);
    check(cudaGetLastError(), "rope gradient kernel (dk)");
  }
}

}  // namespace attnbench::cuda
