// Masked (block-sparse) attention forward and backward: the parameters shared
// by the CPU and CUDA entry points (impls/cpu/masked.cpp has the equations, the
// algorithms and the measured strategies; impls/cuda/masked.hpp declares the
// CUDA launcher). Raw pointers and caller-owned scratch: no harness types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "harness/dtype.hpp"
#include "impls/mask.hpp"

namespace attnbench {

/// One forward call. Pointers are host pointers for the CPU entry point and
/// device pointers for the CUDA one (the mask's and the block map's included).
/// Tensors are dense row-major.
struct MaskedParams {
  int64_t B = 1, H = 1, Nq = 1, Nkv = 1, D = 1;
  DType dtype = DType::f32;  // of q, k, v (f32, bf16, f16)
  mask::MaskData mask;
  mask::ScoreMod mod;

  float* o = nullptr;        // (B, H, Nq, D) f32
  const void* q = nullptr;   // (B, H, Nq, D) in dtype
  const void* k = nullptr;   // (B, H, Nkv, D) in dtype
  const void* v = nullptr;   // (B, H, Nkv, D) in dtype
  // RoPE (half-split pairs (i, i + D/2), θ_i = 10000^(−2i/D)) at these positions, or off when null.
  const int32_t* q_pos = nullptr;  // (Nq,)
  const int32_t* k_pos = nullptr;  // (Nkv,)

  // Block map (impls/block_map.hpp): map_batches is B when the mask depends on b, else 1.
  int64_t tile_q = 64, tile_k = 64, n_qt = 1, n_kt = 1, map_batches = 1;
  const uint8_t* tiles = nullptr;     // (map_batches, n_qt, n_kt) mask::Tile
  const int32_t* kv_count = nullptr;  // (map_batches, n_qt)
  const int32_t* kv_index = nullptr;  // (map_batches, n_qt, n_kt)

  float* lse = nullptr;  // (B, H, Nq) f32 dense: natural-log log-sum-exp of each row's modded, masked
                         // scores (−inf for a row without keys); written by the forward when set
};

/// One backward call: the gradients of Σ ⟨dout, o⟩ with respect to q, k and v,
/// dense (B, H, N, D) layouts like the forward's.
struct MaskedBackwardParams {
  MaskedParams fwd;              // shapes, mask, score mod, block map, q, k, v, o (read), lse (read)
  const void* dout = nullptr;    // (B, H, Nq, D) in fwd.dtype
  float* dq = nullptr;           // (B, H, Nq, D) f32
  float* dk = nullptr;           // (B, H, Nkv, D) f32
  float* dv = nullptr;           // (B, H, Nkv, D) f32
};

namespace cpu {

/// Bytes of scratch masked_forward_block_sparse needs with `threads` threads.
size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p, int threads);

/// o_i = Σ_j softmax_j(mod(q_i·k_j/√D) over the allowed j) v_j, 0 for a row
/// without allowed keys; only the non-empty tiles of the block map are
/// computed and the mask is evaluated on partial tiles only. f32 accumulation
/// and output; q, k, v f32, bf16 or f16. `scratch` (64-byte aligned) holds
/// masked_forward_block_sparse_scratch_bytes(p, threads) bytes.
void masked_forward_block_sparse(const MaskedParams& p, void* scratch, int threads);

/// The CPU path masked_forward_block_sparse takes for p now: "amx-bf16" or
/// "avx512bf16" for bf16 inputs without RoPE (SDPA's bf16 products, the same
/// tile loop; nothing but the inputs rounded), else the f32 path's name.
std::string masked_forward_path(const MaskedParams& p);

/// Bytes of scratch masked_backward_block_sparse needs with `threads` threads.
size_t masked_backward_block_sparse_scratch_bytes(const MaskedBackwardParams& p, int threads);

/// dq, dk, dv (f32, overwritten) = the gradients of Σ ⟨dout, o⟩ with respect to
/// q, k, v from the forward's o and lse, over the same block map: empty tiles
/// are skipped, the mask is evaluated on partial tiles only. A score mod's
/// gradient flows to q and k (relative, cyclic and ALiBi add constants; softcap
/// scales dS by its derivative). Rows without allowed keys get zero gradients.
/// Throws std::invalid_argument when o, lse, dout or a gradient is missing.
void masked_backward_block_sparse(const MaskedBackwardParams& p, void* scratch, int threads);

}  // namespace cpu
}  // namespace attnbench
