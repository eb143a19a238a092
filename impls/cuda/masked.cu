// Masked attention, block-sparse flash-style CUDA forward (DESIGN §5 "Mask family").
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
// per token, so the table is indexed by token, not by position).
// Kernels instantiated: 3 dtypes × head dims {32, 64, 128, 256} (padded), 12 per arch; the mask
// kind and the score mod are runtime switches inside the kernel. ptxas (CUDA 13.0, sm_80/sm_90):
// 127–128 / 145–164 / 179–228 / 255 registers for D = 32 / 64 / 128 / 256, no spills; dynamic
// shared memory 34 560 / 50 944 / 83 712 / 149 248 bytes per CTA.
//
// Strategies (no GPU was available while writing this; nothing here has been measured):
// | strategy                                                               | status                     |
// |------------------------------------------------------------------------|----------------------------|
// | SIMT flash forward over the block map, f32 FMA, K/V share one smem buf | this file                  |
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

#include "impls/cuda/masked.hpp"
#include "impls/cuda/masked_math.hpp"
#include "impls/cuda/sdpa_math.hpp"

namespace attnbench::cuda {
namespace {

namespace sm = attnbench::sdpa_math;
namespace mm = attnbench::masked_math;

/// Tile shapes of the forward kernel for a head dimension padded to kHeadDim.
template <int kHeadDim>
struct MaskedFlashTraits {
  static constexpr int kD = kHeadDim;
  static constexpr int kBlockM = int(kMaskedTileQ);  // query rows per CTA (= the block map's tile_q)
  static constexpr int kBlockN = int(kMaskedTileK);  // keys per tile (= the block map's tile_k)
  static constexpr int kThreads = 128;
  // __launch_bounds__ minimum CTAs per SM: 1 lets ptxas use up to 255 registers. Without
  // it ptxas aims at 128 / 168 registers (4 / 3 CTAs per SM) and spilled 4–24 bytes at
  // D = 64 and 128; occupancy is bounded by the shared memory below anyway.
  static constexpr int kMinBlocks = 1;
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

  static_assert(kD % 32 == 0 && kD <= kMaskedMaxHeadDim, "head dim padded to a multiple of 32, at most the max");
  static_assert(kBlockM == kBlockN, "one tile loader for Q and K/V rows");
  static_assert(kRowGroups * kColLanes == kThreads, "thread grid covers the block");
  static_assert(kBlockM % kRowGroups == 0 && kBlockN % kColLanes == 0, "tiles split evenly over the thread grid");
  static_assert(kBlockN == 64, "softmax: each lane owns two columns of a row");
  static_assert(kBlockM % kWarps == 0, "softmax rows split evenly over warps");
  static_assert(kSmemBytes <= 163 * 1024, "fits an A100's shared memory per block (sm_80)");
};

struct MaskedKernelArgs {
  MaskedParams p;
  const float* q_cos;  // (Nq, D/2) RoPE tables of the query tokens, or null
  const float* q_sin;
  const float* k_cos;  // (Nkv, D/2) RoPE tables of the key tokens, or null
  const float* k_sin;
  float q_scale;  // 1/√D (natural units: the score mod sees q·k/√D)
};

/// Loads rows [row0, row0 + 64) of a dense (n_rows, D) slice into shared memory
/// as f32 (stride kD + 1), zero beyond n_rows and beyond D, RoPE-rotated with the
/// per-token table rows row0 + r when cos_t is set, times `scale`.
template <DType kT, class Tr>
__device__ void load_tile(float* dst, const typename sm::Elem<kT>::type* src, int64_t row0, int64_t n_rows, int D,
                          const float* cos_t, const float* sin_t, float scale) {
  using E = sm::Elem<kT>;
  for (int idx = threadIdx.x; idx < Tr::kBlockN * Tr::kD; idx += Tr::kThreads) {
    const int r = idx / Tr::kD, d = idx % Tr::kD;
    float x = 0.0f;
    if (row0 + r < n_rows && d < D) {
      const typename E::type* row = src + (row0 + r) * D;
      x = E::to_f32(row[d]);
      if (cos_t != nullptr) {
        const sm::RopePair pr = sm::rope_pair(mm::kRopeHalfSplit, D, d);
        const int64_t t = mm::rope_table_index(row0 + r, pr.freq, D);
        x = sm::rope_rotate(x, E::to_f32(row[pr.partner]), cos_t[t], sin_t[t], pr.second);
      }
      x *= scale;
    }
    dst[r * Tr::kRowStride + d] = x;
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
    for (int c = 0; c < Tr::kSCols; ++c) kv[c] = k_s[(tx + Tr::kColLanes * c) * Tr::kRowStride + d];
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r) {
      const float qv = q_s[(ty * Tr::kRowsPerThread + r) * Tr::kRowStride + d];
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c) acc[r][c] = fmaf(qv, kv[c], acc[r][c]);
    }
  }
}

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

template <DType kT, int kD>
__global__ void __launch_bounds__(MaskedFlashTraits<kD>::kThreads, MaskedFlashTraits<kD>::kMinBlocks)
masked_forward_kernel(const MaskedKernelArgs a) {
  using Tr = MaskedFlashTraits<kD>;
  using Store = typename sm::Elem<kT>::type;
  const MaskedParams& p = a.p;
  extern __shared__ float smem[];
  float* q_s = smem;                   // (kBlockM, kRowStride)
  float* kv_s = q_s + Tr::kQFloats;    // (kBlockN, kRowStride) K, then V
  float* s_s = kv_s + Tr::kKVFloats;   // (kBlockM, kSStride) scores, then probabilities
  float* m_s = s_s + Tr::kSFloats;     // (kBlockM,) running max
  float* l_s = m_s + Tr::kBlockM;      // (kBlockM,) running sum
  float* alpha_s = l_s + Tr::kBlockM;  // (kBlockM,) rescale of the current tile

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
  load_tile<kT, Tr>(q_s, q, i0, p.Nq, D, a.q_cos, a.q_sin, a.q_scale);
  if (tid < Tr::kBlockM) {
    m_s[tid] = sm::kNegInf;
    l_s[tid] = 0.0f;
  }
  float o[Tr::kRowsPerThread][Tr::kOCols];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = 0.0f;
  __syncthreads();

  for (int32_t t = 0; t < n_tiles; ++t) {
    const int64_t kt = kv_list[t];
    const bool full = tile_kind[kt] == uint8_t(mask::Tile::full);
    const int64_t j0 = kt * Tr::kBlockN;

    // S = Q·Kᵀ, masked and modded.
    load_tile<kT, Tr>(kv_s, k, j0, p.Nkv, D, a.k_cos, a.k_sin, 1.0f);
    __syncthreads();
    float acc[Tr::kRowsPerThread][Tr::kSCols];
    tile_scores<Tr>(q_s, kv_s, ty, tx, acc);
    // Fast path (a full tile inside [0, Nkv), no score mod): base 2 right away. Padding
    // rows (i ≥ Nq) keep their finite scores there: their Q rows are 0 and they are never stored.
    const bool fast = full && no_mod && j0 + Tr::kBlockN <= p.Nkv;
    const float scale = fast ? sm::kLog2e : 1.0f;
#pragma unroll
    for (int r = 0; r < Tr::kRowsPerThread; ++r)
#pragma unroll
      for (int c = 0; c < Tr::kSCols; ++c)
        s_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + tx + Tr::kColLanes * c] = acc[r][c] * scale;
    if (!fast) {
      if (full)
        finish_scores<Tr>(mask::Full{p.Nkv}, true, s_s, ty, tx, b, h, i0, j0, p);
      else
        mask::visit_mask(p.mask, [&](const auto& m) { finish_scores<Tr>(m, false, s_s, ty, tx, b, h, i0, j0, p); });
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
    load_tile<kT, Tr>(kv_s, v, j0, p.Nkv, D, nullptr, nullptr, 1.0f);
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
      for (int c = 0; c < Tr::kOCols; ++c) vv[c] = kv_s[j * Tr::kRowStride + tx + Tr::kColLanes * c];
#pragma unroll
      for (int r = 0; r < Tr::kRowsPerThread; ++r) {
        const float pv = s_s[(ty * Tr::kRowsPerThread + r) * Tr::kSStride + j];
#pragma unroll
        for (int c = 0; c < Tr::kOCols; ++c) o[r][c] = fmaf(pv, vv[c], o[r][c]);
      }
    }
    __syncthreads();
  }

  // Every row is written, 0 for rows without an allowed key (l = 0), query tiles without key tiles included.
  float* out = p.o + bh * p.Nq * p.D;
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int row = ty * Tr::kRowsPerThread + r;
    if (i0 + row >= p.Nq) continue;
    const float l = l_s[row];
#pragma unroll
    for (int c = 0; c < Tr::kOCols; ++c) {
      const int d = tx + Tr::kColLanes * c;
      if (d < D) out[(i0 + row) * p.D + d] = sm::softmax_finish(o[r][c], l);
    }
  }
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

template <DType kT>
void launch_head_dim(const MaskedKernelArgs& a, cudaStream_t stream) {
  const int64_t D = a.p.D;
  if (D <= 32) return launch_typed<kT, 32>(a, stream);
  if (D <= 64) return launch_typed<kT, 64>(a, stream);
  if (D <= 128) return launch_typed<kT, 128>(a, stream);
  launch_typed<kT, 256>(a, stream);
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

}  // namespace

size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p) { return ScratchLayout(p).bytes(); }

void masked_forward_block_sparse(const MaskedParams& p, void* scratch, void* stream_ptr) {
  validate(p, scratch);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const ScratchLayout lay(p);

  MaskedKernelArgs a{};
  a.p = p;
  a.q_scale = float(1.0 / std::sqrt(double(p.D)));
  if (lay.q_floats != 0) {
    float* base = static_cast<float*>(scratch);
    float* q_cos = base;
    float* q_sin = base + lay.q_sin();
    float* k_cos = base + lay.k_cos();
    float* k_sin = base + lay.k_sin();
    const int threads = 256;
    masked_rope_table_kernel<<<unsigned((lay.q_floats + threads - 1) / threads), threads, 0, stream>>>(
        q_cos, q_sin, p.q_pos, p.Nq, int(p.D));
    check(cudaGetLastError(), "rope table kernel (queries)");
    masked_rope_table_kernel<<<unsigned((lay.k_floats + threads - 1) / threads), threads, 0, stream>>>(
        k_cos, k_sin, p.k_pos, p.Nkv, int(p.D));
    check(cudaGetLastError(), "rope table kernel (keys)");
    a.q_cos = q_cos, a.q_sin = q_sin, a.k_cos = k_cos, a.k_sin = k_sin;
  }
  switch (p.dtype) {
    case DType::f32:
      return launch_head_dim<DType::f32>(a, stream);
    case DType::bf16:
      return launch_head_dim<DType::bf16>(a, stream);
    case DType::f16:
      return launch_head_dim<DType::f16>(a, stream);
    default:
      invalid("q, k, v must be f32, bf16 or f16");
  }
}

}  // namespace attnbench::cuda
