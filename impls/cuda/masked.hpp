// Host launchers of the CUDA block-sparse masked-attention forward and backward
// (impls/cuda/masked.cu). Plain C++: the parameters are the CPU entry point's
// (impls/cpu/masked.hpp), every pointer a device pointer (the mask's data and
// the block map's arrays included).
#pragma once

#include <cstddef>
#include <cstdint>

#include "impls/cpu/masked.hpp"

namespace attnbench::cuda {

/// Largest head dimension the kernel supports.
inline constexpr int64_t kMaskedMaxHeadDim = 256;

/// The kernel's compiled tile sizes: the block map must be built with
/// tile_q = kMaskedTileQ and tile_k = kMaskedTileK.
inline constexpr int64_t kMaskedTileQ = 64, kMaskedTileK = 64;

/// Device scratch the launcher needs: with RoPE, the per-token cos/sin tables
/// of the query and key positions ((Nq + Nkv) · D/2 pairs); 0 without.
size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p);

/// Enqueues the forward on `stream` (a cudaStream_t): one CTA per (query tile,
/// b, h) walking only the non-empty key tiles of its block-map row, the mask
/// evaluated on partial tiles only. q, k, v: f32, bf16 or f16; o f32.
/// `scratch` holds masked_forward_block_sparse_scratch_bytes(p) bytes of device
/// memory (may be null when that is 0). Throws std::invalid_argument for
/// unsupported or inconsistent parameters (D > kMaskedMaxHeadDim, a block map
/// built with other tile sizes, missing mask data, ...) and std::runtime_error
/// for launch errors.
/// With p.lse set the forward also writes each row's natural-log log-sum-exp of the modded
/// scores (−inf for a row without allowed keys), which the backward reads.
void masked_forward_block_sparse(const MaskedParams& p, void* scratch, void* stream);

/// Device scratch of the backward: the forward's RoPE tables and Δ_i = dO_i·O_i (B·H·Nq floats).
size_t masked_backward_block_sparse_scratch_bytes(const MaskedBackwardParams& p);

/// Enqueues the backward on `stream`: dq, dk, dv (f32, dense) = the gradients of Σ ⟨dout, o⟩
/// with respect to q, k, v over the same block map (dQ walks each query tile's row, dK/dV
/// each key tile's column; empty tiles never touched), from the forward's o and lse
/// (p.fwd.o, p.fwd.lse) and dout (in p.fwd.dtype). Score mods pass their derivative to q and
/// k (tanh softcap: 1 − tanh²(s/c); the additive mods: 1); RoPE's rotation is undone on dq,
/// dk. Every gradient element is written (0 where no allowed pair reaches it). `scratch`
/// holds masked_backward_block_sparse_scratch_bytes(p) bytes of device memory. Throws as
/// the forward does, and when lse, dout or a gradient is missing.
void masked_backward_block_sparse(const MaskedBackwardParams& p, void* scratch, void* stream);

}  // namespace attnbench::cuda
