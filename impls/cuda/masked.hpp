// Host launcher of the CUDA block-sparse masked-attention forward
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
void masked_forward_block_sparse(const MaskedParams& p, void* scratch, void* stream);

}  // namespace attnbench::cuda
