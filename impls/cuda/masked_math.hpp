// The per-element arithmetic of the CUDA block-sparse masked-attention kernel
// (impls/cuda/masked.cu) as host/device helpers, so that CPU tests check exactly
// what the kernel computes: which block-map row a CTA walks, which elements of a
// visited tile are allowed (padding rows/keys of the last tiles never, full tiles
// without evaluating the mask, partial tiles through the mask functor), the
// score mod in natural units followed by the change to base 2, the score mod's
// derivative (backward), and the RoPE table index of a token. The online softmax, RoPE rotation and 16-bit widening
// are sdpa_math.hpp's.
#pragma once

#include <cstdint>

#include "impls/common.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "impls/mask.hpp"

namespace attnbench::masked_math {

/// RoPE pairing mode of sdpa_math::rope_pair used by the masked family:
/// half-split pairs (d, d + D/2).
inline constexpr int kRopeHalfSplit = 1;

/// Row of the block map's (map_batches, n_qt) arrays walked for query tile qt of
/// batch entry b: the entry's own map when there is one per batch entry
/// (map_batches > 1), else the shared map. kv_index / tiles of that row start
/// at map_row(...) · n_kt.
ATTNBENCH_HD int64_t map_row(int64_t map_batches, int64_t b, int64_t n_qt, int64_t qt) {
  return (map_batches > 1 ? b : 0) * n_qt + qt;
}

/// Query tile computed by CTA `block` of a grid of n_qt tiles along x: the last
/// tiles first (for causal-like masks they have the longest key lists).
ATTNBENCH_HD int64_t query_tile_of_block(int64_t block, int64_t n_qt) { return n_qt - 1 - block; }

/// May query i attend key j inside a visited (non-empty) tile? Never for the
/// padding rows / keys of the last tiles (i ≥ Nq or j ≥ Nkv, where the mask
/// functor must not be evaluated: it may index (N,) arrays); always in a full
/// tile otherwise (no mask evaluation); a partial tile asks the functor.
template <class M>
ATTNBENCH_HD bool element_allowed(const M& mask, bool full, int64_t b, int64_t i, int64_t j, int64_t Nq,
                                  int64_t Nkv) {
  if (i >= Nq || j >= Nkv) return false;
  return full || mask(b, i, j);
}

/// The kernel's logit of an element in base-2 units: s = q_i·k_j/√D (natural
/// units) goes through the score mod of head h, then times log2(e); a masked
/// element is −inf whatever the mod would give.
ATTNBENCH_HD float score_base2(const mask::ScoreMod& mod, float s, int64_t h, int64_t i, int64_t j, bool allowed) {
  return allowed ? sdpa_math::kLog2e * mask::apply_score_mod(mod, s, h, i, j) : sdpa_math::kNegInf;
}

/// Backward: the derivative of the score mod with respect to the raw score s (natural
/// units, before the mod): tanh softcap c·tanh(s/c) → 1 − tanh²(s/c); the additive mods
/// (relative, cyclic, ALiBi) and none → 1. dS of the raw score = this × dS of the modded one.
ATTNBENCH_HD float score_mod_grad(const mask::ScoreMod& mod, float s) {
  if (mod.kind != mask::ScoreModKind::softcap) return 1.0f;
  const float t = tanhf(s / mod.softcap);
  return 1.0f - t * t;
}

/// Index of (token t, frequency f) in a per-token RoPE cos/sin table (tokens, D/2).
ATTNBENCH_HD int64_t rope_table_index(int64_t t, int f, int D) { return t * (D / 2) + f; }

}  // namespace attnbench::masked_math
