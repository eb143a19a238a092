// Block maps (FlexAttention's BlockMask idea, DESIGN §5 "Mask family"): every
// (query tile, key tile) pair of a mask is empty (no allowed pair: skipped),
// full (every pair allowed: no mask evaluation) or partial. Built per tile,
// never by materializing the (Nq, Nkv) mask:
//   * interval masks (mask.hpp, kIntervals): each row's allowed keys are a few
//     intervals; a tile is touched by a row when an interval meets it and fully
//     covered when one interval contains it. Difference arrays make the cost
//     O(intervals) per row plus O(key tiles) per query tile, and the result is exact.
//   * other masks (mask attention): the allowed pairs of each tile are counted,
//     row by row (mask attention compares each row of logits with the threshold).
// Host code: the CUDA implementation uploads the arrays.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "impls/mask.hpp"

namespace attnbench::mask {

struct BlockMap {
  int64_t Nq = 0, Nkv = 0, tile_q = 1, tile_k = 1, n_qt = 0, n_kt = 0, batches = 1;
  std::vector<uint8_t> tiles;     // (batches, n_qt, n_kt) Tile
  std::vector<int32_t> kv_count;  // (batches, n_qt) non-empty key tiles of each query tile
  std::vector<int32_t> kv_index;  // (batches, n_qt, n_kt) their indices, ascending, first kv_count used
  int64_t full = 0, partial = 0, empty = 0;
  double allowed_pairs = 0;  // Σ over batch entries of the allowed (i, j) pairs

  Tile at(int64_t b, int64_t qt, int64_t kt) const { return Tile(tiles[size_t((b * n_qt + qt) * n_kt + kt)]); }
  int64_t total() const { return full + partial + empty; }
  /// Fraction of tiles computed (full + partial).
  double computed_fraction() const { return total() ? double(full + partial) / double(total()) : 0.0; }
  /// Fraction of (i, j) pairs allowed.
  double density() const { return allowed_pairs / (double(batches) * double(Nq) * double(Nkv)); }
};

namespace detail {

inline BlockMap empty_map(int64_t Nq, int64_t Nkv, int64_t batches, int64_t tile_q, int64_t tile_k) {
  BlockMap m;
  m.Nq = Nq, m.Nkv = Nkv, m.tile_q = tile_q, m.tile_k = tile_k, m.batches = batches;
  m.n_qt = (Nq + tile_q - 1) / tile_q;
  m.n_kt = (Nkv + tile_k - 1) / tile_k;
  m.tiles.assign(size_t(batches * m.n_qt * m.n_kt), uint8_t(Tile::empty));
  m.kv_count.assign(size_t(batches * m.n_qt), 0);
  m.kv_index.assign(size_t(batches * m.n_qt * m.n_kt), 0);
  return m;
}

/// Fills kv_count / kv_index and the totals from `tiles`.
inline void finish_map(BlockMap& m) {
  m.full = m.partial = m.empty = 0;
  for (int64_t bq = 0; bq < m.batches * m.n_qt; ++bq) {
    int32_t n = 0;
    for (int64_t kt = 0; kt < m.n_kt; ++kt) {
      const Tile t = Tile(m.tiles[size_t(bq * m.n_kt + kt)]);
      (t == Tile::full ? m.full : t == Tile::partial ? m.partial : m.empty) += 1;
      if (t != Tile::empty) m.kv_index[size_t(bq * m.n_kt + n++)] = int32_t(kt);
    }
    m.kv_count[size_t(bq)] = n;
  }
}

}  // namespace detail

/// The block map of `mask` (a functor of mask.hpp) for tiles of tile_q queries
/// by tile_k keys; `batches` > 1 only for masks that depend on the batch index.
template <class M>
BlockMap build_block_map(const M& mask, int64_t Nq, int64_t Nkv, int64_t batches, int64_t tile_q, int64_t tile_k) {
  BlockMap m = detail::empty_map(Nq, Nkv, batches, tile_q, tile_k);
  if constexpr (M::kIntervals) {
    // touch[kt] / cover[kt]: rows of the query tile meeting / containing key tile kt,
    // accumulated as difference arrays over kt.
    std::vector<int64_t> touch(size_t(m.n_kt + 1)), cover(size_t(m.n_kt + 1));
    for (int64_t b = 0; b < batches; ++b)
      for (int64_t qt = 0; qt < m.n_qt; ++qt) {
        std::fill(touch.begin(), touch.end(), 0);
        std::fill(cover.begin(), cover.end(), 0);
        const int64_t i0 = qt * tile_q, rows = std::min(tile_q, Nq - i0);
        for (int64_t i = i0; i < i0 + rows; ++i) {
          // Merge adjacent intervals so that "one interval contains the tile" is exact.
          int64_t run_lo = -1, run_hi = -1;
          auto flush = [&] {
            if (run_lo >= run_hi) return;
            m.allowed_pairs += double(run_hi - run_lo);
            const int64_t first = run_lo / tile_k, last = (run_hi - 1) / tile_k;
            ++touch[size_t(first)], --touch[size_t(last + 1)];
            // Key tiles inside [run_lo, run_hi): start ≥ run_lo and end ≤ run_hi (the last tile ends at Nkv).
            const int64_t c0 = (run_lo + tile_k - 1) / tile_k;
            const int64_t c1 = run_hi == Nkv ? m.n_kt : run_hi / tile_k;  // exclusive
            if (c0 < c1) ++cover[size_t(c0)], --cover[size_t(c1)];
          };
          mask.row_keys(b, i, [&](int64_t lo, int64_t hi) {
            if (lo >= hi) return;
            if (lo == run_hi) {
              run_hi = hi;
              return;
            }
            flush();
            run_lo = lo, run_hi = hi;
          });
          flush();
        }
        int64_t t = 0, c = 0;
        uint8_t* row = m.tiles.data() + (b * m.n_qt + qt) * m.n_kt;
        for (int64_t kt = 0; kt < m.n_kt; ++kt) {
          t += touch[size_t(kt)], c += cover[size_t(kt)];
          row[kt] = uint8_t(c == rows ? Tile::full : t > 0 ? Tile::partial : Tile::empty);
        }
      }
  } else if constexpr (std::is_same_v<M, KeyMask>) {
    // Every row of a batch entry allows the same keys: count each key tile once.
    for (int64_t b = 0; b < batches; ++b) {
      const uint8_t* keys = mask.keys + b * Nkv;
      for (int64_t kt = 0; kt < m.n_kt; ++kt) {
        const int64_t j0 = kt * tile_k, j1 = std::min(Nkv, j0 + tile_k);
        int64_t n = 0;
        for (int64_t j = j0; j < j1; ++j) n += keys[j] != 0;
        const Tile t = n == 0 ? Tile::empty : n == j1 - j0 ? Tile::full : Tile::partial;
        m.allowed_pairs += double(n) * double(Nq);
        for (int64_t qt = 0; qt < m.n_qt; ++qt) m.tiles[size_t((b * m.n_qt + qt) * m.n_kt + kt)] = uint8_t(t);
      }
    }
  } else {
    // Allowed pairs per key tile, accumulated row by row (rows are contiguous in
    // mask attention's logits: the counting loop is a vectorizable compare).
    std::vector<int64_t> allowed(size_t(m.n_kt));
    for (int64_t b = 0; b < batches; ++b)
      for (int64_t qt = 0; qt < m.n_qt; ++qt) {
        std::fill(allowed.begin(), allowed.end(), 0);
        const int64_t i0 = qt * tile_q, i1 = std::min(Nq, i0 + tile_q);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t kt = 0; kt < m.n_kt; ++kt) {
            const int64_t j0 = kt * tile_k, j1 = std::min(Nkv, j0 + tile_k);
            int64_t n = 0;
            if constexpr (std::is_same_v<M, MaskAttn>) {
              if (mask.row_all && mask.row_all[b * Nq + i]) {
                n = j1 - j0;
              } else {
                const float* row = mask.logits + (b * Nq + i) * Nkv;
                for (int64_t j = j0; j < j1; ++j) n += row[j] >= mask.threshold;
              }
            } else {
              for (int64_t j = j0; j < j1; ++j) n += mask(b, i, j) ? 1 : 0;
            }
            allowed[size_t(kt)] += n;
          }
        for (int64_t kt = 0; kt < m.n_kt; ++kt) {
          const int64_t cells = (i1 - i0) * (std::min(Nkv, (kt + 1) * tile_k) - kt * tile_k);
          const int64_t n = allowed[size_t(kt)];
          m.allowed_pairs += double(n);
          m.tiles[size_t((b * m.n_qt + qt) * m.n_kt + kt)] =
              uint8_t(n == 0 ? Tile::empty : n == cells ? Tile::full : Tile::partial);
        }
      }
  }
  detail::finish_map(m);
  return m;
}

/// The block map of the mask described by `data` (one map per batch entry when
/// the mask depends on it, else one shared map).
inline BlockMap build_block_map(const MaskData& data, int64_t B, int64_t tile_q, int64_t tile_k) {
  const int64_t batches = per_batch(data) ? B : 1;
  return visit_mask(data, [&](const auto& m) { return build_block_map(m, data.Nq, data.Nkv, batches, tile_q, tile_k); });
}

/// Every tile partial: the "dense masked" execution the block-sparse one is
/// measured against (every pair computed, the mask evaluated everywhere).
inline BlockMap dense_block_map(const BlockMap& sparse) {
  BlockMap m = detail::empty_map(sparse.Nq, sparse.Nkv, sparse.batches, sparse.tile_q, sparse.tile_k);
  std::fill(m.tiles.begin(), m.tiles.end(), uint8_t(Tile::partial));
  m.allowed_pairs = sparse.allowed_pairs;
  detail::finish_map(m);
  return m;
}

/// Mask attention with attend_all: row_all[b, i] = 1 when row i of batch b has
/// no logit at or above the threshold (it then attends to every key).
inline std::vector<uint8_t> maskattn_empty_rows(const float* logits, int64_t B, int64_t Nq, int64_t Nkv,
                                                float threshold) {
  std::vector<uint8_t> out(size_t(B * Nq));
  for (int64_t r = 0; r < B * Nq; ++r) {
    const float* row = logits + r * Nkv;
    out[size_t(r)] = std::none_of(row, row + Nkv, [&](float x) { return x >= threshold; }) ? 1 : 0;
  }
  return out;
}

}  // namespace attnbench::mask
