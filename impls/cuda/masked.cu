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
// per token, so the table is indexed by token, not by position). The tile steps (traits and
// shared memory, tile loading, S = Q·Kᵀ, online softmax, O update, output) are shared with
// sdpa.cu in flash_tile.cuh; this file keeps the block-map walk, the per-element mask and
// score mod (finish_scores) and the per-token RoPE tables.
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
  const bool launched = flash::dispatch(p.dtype, p.D, [&]<DType kT, int kD>(flash::Instance<kT, kD>) {
    launch_typed<kT, kD>(a, stream);
  });
  if (!launched) invalid("q, k, v must be f32, bf16 or f16");
}

}  // namespace attnbench::cuda
