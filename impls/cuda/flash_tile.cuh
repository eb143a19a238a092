// The tile machinery shared by the two SIMT flash-style attention forwards:
// impls/cuda/sdpa.cu (SDPA: causal row limit, key padding, need_weights pass) and
// impls/cuda/masked.cu (block-sparse masked: block-map walk, mask functor, score mod),
// and by the SDPA backward in sdpa.cu (tile loading, chunked scores via zero_scores /
// add_scores, score-tile × row-tile products via accumulate_product).
//
// Both run one CTA of 128 threads per 64-query tile over 64-key tiles, keeping Q, one
// K-or-V tile and the 64×64 score tile in shared memory (f32) and the 64×D output
// accumulator in registers. Per key tile, with the kernel's own steps in brackets:
//
//   load_tile(K) → sync → tile_scores: S = Q·Kᵀ → store_scores [+ mask / score mod] → sync
//   → online_softmax: S → P in place, running (m, l), alpha → load_tile(V) → sync
//   → accumulate_pv: O = alpha·O + P·V → sync;     at the end store_output: O / l
//
// This header holds those steps, the tile shapes (TileTraits), the shared-memory layout
// (Smem) and, on the host, the choice of the compiled instantiation (dispatch: dtype ×
// padded head dim); which key tiles are walked and what a score becomes before the
// softmax stay in the kernel files. The arithmetic (online-softmax step, RoPE pairing and
// rotation, 16-bit widening) is sdpa_math.hpp's, tested on the host.
//
// The helpers were cut out of the two kernels without changing their code generation
// (check with -Xptxas -v and a PTX diff when editing them): the masked kernels compile to
// the same PTX up to register numbering, the SDPA ones to the same PTX but for shared-memory
// address arithmetic in the softmax, and ptxas reports the same registers and spills for
// every kernel. Hence a few choices that look arbitrary: load_tile takes the row stride in
// the kernel's own type and asks Rows for D, the RoPE mode and the tables where it uses
// them; store_output takes the kernel parameters' fields by reference.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "harness/dtype.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "impls/cuda/warp_reduce.cuh"

namespace attnbench::cuda::flash {

/// Tile shapes, thread grid and shared memory of the forward for a head dimension
/// padded to kHeadDim (a kernel may derive from it to add its own constants).
template <int kHeadDim>
struct TileTraits {
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
  static constexpr int kRowStride = kD + 1;  // Q and K/V rows
  static constexpr int kSStride = kBlockN + 2;
  static constexpr int kQFloats = kBlockM * kRowStride;
  static constexpr int kKVFloats = kBlockN * kRowStride;
  static constexpr int kSFloats = kBlockM * kSStride;
  static constexpr int kStatFloats = 3 * kBlockM;  // m, l, alpha
  static constexpr size_t kSmemBytes = sizeof(float) * (kQFloats + kKVFloats + kSFloats + kStatFloats);

  static_assert(kD % 32 == 0, "head dim padded to a multiple of 32");
  static_assert(kBlockM == kBlockN, "one tile loader for Q and K/V rows");
  static_assert(kRowGroups * kColLanes == kThreads, "thread grid covers the block");
  static_assert(kBlockM % kRowGroups == 0 && kBlockN % kColLanes == 0, "tiles split evenly over the thread grid");
  static_assert(kBlockN == 64, "softmax: each lane owns two columns of a row");
  static_assert(kBlockM % kWarps == 0, "softmax rows split evenly over warps");
  static_assert(kSmemBytes <= 163 * 1024, "fits an A100's shared memory per block (sm_80)");
};

/// The dynamic shared memory of the forward (Tr::kSmemBytes), carved from its base.
template <class Tr>
struct Smem {
  float* q;      // (kBlockM, kRowStride) Q
  float* kv;     // (kBlockN, kRowStride) K, then V
  float* s;      // (kBlockM, kSStride) scores, then probabilities
  float* m;      // (kBlockM,) running max
  float* l;      // (kBlockM,) running sum
  float* alpha;  // (kBlockM,) rescale of the current tile
  __device__ __forceinline__ explicit Smem(float* base)
      : q(base), kv(q + Tr::kQFloats), s(kv + Tr::kKVFloats), m(s + Tr::kSFloats), l(m + Tr::kBlockM),
        alpha(l + Tr::kBlockM) {}
};

/// Loads rows [row0, row0 + 64) of a q, k or v slice (row i at src + i·row_stride)
/// into shared memory as f32 (stride kD + 1), zero beyond the slice's rows and
/// beyond D, RoPE-rotated when rows.rotate(), times `scale`. Rows is the kernel's
/// view of the slice:
///   rows.n_rows(), rows.dim()      its number of rows and D
///   rows.rotate()                  whether its rows get RoPE
///   rows.pair(D, d)                the sdpa_math::RopePair of dimension d
///   rows.index(half, i, r, freq)   where frequency `freq` of row i = row0 + r (tile
///                                  row r) sits in rows.cos_t() / rows.sin_t(); half = D/2
template <DType kT, class Tr, class Stride, class Rows>
__device__ void load_tile(float* dst, const typename sdpa_math::Elem<kT>::type* src, Stride row_stride,
                          const Rows& rows, int64_t row0, float scale) {
  using E = sdpa_math::Elem<kT>;
  const int D = rows.dim(), half = D / 2;
  for (int idx = threadIdx.x; idx < Tr::kBlockN * Tr::kD; idx += Tr::kThreads) {
    const int r = idx / Tr::kD, d = idx % Tr::kD;
    float x = 0.0f;
    if (row0 + r < rows.n_rows() && d < D) {
      const typename E::type* row = src + (row0 + r) * row_stride;
      x = E::to_f32(row[d]);
      if (rows.rotate()) {
        const sdpa_math::RopePair pr = rows.pair(D, d);
        const int64_t t = rows.index(half, row0 + r, r, pr.freq);
        x = sdpa_math::rope_rotate(x, E::to_f32(row[pr.partner]), rows.cos_t()[t], rows.sin_t()[t], pr.second);
      }
      x *= scale;
    }
    dst[r * Tr::kRowStride + d] = x;
  }
}

/// acc[r][c] = 0 (the thread's 8×4 scores).
template <class Tr>
__device__ __forceinline__ void zero_scores(float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) acc[r][c] = 0.0f;
}

/// acc[r][c] += q_row(ty·8 + r) · k_row(tx + 16c) over the padded head dim (the backward
/// sums the scores of head-dim chunks this way).
template <class Tr>
__device__ __forceinline__ void add_scores(const float* q_s, const float* k_s, int ty, int tx,
                                           float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
#pragma unroll 4
  for (int d = 0; d < Tr::kD; ++d) {
    float kv[Tr::kSCols];
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) kv[c] = k_s[(tx + Tr::kColLanes * c) * Tr::kRowStride + d];
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r) {
      const float qv = q_s[(ty * Tr::kRowsPerThread + r) * Tr::kRowStride + d];
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) acc[r][c] = fmaf(qv, kv[c], acc[r][c]);
    }
  }
}

/// acc[r][c] = q_row(ty·8 + r) · k_row(tx + 16c) over the padded head dim.
template <class Tr>
__device__ __forceinline__ void tile_scores(const float* q_s, const float* k_s, int ty, int tx,
                                            float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
  zero_scores<Tr>(acc);
  add_scores<Tr>(q_s, k_s, ty, tx, acc);
}

/// Writes the thread's 8×4 scores to the shared score tile: element (r, c), at tile
/// column col = tx + 16c, becomes finish(r, col, acc[r][c]).
template <class Tr, class Finish>
__device__ __forceinline__ void store_scores(float* s_s, int ty, int tx,
                                             const float (&acc)[Tr::kRowsPerThread][Tr::kSCols],
                                             const Finish& finish) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c) {
      const int col = tx + Tr::kColLanes * c;
      s_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + col] = finish(r, col, acc[r][c]);
    }
}

/// Before the first key tile: running max −inf and running sum 0 for every row.
template <class Tr>
__device__ __forceinline__ void init_row_stats(const Smem<Tr>& sh, int tid) {
  if (tid < Tr::kBlockM) {
    sh.m[tid] = sdpa_math::kNegInf;
    sh.l[tid] = 0.0f;
  }
}

/// O = 0 (the thread's 8 rows × D/16 columns).
template <class Tr>
__device__ __forceinline__ void zero_output(float (&o)[Tr::kRowsPerThread][Tr::kOCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = 0.0f;
}

/// Online softmax of the score tile (base 2, sdpa_math.hpp), one warp per
/// kRowsPerWarp rows, two columns per lane: the scores become probabilities
/// 2^(s − m_new) in place, and per row m, l and this tile's alpha are updated.
template <class Tr>
__device__ __forceinline__ void online_softmax(const Smem<Tr>& sh, int warp, int lane) {
  for (int rr = 0; rr < Tr::kRowsPerWarp; ++rr) {
    const int row = warp * Tr::kRowsPerWarp + rr;
    float* srow = sh.s + row * Tr::kSStride;
    const float m_old = sh.m[row], l_old = sh.l[row];
    const float s0 = srow[lane], s1 = srow[lane + 32];
    const float m_new = sdpa_math::softmax_new_max(m_old, warp_max(fmaxf(s0, s1)));
    const float p0 = sdpa_math::softmax_prob(s0, m_new), p1 = sdpa_math::softmax_prob(s1, m_new);
    const float sum = warp_sum(p0 + p1);
    srow[lane] = p0;
    srow[lane + 32] = p1;
    __syncwarp();
    if (lane == 0) {
      const float alpha = sdpa_math::softmax_alpha(m_old, m_new);
      sh.alpha[row] = alpha;
      sh.l[row] = alpha * l_old + sum;
      sh.m[row] = m_new;
    }
  }
}

/// o[r][c] += Σ_j a[(ty·8 + r)·kSStride + j] · b[j·kRowStride + tx + 16c] over the
/// kBlockN columns j of the 64×64 tile a (a score-shaped tile: P, or in the backward Pᵀ,
/// dS, dSᵀ) and the rows of the (64, kD) tile b (V; in the backward dO, Q or K).
template <class Tr>
__device__ __forceinline__ void accumulate_product(const float* a_s, const float* b_s, int ty, int tx,
                                                   float (&o)[Tr::kRowsPerThread][Tr::kOCols]) {
#pragma unroll 2
  for (int j = 0; j < Tr::kBlockN; ++j) {
    float vv[Tr::kOCols];
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) vv[c] = b_s[j * Tr::kRowStride + tx + Tr::kColLanes * c];
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r) {
      const float pv = a_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + j];
#pragma unroll
      for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = fmaf(pv, vv[c], o[r][c]);
    }
  }
}

/// O = alpha·O + P·V, with P in sh.s and V in sh.kv.
template <class Tr>
__device__ __forceinline__ void accumulate_pv(const Smem<Tr>& sh, int ty, int tx,
                                              float (&o)[Tr::kRowsPerThread][Tr::kOCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const float alpha = sh.alpha[ty * Tr::kRowsPerThread + r];
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) o[r][c] *= alpha;
  }
  accumulate_product<Tr>(sh.s, sh.kv, ty, tx, o);
}

/// out[i0 + row, d] = O / l (0 for a row without keys, l = 0) for the rows < Nq and
/// the dimensions < D the thread owns; out has row stride `row_stride`. row_stride,
/// Nq and D by reference: the kernels pass their parameters' fields (or a local D),
/// read here where they are used rather than held in registers through the key loop.
template <class Tr, class Dim>
__device__ __forceinline__ void store_output(float* out, const int64_t& row_stride, int64_t i0, const int64_t& Nq,
                                             const Dim& D, const float* l_s, int ty, int tx,
                                             const float (&o)[Tr::kRowsPerThread][Tr::kOCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int row = ty * Tr::kRowsPerThread + r;
    if (i0 + row >= Nq) continue;
    const float l = l_s[row];
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) {
      const int d = tx + Tr::kColLanes * c;
      if (d < D) out[(i0 + row) * row_stride + d] = sdpa_math::softmax_finish(o[r][c], l);
    }
  }
}

// ---- Backward (SDPA, sdpa.cu; masked, masked.cu): FlashAttention-2 recomputation over
// head-dim chunks. Every shared tile is (64, kC), kC = min(padded D, 64); the scores of a
// tile are summed over the ⌈D / kC⌉ chunks (chunked_scores), and a CTA accumulates one
// chunk of its output rows (the kernels' grid y).

/// Tile shapes of the backward: the forward's tile steps over head-dim chunks of kC columns.
template <int kC>
struct BwdTraits : TileTraits<kC> {
  using Base = TileTraits<kC>;
  static constexpr int kMinBlocks = 1;  // as the forward: registers up to 255, no spills
  // Shared memory in floats: four (64, kC) row tiles, the 64×64 score tile, two row vectors.
  static constexpr int kTileFloats = Base::kQFloats;
  static constexpr size_t kSmemBytes = sizeof(float) * (4 * kTileFloats + Base::kSFloats + 2 * Base::kBlockM);
  static_assert(kC == 32 || kC == 64, "chunks of 32 (D ≤ 32) or 64 columns");
};

/// The backward's shared memory (BwdTraits::kSmemBytes), carved from its base.
template <class Tr>
struct BwdSmem {
  float* q;      // (64, kC) Q chunk, RoPE-rotated, scaled (SDPA: × log2(e)/√D, masked: × 1/√D)
  float* k;      // (64, kC) K chunk, RoPE-rotated
  float* dout;   // (64, kC) dO chunk
  float* v;      // (64, kC) V chunk
  float* s;      // (64, kSStride) P, Pᵀ, dS or dSᵀ
  float* lse;    // (64,) the query rows' log-sum-exp (natural), −inf for padding rows
  float* delta;  // (64,) the query rows' Δ_i = dO_i·O_i
  __device__ __forceinline__ explicit BwdSmem(float* base)
      : q(base), k(q + Tr::kTileFloats), dout(k + Tr::kTileFloats), v(dout + Tr::kTileFloats),
        s(v + Tr::kTileFloats), lse(s + Tr::kSFloats), delta(lse + Tr::kBlockM) {}
};

/// acc += Σ over head-dim chunks of a_chunk · b_chunkᵀ (rows of two slices into the tiles
/// a_s, b_s), walking the chunks from `chunk` + 1 around to `chunk`, so that the tiles end
/// holding chunk `chunk` (the CTA's output chunk, which the product that follows reuses).
/// load_a / load_b false: that tile already holds the only chunk (n_chunks = 1). Rows as for
/// load_tile, over the columns from Rows::col0 (set here per chunk) on, the row pointers
/// offset by col0 here too.
template <DType kT, class Tr, class Src, class Stride, class Rows>
__device__ __forceinline__ void chunked_scores(float* a_s, const Src* a, Stride a_stride, Rows a_rows, float a_scale,
                                               int64_t a_row0, bool load_a, float* b_s, const Src* b, Stride b_stride,
                                               Rows b_rows, int64_t b_row0, bool load_b, int chunk, int n_chunks,
                                               int ty, int tx, float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
  for (int t = 1; t <= n_chunks; ++t) {
    const int cc = (chunk + t) % n_chunks, col0 = cc * Tr::kD;
    a_rows.col0 = b_rows.col0 = col0;
    if (load_a) load_tile<kT, Tr>(a_s, a + col0, a_stride, a_rows, a_row0, a_scale);
    if (load_b) load_tile<kT, Tr>(b_s, b + col0, b_stride, b_rows, b_row0, 1.0f);
    __syncthreads();
    add_scores<Tr>(a_s, b_s, ty, tx, acc);
    __syncthreads();
  }
}

/// Writes the thread's rows (row0 + ty·8 + r < n) and columns (col0 + tx + 16c < D) of a
/// (64, kC) accumulator, times `scale`, to out (row stride `stride`).
template <class Tr>
__device__ __forceinline__ void store_rows(float* out, int64_t stride, int64_t row0, int64_t n, int col0, int D,
                                           float scale, int ty, int tx,
                                           const float (&acc)[Tr::kRowsPerThread][Tr::kOCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int64_t row = row0 + ty * Tr::kRowsPerThread + r;
    if (row >= n) continue;
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) {
      const int d = col0 + tx + Tr::kColLanes * c;
      if (d < D) out[row * stride + d] = scale * acc[r][c];
    }
  }
}

/// The thread's 8×4 elements of a score tile, transposed: s_s[col][row] = acc[r][c].
template <class Tr>
__device__ __forceinline__ void store_scores_t(float* s_s, int ty, int tx,
                                               const float (&acc)[Tr::kRowsPerThread][Tr::kSCols]) {
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kSCols; ++c)
      s_s[(tx + Tr::kColLanes * c) * Tr::kSStride + ty * Tr::kRowsPerThread + r] = acc[r][c];
}

/// Host: one compiled instantiation of a forward, input dtype kT and padded head dim kD.
template <DType kT, int kD>
struct Instance {};

/// Host: calls launch(Instance<kT, kD>{}) for the input dtype (kT = f32, bf16 or f16) and
/// the head dim D padded to kD = 32, 64, 128 or 256, the instantiations both forwards
/// compile; returns false, launching nothing, for another dtype.
template <class Launch>
bool dispatch(DType dtype, int64_t D, const Launch& launch) {
  const auto head_dim = [&]<DType kT>() {
    if (D <= 32) return launch(Instance<kT, 32>{});
    if (D <= 64) return launch(Instance<kT, 64>{});
    if (D <= 128) return launch(Instance<kT, 128>{});
    launch(Instance<kT, 256>{});
  };
  switch (dtype) {
    case DType::f32:
      head_dim.template operator()<DType::f32>();
      return true;
    case DType::bf16:
      head_dim.template operator()<DType::bf16>();
      return true;
    case DType::f16:
      head_dim.template operator()<DType::f16>();
      return true;
    default:
      return false;
  }
}

}  // namespace attnbench::cuda::flash
