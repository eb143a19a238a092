// Masked attention, block-sparse flash-style CUDA forward and backward (DESIGN §5 "Mask family").
//
//   q: (B, H, Nq, D)   k, v: (B, H, Nkv, D)   in f32, bf16 or f16           o: (B, H, Nq, D) f32
//   q_i, k_j ← RoPE(q_i, q_pos[i]), RoPE(k_j, k_pos[j])  (optional; half-split pairs (d, d + D/2),
//              angle pos · 10000^(−2f/D))
//   s_ij = mod_h(q_i·k_j/√D, i, j)          score mod of impls/mask.hpp, natural units
//   o_i  = Σ_j softmax_j(s_ij over the j with allowed(b, i, j)) v_j,   o_i = 0 without allowed key
//   allowed: the mask functor of mask::visit_mask(p.mask) (masked logits are −inf whatever the mod)
//   block map (impls/block_map.hpp, tiles of kMaskedTileQ × kMaskedTileK): per (map batch, query tile)
//   the ascending list of non-empty key tiles, each full (no mask evaluation) or partial
//
// One CTA of 128 threads per (64-query tile, b, h), last query tiles first; it walks only the
// key tiles of its block-map row (empty tiles are never touched), keeping Q, one K-or-V tile and
// the 64×64 score tile in shared memory and the 64×D output accumulator in registers (8 rows ×
// D/16 columns per thread). Per key tile: S = Q·Kᵀ (8×4 scores per thread, Q pre-scaled by 1/√D)
// → stored to shared memory; a full tile inside [0, Nkv) without score mod goes to base 2
// right there, any other tile gets a per-element pass over the thread's own 32 scores
// (masked_math.hpp: padding rows/keys → −inf, on partial tiles the mask functor → −inf, else
// the score mod, then ×log2(e)); on partial tiles that pass sits inside one visit_mask switch,
// uniform over the CTA, each mask's loop kept rolled (short code, no register pressure) →
// online softmax in base 2 (one warp per 16 rows, two columns per lane; sdpa_math.hpp) → V
// replaces K in shared memory → O = alpha·O + P·V. f32 accumulation for all input dtypes
// (widened while loading the tiles). RoPE: per-token cos/sin tables (tokens, D/2) computed in
// double once per call into the scratch from the device q_pos / k_pos (positions are arbitrary
// per token, so the table is indexed by token, not by position). The tile steps (traits and
// shared memory, tile loading, S = Q·Kᵀ, online softmax, O update, output) are shared with
// sdpa.cu in flash_tile.cuh; this file keeps the block-map walk, the per-element mask and
// score mod (finish_scores) and the per-token RoPE tables.
// lse (when p.lse is set): the forward also writes log Σ_j exp(s_ij) over the allowed j, (B, H, Nq)
// f32, −inf for a row without allowed keys.
//
// Backward (FlashAttention-2 over the same block map), gradients of Σ ⟨dO, o⟩, dq, dk, dv f32 dense:
//   P_ij = exp(s_ij − lse_i)   Δ_i = dO_i·o_i   dS_ij = P_ij (dO_i·v_j − Δ_i) · mod′(q_i·k_j/√D)
//   dv_j = Σ_i P_ij dO_i   dk̃_j = Σ_i dS_ij q̃_i/√D   dq̃_i = Σ_j dS_ij k̃_j/√D   dq, dk = RoPE⁻¹(dq̃, dk̃)
//   mod′: tanh softcap 1 − tanh²(s/c), the additive mods (relative, cyclic, ALiBi) 1 (masked_math.hpp)
// Kernels: Δ → dK/dV (one CTA per (key tile, head-dim chunk, b·h), scanning its key tile's column
// of the block map: every query tile whose tile is not empty) → dQ (one CTA per (query tile,
// chunk, b·h) over its block-map row, as the forward) → RoPE⁻¹ on dq, dk with the per-token
// tables. The chunked tile steps are flash_tile.cuh's backward section (as sdpa.cu's backward);
// per element, finish_probs recomputes P through the mask (partial tiles, the same visit_mask
// switch) and the mod, and keeps mod′ in a second score-shaped tile (101 KB shared memory).
// cuda_dense runs the same kernels over the dense block map (every tile partial).
//
// Kernels instantiated: 3 dtypes × head dims {32, 64, 128, 256} (padded), 12 per arch; the mask
// kind and the score mod are runtime switches inside the kernel. ptxas (CUDA 13.0, sm_80/sm_90):
// 127–128 / 145–164 / 179–228 / 255 registers for D = 32 / 64 / 128 / 256, no spills; dynamic
// shared memory 34 560 / 50 944 / 83 712 / 149 248 bytes per CTA. Backward: 3 dtypes × chunk widths
// kC ∈ {32, 64} × (dK/dV, dQ), 12 per arch (+ Δ, RoPE⁻¹): dK/dV 186–214 (kC = 32) / 214–248
// (kC = 64) registers, dQ 155–168, Δ 30, RoPE⁻¹ 26, no spills; 68 096 / 100 864 bytes of shared
// memory per CTA (kC = 32 / 64).
//
// Strategies (no GPU was available while writing this; nothing here has been measured):
// | strategy                                                               | status                     |
// |------------------------------------------------------------------------|----------------------------|
// | SIMT flash forward over the block map, f32 FMA, K/V share one smem buf | this file                  |
// | SIMT FA-2 backward over the block map, head-dim chunks of 64, dQ apart | this file                  |
// | mask kind as an in-kernel switch per partial tile, rolled element loop | this file                  |
// | the same switch with the 32-element loop unrolled                      | tried, dropped: 250+ regs, |
// |                                                                        | spills, ~10 min ptxas      |
// | mask functor as a template parameter (×11 kernels per dtype and D)     | not written: compile time  |
// | tensor-core mma (bf16/f16), cp.async double buffering of K/V           | next, needs a GPU          |
// | less smem (2 CTAs/SM at D = 128 on A100, now 1), L2-aware tile order   | next, needs a GPU          |

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "impls/cuda/flash_tile.cuh"
#include "impls/cuda/masked.hpp"
#include "impls/cuda/masked_math.hpp"
#include "impls/cuda/sdpa_math.hpp"

namespace attnbench::cuda {
namespace {

namespace sm = attnbench::sdpa_math;
namespace mm = attnbench::masked_math;

/// Tile shapes of the forward (flash_tile.cuh) for a head dimension padded to kD.
template <int kD>
struct MaskedFlashTraits : flash::TileTraits<kD> {
  using Base = flash::TileTraits<kD>;
  // __launch_bounds__ minimum CTAs per SM: 1 lets ptxas use up to 255 registers. Without
  // it ptxas aims at 128 / 168 registers (4 / 3 CTAs per SM) and spilled 4–24 bytes at
  // D = 64 and 128; occupancy is bounded by the shared memory anyway.
  static constexpr int kMinBlocks = 1;

  static_assert(kD <= kMaskedMaxHeadDim, "head dim at most the max");
  static_assert(Base::kBlockM == kMaskedTileQ && Base::kBlockN == kMaskedTileK,
                "query rows per CTA = the block map's tile_q, keys per tile = its tile_k");
};

struct MaskedKernelArgs {
  MaskedParams p;
  const float* q_cos;  // (Nq, D/2) RoPE tables of the query tokens, or null
  const float* q_sin;
  const float* k_cos;  // (Nkv, D/2) RoPE tables of the key tokens, or null
  const float* k_sin;
  float q_scale;  // 1/√D (natural units: the score mod sees q·k/√D)
};

/// A dense (n tokens, D) q, k or v slice as flash::load_tile reads it: RoPE with the
/// per-token tables cos, sin (half-split pairs) when cos is set, row i reading table row i.
struct TokenRows {
  int64_t n;
  int head_dim;
  const float* cos;
  const float* sin;
  __device__ __forceinline__ int64_t n_rows() const { return n; }
  __device__ __forceinline__ int dim() const { return head_dim; }
  __device__ __forceinline__ bool rotate() const { return cos != nullptr; }
  __device__ __forceinline__ sm::RopePair pair(int D, int d) const { return sm::rope_pair(mm::kRopeHalfSplit, D, d); }
  __device__ __forceinline__ int64_t index(int /*half*/, int64_t i, int /*r*/, int freq) const {
    return mm::rope_table_index(i, freq, head_dim);
  }
  __device__ __forceinline__ const float* cos_t() const { return cos; }
  __device__ __forceinline__ const float* sin_t() const { return sin; }
};

/// Finishes the thread's 8×4 scores of the tile at (i0, j0), stored raw (natural
/// units) in shared memory: masked (padding, or the functor on a partial tile)
/// → −inf, else the score mod and ×log2(e) (masked_math.hpp). Reads and writes
/// only the thread's own elements (no barrier needed); not unrolled, so that
/// each of the mask kinds inlined by visit_mask stays a short loop.
template <class Tr, class M>
__device__ __forceinline__ void finish_scores(const M& mask, bool full, float* s_s, int ty, int tx, int64_t b,
                                              int64_t h, int64_t i0, int64_t j0, const MaskedParams& p) {
#pragma unroll 1
  for (int e = 0; e < Tr::kRowsPerThread * Tr::kSCols; ++e) {
    const int row = ty * Tr::kRowsPerThread + e / Tr::kSCols, col = tx + Tr::kColLanes * (e % Tr::kSCols);
    const int64_t i = i0 + row, j = j0 + col;
    float* s = s_s + row * Tr::kSStride + col;
    *s = mm::score_base2(p.mod, *s, h, i, j, mm::element_allowed(mask, full, b, i, j, p.Nq, p.Nkv));
  }
}

template <DType kT, int kD>
__global__ void __launch_bounds__(MaskedFlashTraits<kD>::kThreads, MaskedFlashTraits<kD>::kMinBlocks)
masked_forward_kernel(const MaskedKernelArgs a) {
  using Tr = MaskedFlashTraits<kD>;
  using Store = typename sm::Elem<kT>::type;
  const MaskedParams& p = a.p;
  extern __shared__ float smem[];
  const flash::Smem<Tr> sh(smem);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int warp = tid / 32, lane = tid % 32;
  const int D = int(p.D);
  const int64_t qt = mm::query_tile_of_block(blockIdx.x, gridDim.x);
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * Tr::kBlockM;
  const int64_t mrow = mm::map_row(p.map_batches, b, p.n_qt, qt);
  const int32_t n_tiles = p.kv_count[mrow];
  const int32_t* kv_list = p.kv_index + mrow * p.n_kt;
  const uint8_t* tile_kind = p.tiles + mrow * p.n_kt;
  const bool no_mod = p.mod.kind == mask::ScoreModKind::none;

  const Store* q = static_cast<const Store*>(p.q) + bh * p.Nq * p.D;
  const Store* k = static_cast<const Store*>(p.k) + bh * p.Nkv * p.D;
  const Store* v = static_cast<const Store*>(p.v) + bh * p.Nkv * p.D;
  flash::load_tile<kT, Tr>(sh.q, q, D, TokenRows{p.Nq, D, a.q_cos, a.q_sin}, i0, a.q_scale);
  flash::init_row_stats(sh, tid);
  float o[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(o);
  __syncthreads();

  for (int32_t t = 0; t < n_tiles; ++t) {
    const int64_t kt = kv_list[t];
    const bool full = tile_kind[kt] == uint8_t(mask::Tile::full);
    const int64_t j0 = kt * Tr::kBlockN;

    // S = Q·Kᵀ, masked and modded.
    flash::load_tile<kT, Tr>(sh.kv, k, D, TokenRows{p.Nkv, D, a.k_cos, a.k_sin}, j0, 1.0f);
    __syncthreads();
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    flash::tile_scores<Tr>(sh.q, sh.kv, ty, tx, acc);
    // Fast path (a full tile inside [0, Nkv), no score mod): base 2 right away. Padding
    // rows (i ≥ Nq) keep their finite scores there: their Q rows are 0 and they are never stored.
    const bool fast = full && no_mod && j0 + Tr::kBlockN <= p.Nkv;
    const float scale = fast ? sm::kLog2e : 1.0f;
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [&](int, int, float s) { return s * scale; });
    if (!fast) {
      if (full)
        finish_scores<Tr>(mask::Full{p.Nkv}, true, sh.s, ty, tx, b, h, i0, j0, p);
      else
        mask::visit_mask(p.mask, [&](const auto& m) { finish_scores<Tr>(m, false, sh.s, ty, tx, b, h, i0, j0, p); });
    }
    __syncthreads();

    flash::online_softmax(sh, warp, lane);
    // V replaces K (every thread finished reading K before the barrier above).
    flash::load_tile<kT, Tr>(sh.kv, v, D, TokenRows{p.Nkv, D, nullptr, nullptr}, j0, 1.0f);
    __syncthreads();
    flash::accumulate_pv(sh, ty, tx, o);
    __syncthreads();
  }

  // Every row is written, 0 for rows without an allowed key (l = 0), query tiles without key tiles included.
  flash::store_output<Tr>(p.o + bh * p.Nq * p.D, p.D, i0, p.Nq, D, sh.l, ty, tx, o);
  if (p.lse != nullptr && tid < Tr::kBlockM && i0 + tid < p.Nq)
    p.lse[bh * p.Nq + i0 + tid] = sm::lse_from_base2(sh.m[tid], sh.l[tid]);
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 recomputation over the block map; flash_tile.cuh's backward
// section: head-dim chunks of kC = min(padded D, 64) columns, one output chunk per CTA).
// dQ walks the query tile's block-map row like the forward; dK/dV scans the column of its key
// tile in the block map (every query tile whose tile kind is not empty). The per-element pass
// (finish_probs) recomputes P from the saved lse through the mask and the score mod and keeps
// the mod's derivative in a second score-shaped tile.

struct MaskedBwdArgs {
  MaskedBackwardParams bp;
  const float* q_cos;  // (Nq, D/2) RoPE tables of the query tokens, or null
  const float* q_sin;
  const float* k_cos;  // (Nkv, D/2) RoPE tables of the key tokens, or null
  const float* k_sin;
  const float* delta;  // (B, H, Nq) Δ_i = dO_i·O_i
  float q_scale;       // 1/√D (natural units, as the forward)
  int n_chunks;        // ⌈D / kC⌉
};

/// Shared memory of the backward: flash::BwdSmem, then the score mod's derivative tile.
template <class Tr>
constexpr size_t masked_bwd_smem_bytes() {
  return Tr::kSmemBytes + sizeof(float) * Tr::kSFloats;
}

/// Columns [col0, col0 + kC) of a dense (n tokens, D) slice as flash::load_tile reads it (the
/// caller offsets the row pointer by col0): RoPE over the full D with the per-token tables when
/// cos is set (half-split pairs, partners possibly in another chunk).
struct TokenChunkRows {
  int64_t n;
  int D, col0;
  const float* cos;
  const float* sin;
  __device__ __forceinline__ int64_t n_rows() const { return n; }
  __device__ __forceinline__ int dim() const { return D - col0; }
  __device__ __forceinline__ bool rotate() const { return cos != nullptr; }
  __device__ __forceinline__ sm::RopePair pair(int /*dim*/, int d) const {
    sm::RopePair pr = sm::rope_pair(mm::kRopeHalfSplit, D, col0 + d);
    pr.partner -= col0;
    return pr;
  }
  __device__ __forceinline__ int64_t index(int /*half*/, int64_t i, int /*r*/, int freq) const {
    return mm::rope_table_index(i, freq, D);
  }
  __device__ __forceinline__ const float* cos_t() const { return cos; }
  __device__ __forceinline__ const float* sin_t() const { return sin; }
};

/// The thread's 32 raw scores s (natural units, in s_s) of the tile at (i0, j0) become
/// P = 2^(log2(e)·mod(s) − log2(e)·lse_i) (0 where masked, masked_math.hpp / sdpa_math.hpp)
/// in s_s, and the mod's derivative at s in g_s. Rolled, as finish_scores.
template <class Tr, class M>
__device__ __forceinline__ void finish_probs(const M& mask, bool full, float* s_s, float* g_s, const float* lse_s,
                                             int ty, int tx, int64_t b, int64_t h, int64_t i0, int64_t j0,
                                             const MaskedParams& p) {
#pragma unroll 1
  for (int e = 0; e < Tr::kRowsPerThread * Tr::kSCols; ++e) {
    const int row = ty * Tr::kRowsPerThread + e / Tr::kSCols, col = tx + Tr::kColLanes * (e % Tr::kSCols);
    const int64_t i = i0 + row, j = j0 + col;
    const int idx = row * Tr::kSStride + col;
    const float s = s_s[idx];
    const bool ok = mm::element_allowed(mask, full, b, i, j, p.Nq, p.Nkv);
    s_s[idx] = sm::prob_from_lse(mm::score_base2(p.mod, s, h, i, j, ok), lse_s[row]);
    g_s[idx] = mm::score_mod_grad(p.mod, s);
  }
}

/// finish_probs with the tile's mask: mask::Full on full tiles, else the mask kind's functor.
template <class Tr>
__device__ __forceinline__ void finish_tile_probs(bool full, float* s_s, float* g_s, const float* lse_s, int ty, int tx,
                                                  int64_t b, int64_t h, int64_t i0, int64_t j0, const MaskedParams& p) {
  if (full)
    finish_probs<Tr>(mask::Full{p.Nkv}, true, s_s, g_s, lse_s, ty, tx, b, h, i0, j0, p);
  else
    mask::visit_mask(p.mask,
                     [&](const auto& m) { finish_probs<Tr>(m, false, s_s, g_s, lse_s, ty, tx, b, h, i0, j0, p); });
}

/// Δ_i = Σ_d dO_id · O_id for every row (b, h, i) of the dense tensors: one warp per row.
template <DType kT>
__global__ void masked_backward_delta_kernel(const MaskedBwdArgs a, float* delta) {
  using E = sm::Elem<kT>;
  const MaskedParams& p = a.bp.fwd;
  const int lane = int(threadIdx.x) % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.B * p.H * p.Nq) return;
  const auto* dout = static_cast<const typename E::type*>(a.bp.dout) + row * p.D;
  const float* o = p.o + row * p.D;
  float sum = 0.0f;
  for (int64_t d = lane; d < p.D; d += 32) sum = fmaf(E::to_f32(dout[d]), o[d], sum);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

/// dQ of one (64-query tile, head-dim chunk, b·h) over the key tiles of its block-map row:
/// P and dP = dO·Vᵀ recomputed, dS = P∘(dP − Δ)·mod′, dQ += dS·K. In the rotated frame.
template <DType kT, int kC>
__global__ void __launch_bounds__(flash::BwdTraits<kC>::kThreads, flash::BwdTraits<kC>::kMinBlocks)
    masked_backward_dq_kernel(const MaskedBwdArgs a) {
  using Tr = flash::BwdTraits<kC>;
  using Store = typename sm::Elem<kT>::type;
  const MaskedParams& p = a.bp.fwd;
  extern __shared__ float smem[];
  const flash::BwdSmem<Tr> sh(smem);
  float* g_s = smem + Tr::kSmemBytes / sizeof(float);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int D = int(p.D), chunk = int(blockIdx.y);
  const int64_t qt = mm::query_tile_of_block(blockIdx.x, gridDim.x);
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * Tr::kBlockM;
  const int64_t mrow = mm::map_row(p.map_batches, b, p.n_qt, qt);
  const int32_t n_tiles = p.kv_count[mrow];
  const int32_t* kv_list = p.kv_index + mrow * p.n_kt;
  const uint8_t* tile_kind = p.tiles + mrow * p.n_kt;

  const Store* q = static_cast<const Store*>(p.q) + bh * p.Nq * p.D;
  const Store* dout = static_cast<const Store*>(a.bp.dout) + bh * p.Nq * p.D;
  const Store* k = static_cast<const Store*>(p.k) + bh * p.Nkv * p.D;
  const Store* v = static_cast<const Store*>(p.v) + bh * p.Nkv * p.D;
  const TokenChunkRows q_rows{p.Nq, D, 0, a.q_cos, a.q_sin}, do_rows{p.Nq, D, 0, nullptr, nullptr};
  const TokenChunkRows k_rows{p.Nkv, D, 0, a.k_cos, a.k_sin}, v_rows{p.Nkv, D, 0, nullptr, nullptr};
  if (tid < Tr::kBlockM) {  // published by the first barrier of chunked_scores
    const int64_t i = i0 + tid;
    sh.lse[tid] = i < p.Nq ? p.lse[bh * p.Nq + i] : sm::kNegInf;
    sh.delta[tid] = i < p.Nq ? a.delta[bh * p.Nq + i] : 0.0f;
  }
  float dq[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(dq);

  for (int32_t t = 0; t < n_tiles; ++t) {
    const int64_t kt = kv_list[t];
    const bool full = tile_kind[kt] == uint8_t(mask::Tile::full);
    const int64_t j0 = kt * Tr::kBlockN;
    const bool load_q = t == 0 || a.n_chunks > 1;  // Q, dO resident with a single chunk
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.q, q, D, q_rows, a.q_scale, i0, load_q, sh.k, k, D, k_rows, j0, true, chunk,
                                  a.n_chunks, ty, tx, acc);
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [](int, int, float x) { return x; });
    finish_tile_probs<Tr>(full, sh.s, g_s, sh.lse, ty, tx, b, h, i0, j0, p);
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.dout, dout, D, do_rows, 1.0f, i0, load_q, sh.v, v, D, v_rows, j0, true, chunk,
                                  a.n_chunks, ty, tx, acc);
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [&](int r, int col, float dp) {
      const int row = ty * Tr::kRowsPerThread + r, idx = row * Tr::kSStride + col;
      return sm::score_grad(sh.s[idx], dp, sh.delta[row]) * g_s[idx];
    });
    __syncthreads();
    flash::accumulate_product<Tr>(sh.s, sh.k, ty, tx, dq);  // sh.k holds the output chunk of K
    __syncthreads();
  }
  // sh.q held Q/√D, K was unscaled: dQ = Σ dS·K/√D.
  flash::store_rows<Tr>(a.bp.dq + bh * p.Nq * p.D, p.D, i0, p.Nq, chunk * kC, D, a.q_scale, ty, tx, dq);
}

/// dK, dV of one (64-key tile, head-dim chunk, b·h) over the query tiles whose block-map
/// tile at this key tile is not empty: dV += Pᵀ·dO, dK += dSᵀ·Q. In the rotated frame.
template <DType kT, int kC>
__global__ void __launch_bounds__(flash::BwdTraits<kC>::kThreads, flash::BwdTraits<kC>::kMinBlocks)
    masked_backward_dkdv_kernel(const MaskedBwdArgs a) {
  using Tr = flash::BwdTraits<kC>;
  using Store = typename sm::Elem<kT>::type;
  const MaskedParams& p = a.bp.fwd;
  extern __shared__ float smem[];
  const flash::BwdSmem<Tr> sh(smem);
  float* g_s = smem + Tr::kSmemBytes / sizeof(float);

  const int tid = int(threadIdx.x), ty = tid / Tr::kColLanes, tx = tid % Tr::kColLanes;
  const int D = int(p.D), chunk = int(blockIdx.y);
  const int64_t kt = blockIdx.x, j0 = kt * Tr::kBlockN;
  const int64_t bh = blockIdx.z, b = bh / p.H, h = bh % p.H;

  const Store* q = static_cast<const Store*>(p.q) + bh * p.Nq * p.D;
  const Store* dout = static_cast<const Store*>(a.bp.dout) + bh * p.Nq * p.D;
  const Store* k = static_cast<const Store*>(p.k) + bh * p.Nkv * p.D;
  const Store* v = static_cast<const Store*>(p.v) + bh * p.Nkv * p.D;
  const TokenChunkRows q_rows{p.Nq, D, 0, a.q_cos, a.q_sin}, do_rows{p.Nq, D, 0, nullptr, nullptr};
  const TokenChunkRows k_rows{p.Nkv, D, 0, a.k_cos, a.k_sin}, v_rows{p.Nkv, D, 0, nullptr, nullptr};
  float dk[Tr::kRowsPerThread][Tr::kOCols], dv[Tr::kRowsPerThread][Tr::kOCols];
  flash::zero_output<Tr>(dk);
  flash::zero_output<Tr>(dv);

  bool first = true;
  for (int64_t qt = 0; qt < p.n_qt; ++qt) {
    const uint8_t kind = p.tiles[mm::map_row(p.map_batches, b, p.n_qt, qt) * p.n_kt + kt];
    if (kind == uint8_t(mask::Tile::empty)) continue;  // uniform over the CTA
    const bool full = kind == uint8_t(mask::Tile::full);
    const int64_t i0 = qt * Tr::kBlockM;
    if (tid < Tr::kBlockM) {  // published by the first barrier of chunked_scores
      const int64_t i = i0 + tid;
      sh.lse[tid] = i < p.Nq ? p.lse[bh * p.Nq + i] : sm::kNegInf;
      sh.delta[tid] = i < p.Nq ? a.delta[bh * p.Nq + i] : 0.0f;
    }
    const bool load_kv = first || a.n_chunks > 1;  // K, V resident with a single chunk
    first = false;
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.q, q, D, q_rows, a.q_scale, i0, true, sh.k, k, D, k_rows, j0, load_kv, chunk,
                                  a.n_chunks, ty, tx, acc);
    flash::store_scores<Tr>(sh.s, ty, tx, acc, [](int, int, float x) { return x; });
    finish_tile_probs<Tr>(full, sh.s, g_s, sh.lse, ty, tx, b, h, i0, j0, p);
    flash::zero_scores<Tr>(acc);
    flash::chunked_scores<kT, Tr>(sh.dout, dout, D, do_rows, 1.0f, i0, true, sh.v, v, D, v_rows, j0, load_kv, chunk,
                                  a.n_chunks, ty, tx, acc);
    // dS in registers (the thread's own P and mod′), then Pᵀ into the derivative tile.
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) {
        const int row = ty * Tr::kRowsPerThread + r, idx = row * Tr::kSStride + tx + Tr::kColLanes * c;
        acc[r][c] = sm::score_grad(sh.s[idx], acc[r][c], sh.delta[row]) * g_s[idx];
      }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) {
        const int row = ty * Tr::kRowsPerThread + r, col = tx + Tr::kColLanes * c;
        g_s[col * Tr::kSStride + row] = sh.s[row * Tr::kSStride + col];
      }
    __syncthreads();
    flash::accumulate_product<Tr>(g_s, sh.dout, ty, tx, dv);  // sh.dout holds the output chunk
    __syncthreads();
    flash::store_scores_t<Tr>(g_s, ty, tx, acc);
    __syncthreads();
    flash::accumulate_product<Tr>(g_s, sh.q, ty, tx, dk);  // Q chunk / √D: dK = Σ dS·Q/√D
    __syncthreads();
  }
  flash::store_rows<Tr>(a.bp.dk + bh * p.Nkv * p.D, p.D, j0, p.Nkv, chunk * kC, D, 1.0f, ty, tx, dk);
  flash::store_rows<Tr>(a.bp.dv + bh * p.Nkv * p.D, p.D, j0, p.Nkv, chunk * kC, D, 1.0f, ty, tx, dv);
}

/// RoPE's backward in place on a dense (B·H, n tokens, D) gradient: each half-split pair
/// (f, f + D/2) of token t rotated by −θ with the token's table row (sm::rope_rotate_grad).
__global__ void masked_rope_grad_kernel(float* g, int64_t n, int64_t total, int D, const float* cos_t,
                                        const float* sin_t) {
  const int half = D / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int f = int(idx % half);
  const int64_t t = (idx / half) % n, bh = idx / (int64_t(half) * n);
  float* row = g + (bh * n + t) * D;
  const int64_t ti = mm::rope_table_index(t, f, D);
  const float c = cos_t[ti], s = sin_t[ti], x = row[f], y = row[f + half];
  row[f] = sm::rope_rotate_grad(x, y, c, s, false);
  row[f + half] = sm::rope_rotate_grad(y, x, c, s, true);
}

/// cos/sin of θ_f · pos[t] for the n tokens, f < D/2, in double: table (n, D/2).
__global__ void masked_rope_table_kernel(float* cos_t, float* sin_t, const int32_t* pos, int64_t n, int D) {
  const int half = D / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * half) return;
  const int64_t t = idx / half;
  const int f = int(idx % half);
  double s, c;
  sincos(sm::rope_angle(pos[t], f, D), &s, &c);
  cos_t[mm::rope_table_index(t, f, D)] = float(c);
  sin_t[mm::rope_table_index(t, f, D)] = float(s);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("masked cuda: ") + what + ": " + cudaGetErrorString(e));
}

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument("masked cuda: " + what); }

template <DType kT, int kD>
void launch_typed(const MaskedKernelArgs& a, cudaStream_t stream) {
  using Tr = MaskedFlashTraits<kD>;
  const MaskedParams& p = a.p;
  const auto forward = masked_forward_kernel<kT, kD>;
  check(cudaFuncSetAttribute(forward, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)),
        "shared memory attribute");
  const dim3 grid(unsigned(p.n_qt), unsigned(p.B * p.H));
  forward<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(a);
  check(cudaGetLastError(), "forward kernel");
}

/// Scratch: the RoPE tables q_cos, q_sin (Nq, D/2), k_cos, k_sin (Nkv, D/2),
/// each on a 256-byte boundary; empty without RoPE.
struct ScratchLayout {
  size_t q_floats = 0, k_floats = 0;  // one table each
  explicit ScratchLayout(const MaskedParams& p) {
    if (p.q_pos != nullptr) {
      q_floats = size_t(p.Nq * (p.D / 2));
      k_floats = size_t(p.Nkv * (p.D / 2));
    }
  }
  static size_t padded(size_t floats) { return (floats + 63) / 64 * 64; }
  size_t q_sin() const { return padded(q_floats); }
  size_t k_cos() const { return 2 * padded(q_floats); }
  size_t k_sin() const { return 2 * padded(q_floats) + padded(k_floats); }
  size_t bytes() const { return sizeof(float) * 2 * (padded(q_floats) + padded(k_floats)); }
};

/// Throws std::invalid_argument unless p describes a problem this kernel computes.
void validate(const MaskedParams& p, const void* scratch) {
  using mask::Kind;
  const auto str = [](int64_t x) { return std::to_string(x); };
  if (p.B < 1 || p.H < 1 || p.Nq < 1 || p.Nkv < 1)
    invalid("B, H, Nq, Nkv must be ≥ 1, got " + str(p.B) + ", " + str(p.H) + ", " + str(p.Nq) + ", " + str(p.Nkv));
  if (p.D < 1 || p.D > kMaskedMaxHeadDim)
    invalid("D must be in [1, " + str(kMaskedMaxHeadDim) + "], got " + str(p.D));
  if (p.dtype != DType::f32 && p.dtype != DType::bf16 && p.dtype != DType::f16)
    invalid("q, k, v must be f32, bf16 or f16");
  if (p.o == nullptr || p.q == nullptr || p.k == nullptr || p.v == nullptr) invalid("o, q, k, v must be set");
  // The block map.
  if (p.tile_q != kMaskedTileQ || p.tile_k != kMaskedTileK)
    invalid("the block map must use tile_q = " + str(kMaskedTileQ) + ", tile_k = " + str(kMaskedTileK) + ", got " +
            str(p.tile_q) + ", " + str(p.tile_k));
  const int64_t n_qt = (p.Nq + kMaskedTileQ - 1) / kMaskedTileQ, n_kt = (p.Nkv + kMaskedTileK - 1) / kMaskedTileK;
  if (p.n_qt != n_qt || p.n_kt != n_kt)
    invalid("block map of " + str(p.n_qt) + " × " + str(p.n_kt) + " tiles, expected " + str(n_qt) + " × " + str(n_kt));
  if (p.map_batches != 1 && p.map_batches != p.B)
    invalid("map_batches must be 1 or B = " + str(p.B) + ", got " + str(p.map_batches));
  if (mask::per_batch(p.mask) && p.map_batches != p.B)
    invalid("the mask depends on the batch index: map_batches must be B = " + str(p.B));
  if (p.tiles == nullptr || p.kv_count == nullptr || p.kv_index == nullptr)
    invalid("the block map (tiles, kv_count, kv_index) must be set");
  // The mask.
  const mask::MaskData& m = p.mask;
  if (m.Nq != p.Nq || m.Nkv != p.Nkv)
    invalid("mask built for Nq = " + str(m.Nq) + ", Nkv = " + str(m.Nkv) + ", the call has " + str(p.Nq) + ", " +
            str(p.Nkv));
  const bool grouped = m.kind == Kind::document || m.kind == Kind::prefix || m.kind == Kind::dag;
  if (grouped && p.Nq != p.Nkv) invalid("document, prefix and DAG masks need Nq = Nkv (one token sequence)");
  if (grouped && (m.group == nullptr || m.group_start == nullptr)) invalid("mask.group / mask.group_start must be set");
  if (m.kind == Kind::dag && (m.reach == nullptr || m.reach_words < 1))
    invalid("DAG mask: mask.reach and mask.reach_words ≥ 1 must be set");
  if (m.kind == Kind::maskattn && m.logits == nullptr) invalid("mask attention: mask.logits must be set");
  if (m.kind == Kind::key_mask && m.keys == nullptr) invalid("key mask: mask.keys must be set");
  // The score mod.
  if (p.mod.kind == mask::ScoreModKind::softcap && !(p.mod.softcap > 0.0f)) invalid("softcap needs c > 0");
  if (p.mod.kind == mask::ScoreModKind::cyclic && p.mod.N < 1) invalid("cyclic score mod needs a period N ≥ 1");
  if (p.mod.kind == mask::ScoreModKind::alibi && p.mod.H < 1) invalid("ALiBi needs H ≥ 1");
  // RoPE.
  if ((p.q_pos == nullptr) != (p.k_pos == nullptr)) invalid("RoPE needs both q_pos and k_pos (or neither)");
  if (p.q_pos != nullptr && p.D % 2 != 0) invalid("RoPE needs an even D");
  // Launch shape: query tiles along x, (b, h) along y.
  if (p.B * p.H > 65535) invalid("B·H must be at most 65535 (grid y), got " + str(p.B * p.H));
  if (n_qt > 0x7fffffff) invalid("too many query tiles");
  if (scratch == nullptr && ScratchLayout(p).bytes() != 0) invalid("scratch must be set (RoPE tables)");
}

template <DType kT, int kC>
void launch_backward_typed(const MaskedBwdArgs& a, float* delta, cudaStream_t stream) {
  using Tr = flash::BwdTraits<kC>;
  const MaskedParams& p = a.bp.fwd;
  constexpr size_t smem = masked_bwd_smem_bytes<Tr>();
  const int64_t rows = p.B * p.H * p.Nq;
  masked_backward_delta_kernel<kT><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, delta);
  check(cudaGetLastError(), "backward delta kernel");
  const auto dkdv = masked_backward_dkdv_kernel<kT, kC>;
  check(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "shared memory attribute (backward dK/dV)");
  dkdv<<<dim3(unsigned(p.n_kt), unsigned(a.n_chunks), unsigned(p.B * p.H)), Tr::kThreads, smem, stream>>>(a);
  check(cudaGetLastError(), "backward dK/dV kernel");
  const auto dq = masked_backward_dq_kernel<kT, kC>;
  check(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "shared memory attribute (backward dQ)");
  dq<<<dim3(unsigned(p.n_qt), unsigned(a.n_chunks), unsigned(p.B * p.H)), Tr::kThreads, smem, stream>>>(a);
  check(cudaGetLastError(), "backward dQ kernel");
}

/// Fills the per-token RoPE tables (with q_pos / k_pos) into the scratch; returns whether it did.
bool rope_tables(const MaskedParams& p, const ScratchLayout& lay, float* base, cudaStream_t stream,
                 const float** q_cos, const float** q_sin, const float** k_cos, const float** k_sin) {
  if (lay.q_floats == 0) return false;
  float* qc = base;
  float* qs = base + lay.q_sin();
  float* kc = base + lay.k_cos();
  float* ks = base + lay.k_sin();
  const int threads = 256;
  masked_rope_table_kernel<<<unsigned((lay.q_floats + threads - 1) / threads), threads, 0, stream>>>(
      qc, qs, p.q_pos, p.Nq, int(p.D));
  check(cudaGetLastError(), "rope table kernel (queries)");
  masked_rope_table_kernel<<<unsigned((lay.k_floats + threads - 1) / threads), threads, 0, stream>>>(
      kc, ks, p.k_pos, p.Nkv, int(p.D));
  check(cudaGetLastError(), "rope table kernel (keys)");
  *q_cos = qc, *q_sin = qs, *k_cos = kc, *k_sin = ks;
  return true;
}

}  // namespace

size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p) { return ScratchLayout(p).bytes(); }

void masked_forward_block_sparse(const MaskedParams& p, void* scratch, void* stream_ptr) {
  validate(p, scratch);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const ScratchLayout lay(p);

  MaskedKernelArgs a{};
  a.p = p;
  a.q_scale = float(1.0 / std::sqrt(double(p.D)));
  rope_tables(p, lay, static_cast<float*>(scratch), stream, &a.q_cos, &a.q_sin, &a.k_cos, &a.k_sin);
  const bool launched = flash::dispatch(p.dtype, p.D, [&]<DType kT, int kD>(flash::Instance<kT, kD>) {
    launch_typed<kT, kD>(a, stream);
  });
  if (!launched) invalid("q, k, v must be f32, bf16 or f16");
}

size_t masked_backward_block_sparse_scratch_bytes(const MaskedBackwardParams& bp) {
  const MaskedParams& p = bp.fwd;
  return ScratchLayout(p).bytes() + sizeof(float) * ScratchLayout::padded(size_t(p.B * p.H * p.Nq));
}

void masked_backward_block_sparse(const MaskedBackwardParams& bp, void* scratch, void* stream_ptr) {
  const MaskedParams& p = bp.fwd;
  validate(p, scratch);
  if (p.lse == nullptr || bp.dout == nullptr || bp.dq == nullptr || bp.dk == nullptr || bp.dv == nullptr)
    invalid("backward: fwd.o, fwd.lse, dout, dq, dk and dv must be set");
  if (scratch == nullptr) invalid("backward: scratch must be set");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const ScratchLayout lay(p);
  float* base = static_cast<float*>(scratch);

  MaskedBwdArgs a{};
  a.bp = bp;
  a.q_scale = float(1.0 / std::sqrt(double(p.D)));
  const bool rope = rope_tables(p, lay, base, stream, &a.q_cos, &a.q_sin, &a.k_cos, &a.k_sin);
  float* delta = base + lay.bytes() / sizeof(float);
  a.delta = delta;
  const bool launched = flash::dispatch(p.dtype, p.D, [&]<DType kT, int kD>(flash::Instance<kT, kD>) {
    constexpr int kC = kD < 64 ? kD : 64;
    a.n_chunks = int((p.D + kC - 1) / kC);
    launch_backward_typed<kT, kC>(a, delta, stream);
  });
  if (!launched) invalid("q, k, v must be f32, bf16 or f16");
  if (rope) {
    // Gradients of the rotated q, k → of the inputs (after the dQ and dK/dV kernels, same stream).
    const int threads = 256;
    const int64_t nq = p.B * p.H * p.Nq * (p.D / 2), nk = p.B * p.H * p.Nkv * (p.D / 2);
    masked_rope_grad_kernel<<<unsigned((nq + threads - 1) / threads), threads, 0, stream>>>(bp.dq, p.Nq, nq, int(p.D),
                                                                                           a.q_cos, a.q_sin);
    check(cudaGetLastError(), "rope gradient kernel (dq)");
    masked_rope_grad_kernel<<<unsigned((nk + threads - 1) / threads), threads, 0, stream>>>(bp.dk, p.Nkv, nk, int(p.D),
                                                                                           a.k_cos, a.k_sin);
    check(cudaGetLastError(), "rope gradient kernel (dk)");
  }
}

}  // namespace attnbench::cuda
