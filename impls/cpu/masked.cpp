// Masked attention, block-sparse CPU forward (DESIGN §5 "Mask family").
//
//   q: (B, H, Nq, D)   k, v: (B, H, Nkv, D)   block map: (map_batches, n_qt, n_kt) tiles
//   o_i = Σ_j softmax_j(mod_h(RoPE(q_i)·RoPE(k_j)/√D, i, j) over allowed(b, i, j)) v_j    o: (B, H, Nq, D) f32
//   (0 for a row without allowed keys)
//
// Algorithm: the SDPA kernel's, one copy of it: the flash tile loop of
// impls/cpu/attention-inl.h (packed K tiles, 6×64 register-blocked S = Q·Kᵀ and
// O += P·V, base-2 online softmax: PackKeyTile, ForwardRows, FinishRows), driven
// by the block map (impls/block_map.hpp) instead of a row limit, and masking
// through its callback. OpenMP over (b, h, query tile);
// a task visits only the non-empty key tiles of its query tile:
//   S = Q·Kᵀ → score mod (if any, every visited tile) → mask (partial tiles only)
//   → online softmax → O += P·V.
// Masking a partial tile row uses the mask's key intervals (a window row is one
// interval, a DAG row a few), collected once per call (an O(Nq · intervals)
// pass, inside the timed call): fills of −inf between them, no per-element
// predicate. Mask attention compares the row of logits with the threshold (a
// vectorizable select).
// Tile sizes come from the block map (tile_q query rows, tile_k keys; the
// packed key tile is padded to a multiple of 64 keys and the pad masked).
// With p.lse set the forward also writes each row's log-sum-exp.
//
// Backward: SDPA's (impls/cpu/sdpa.cpp; BackwardPair of attention-inl.h) over
// the same block map, transposed once per call into each key tile's list of
// non-empty query tiles. A task owns a head's key tiles (their dK, dV) — or
// every split-th one when B·H < 2·threads — and its dq accumulator; per key
// tile it packs K (rotated at the key positions, rows and transposed) and Vᵀ
// and visits only the non-empty query tiles: S → score mod (every visited
// tile; softcap also writes its derivative 1 − tanh², which scales dS; the
// additive mods have derivative 1) → mask (partial tiles: the rows' intervals
// found by bisection, mask attention's select) → P = 2^(S − lse), dS → dVᵀ,
// dKᵀ, dQ. Rows without keys get zero dq, keys no row sees zero dk, dv.
//
// Backward strategies, the same LE-ATTENTION case, 2 Sapphire-Rapids-class cores
// (docs/masked.md): cpu_dense 556–587 ms;
// | block-sparse, every head's query side packed to memory first (3 passes)  | 74.6 ms |
// | block-sparse, a task packs its head's query side in its slab (L2)        | 60.7 ms |
// | Δ = Σ dO·O as a lane-wise dot product (was a scalar dependent chain)      | 60.1 ms |
//
// Strategies, LE-ATTENTION 500 documents (3 584 tokens, B 4, H 8, D 32, f32,
// 64 × 64 tiles, 8.4 % of the tiles non-empty), 2 Zen 4 cores; commands and
// the other suites' numbers in docs/masked.md:
// | strategy                                                              | time    |
// |-----------------------------------------------------------------------|---------|
// | every tile computed and masked (`cpu_dense`, the baseline)            | 360 ms  |
// | block-sparse, partial rows masked from row_keys() on every tile       | 92.4 ms |
// |   (perf: 57 % in the DAG rows' walk over their 500 parents)           |         |
// | block-sparse, row intervals collected once per call, cursor per row   | 35.5 ms |

#include "impls/cpu/masked.hpp"

#include <omp.h>

#include "impls/cpu/cpu_features.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/masked.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "impls/cpu/attention-inl.h"

// Target-independent shapes and scalar helpers (compiled once).
#ifndef ATTNBENCH_IMPLS_CPU_MASKED_SHARED_
#define ATTNBENCH_IMPLS_CPU_MASKED_SHARED_
namespace attnbench::cpu::masked_detail {
using namespace attn;

inline constexpr int64_t kMaxTileQ = 1024;  // query rows per tile, at most
inline constexpr int64_t kKeyAlign = 64;    // packed key tiles: a multiple of every target's key block
inline constexpr int64_t kBwdChunk = 64;    // backward: query rows per packing task (a multiple of 16)

/// RoPE positions (the mask's position ids): the range of the tables.
struct RopeSpan {
  int64_t pos_min = 0, n_pos = 0, half = 0, floats = 0;
  explicit RopeSpan(const MaskedParams& p) {
    half = p.D / 2;
    if (p.q_pos) {
      int64_t lo = p.q_pos[0], hi = p.q_pos[0];
      for (int64_t i = 0; i < p.Nq; ++i) lo = std::min<int64_t>(lo, p.q_pos[i]), hi = std::max<int64_t>(hi, p.q_pos[i]);
      for (int64_t j = 0; j < p.Nkv; ++j) lo = std::min<int64_t>(lo, p.k_pos[j]), hi = std::max<int64_t>(hi, p.k_pos[j]);
      pos_min = lo, n_pos = hi - lo + 1;
    }
    floats = round_up(2 * n_pos * half, 16);
  }
};

/// Sizes of the forward's packed operands and per-thread tiles, in floats.
struct Layout {
  int64_t Dp, Tkp;
  int64_t kpack, vpack, rope, per_thread;
  bool direct_v;  // f32 V with D a multiple of 16 is read in place, not packed
  // Native bf16 products (bf16 inputs without RoPE; SDPA's, attention-inl.h):
  // K tiles in pairs along D (dk = D rounded up to 32), V tiles in pairs along
  // keys, per thread the raw query tile and AMX's P parts; the forward tile has
  // its rows rounded up to 16 (AMX blocks). Sizes in floats.
  bool bf16_ok;
  int64_t dk, rows_tile, kbpack, vbpack;
  explicit Layout(const MaskedParams& p) {
    Dp = round_up(p.D, 16);
    Tkp = round_up(p.tile_k, kKeyAlign);
    direct_v = p.dtype == DType::f32 && Dp == p.D;
    kpack = p.B * p.H * p.n_kt * p.D * Tkp;
    vpack = direct_v ? 0 : p.B * p.H * p.Nkv * Dp;
    rope = RopeSpan(p).floats;
    bf16_ok = p.dtype == DType::bf16 && !p.q_pos && !p.lse;  // not for a backward's forward (sdpa.cpp)
    dk = round_up(p.D, 32);
    rows_tile = bf16_ok ? round_up(p.tile_q, 16) : p.tile_q;
    kbpack = bf16_ok ? round_up(p.B * p.H * p.n_kt * dk * Tkp / 2, 16) : 0;
    vbpack = bf16_ok ? round_up(p.B * p.H * p.n_kt * Tkp * Dp / 2, 16) : 0;
    per_thread = forward_thread_floats(rows_tile, p.D, Tkp, Dp, bf16_ok);
  }
  /// The mode a call takes now (the machine, the path limit, the Highway target).
  Bf16Mode mode(bool avx3) const { return bf16_mode(bf16_ok, avx3); }
};

/// Sizes of the backward's query sides, accumulators, transposed block map and per-thread tiles, in floats.
struct BackwardLayout {
  int64_t Dp, Tkp, ld, heads, splits;
  int64_t side, dq, qmap_count, qmap_index, rope, per_thread;
  bool owned;  // one task per head: its query side and dq accumulator live in the thread's slab
  BackwardLayout(const MaskedParams& p, int threads) {
    Dp = round_up(p.D, 16);
    Tkp = round_up(p.tile_k, kKeyAlign);
    ld = round_up(p.Nq, 16);
    heads = p.B * p.H;
    // Key tiles of a head are split among tasks (each with its own dq accumulator)
    // only when there are too few heads to keep every thread busy.
    splits = std::clamp<int64_t>((4 * int64_t(threads) + heads - 1) / heads, 1, std::min<int64_t>(p.n_kt, 8));
    if (heads >= 2 * int64_t(threads)) splits = 1;
    owned = splits == 1;
    side = 2 * round_up(p.Nq * p.D, 16) + 2 * p.D * ld + 3 * ld;  // qs, dout, qst, dot, lse2 (hi, lo), delta
    dq = ld * Dp;
    qmap_count = round_up(p.map_batches * p.n_kt, 16);
    qmap_index = round_up(p.map_batches * p.n_kt * p.n_qt, 16);
    rope = RopeSpan(p).floats;
    const int64_t kt = p.D * Tkp;
    per_thread = 4 * kt + Tkp * Dp + 3 * p.tile_q * Tkp + 16 * round_up(p.D, 16);
    if (owned) per_thread += side + dq;
  }
  /// Floats shared by all threads: query sides and accumulators (split heads), the transposed map, RoPE tables.
  size_t shared() const { return size_t((owned ? 0 : heads * (side + splits * dq)) + qmap_count + qmap_index + rope); }
};

/// The allowed keys of every query row as merged intervals (CSR), collected
/// once per call: a DAG query row walks all its parents, which per (head, tile)
/// cost more than the tile's arithmetic. The forward visits a row's key tiles
/// in ascending order and keeps a cursor per row to its first interval not yet
/// behind; the backward visits them in any order and seeks it by bisection.
struct RowIntervals {
  std::vector<int64_t> lo, hi;  // intervals [lo, hi) of all rows, concatenated
  std::vector<size_t> first;    // (Nq + 1,) row i's intervals: [first[i], first[i + 1])

  template <class M>
  void collect(const M& m, int64_t Nq) {
    lo.clear(), hi.clear(), first.assign(1, 0);
    for (int64_t i = 0; i < Nq; ++i) {
      const size_t start = lo.size();
      m.row_keys(0, i, [&](int64_t a, int64_t z) {
        if (a >= z) return;
        if (lo.size() > start && hi.back() == a)
          hi.back() = z;
        else
          lo.push_back(a), hi.push_back(z);
      });
      first.push_back(lo.size());
    }
  }

  /// Row i's first interval that ends after key j0.
  size_t seek(int64_t i, int64_t j0) const {
    const auto b = hi.begin() + ptrdiff_t(first[size_t(i)]), e = hi.begin() + ptrdiff_t(first[size_t(i) + 1]);
    return size_t(std::partition_point(b, e, [&](int64_t h) { return h <= j0; }) - hi.begin());
  }

  /// −inf in row i's scores s (keys j0 .. j0 + span) outside its intervals;
  /// `c` is the row's cursor (start it at first[i], or at seek(i, j0)).
  void mask_row(int64_t i, int64_t j0, int64_t span, float* s, size_t& c) const {
    const int64_t end = j0 + span;
    const size_t last = first[size_t(i) + 1];
    while (c < last && hi[c] <= j0) ++c;
    int64_t at = j0;  // keys before it are settled
    for (size_t k = c; k < last && lo[k] < end; ++k) {
      std::fill(s + (at - j0), s + (std::max(lo[k], at) - j0), kNegInf);
      at = std::min(hi[k], end);
    }
    std::fill(s + (at - j0), s + span, kNegInf);
  }
};

/// −inf in row s (keys j0 .. j0 + span) wherever a mask without intervals forbids (b, i, ·).
template <class M>
void MaskRow(const M& m, int64_t b, int64_t i, int64_t j0, int64_t span, float* s) {
  for (int64_t j = 0; j < span; ++j)
    if (!m(b, i, j0 + j)) s[j] = kNegInf;
}

/// Mask attention: a select against the threshold (the row's logits are contiguous).
inline void MaskRow(const mask::MaskAttn& m, int64_t b, int64_t i, int64_t j0, int64_t span, float* s) {
  if (m.row_all && m.row_all[b * m.Nq + i]) return;
  const float* logit = m.logits + (b * m.Nq + i) * m.Nkv + j0;
  for (int64_t j = 0; j < span; ++j) s[j] = logit[j] >= m.threshold ? s[j] : kNegInf;
}

/// Key mask: a select against the batch entry's kept keys (contiguous).
inline void MaskRow(const mask::KeyMask& m, int64_t b, int64_t, int64_t j0, int64_t span, float* s) {
#if defined(ATTNBENCH_MUTANT_masked_key_mask_batch0)  // scripts/mutation-test.sh: every batch entry gets entry 0's keys
  const uint8_t* keep = m.keys + 0 * b + j0;
#else
  const uint8_t* keep = m.keys + b * m.Nkv + j0;
#endif
  for (int64_t j = 0; j < span; ++j) s[j] = keep[j] ? s[j] : kNegInf;
}

/// The interval form of the mask (all but mask attention and key masks, so never per batch entry), or none.
inline std::optional<RowIntervals> collect_intervals(const MaskedParams& p) {
  std::optional<RowIntervals> intervals;
  visit_mask(p.mask, [&](const auto& m) {
    if constexpr (std::decay_t<decltype(m)>::kIntervals) intervals.emplace().collect(m, p.Nq);
  });
  return intervals;
}

/// Score mod of row i over keys j0 … j0 + span − 1 of base-2 scores s (in
/// place, in natural units s·ln2 the scaled logit); dmod (or null) gets the
/// mod's derivative (softcap: 1 − tanh², the others add constants: 1).
inline void ApplyScoreMod(const mask::ScoreMod& mod, int64_t h, int64_t i, int64_t j0, int64_t span, float* s,
                          float* dmod) {
  for (int64_t j = 0; j < span; ++j) {
    const float m = mask::apply_score_mod(mod, s[j] * kLn2, h, i, j0 + j);
    if (dmod) {
      const float t = m / mod.softcap;
      dmod[j] = 1.0f - t * t;
    }
    s[j] = kLog2e * m;
  }
}

}  // namespace attnbench::cpu::masked_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace masked_detail;

// The native bf16 products need AVX-512 register tiles (64-column score blocks).
inline constexpr bool kAvx3 = HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3;

/// RoPE of the queries and keys at the mask's position ids (half-split pairs), or none.
struct MaskedRopes {
  Rope q, k;
  MaskedRopes(const MaskedParams& p, const float* cos_t, const float* sin_t) {
    if (!p.q_pos) return;
    const RopeSpan span(p);
    q.pairs = k.pairs = RopePairs::half;
    q.cos_t = k.cos_t = cos_t, q.sin_t = k.sin_t = sin_t;
    q.half = k.half = span.half, q.pos_min = k.pos_min = span.pos_min;
    q.pos = p.q_pos, k.pos = p.k_pos;
  }
};

/// Packs key tile kt of head bh into `out`: keys past the tile zero.
template <class T>
void PackTile(const MaskedParams& p, const Rope& krope, int64_t bh, int64_t kt, int64_t Tkp, const KeyPack& out,
              float* rows) {
  const T* k = static_cast<const T*>(p.k) + bh * p.Nkv * p.D;
  const T* v = static_cast<const T*>(p.v) + bh * p.Nkv * p.D;
  const int64_t j0 = kt * p.tile_k;
  PackKeyTile<T>(
      p.D, p.D, std::min(p.tile_k, p.Nkv - j0), Tkp, [&](int64_t jt) { return k + (j0 + jt) * p.D; },
      [&](int64_t jt) { return v + (j0 + jt) * p.D; }, krope, j0, out, rows);
}

/// One forward task: query tile qt of head (b, h) against the key tiles of its block-map row:
/// S = Q·Kᵀ → score mod (if any, every visited tile) → mask (partial tiles only) → online softmax → O += P·V.
/// Packs key tile kt of head bh for the bf16 modes: the bf16 bits of K in pairs
/// along D and (AMX) of V in pairs along keys, pads zero.
void PackTileBf16(const MaskedParams& p, const Layout& lay, int64_t bh, int64_t kt, Bf16Mode mode, uint16_t* kbpack,
                  uint16_t* vbpack) {
  const bf16_t* k = static_cast<const bf16_t*>(p.k) + bh * p.Nkv * p.D;
  const bf16_t* v = static_cast<const bf16_t*>(p.v) + bh * p.Nkv * p.D;
  const int64_t j0 = kt * p.tile_k, span = std::min(p.tile_k, p.Nkv - j0);
  uint16_t* kb = kbpack + (bh * p.n_kt + kt) * lay.dk * lay.Tkp;
  std::fill_n(kb, lay.dk * lay.Tkp, uint16_t(0));
  for (int64_t jt = 0; jt < span; ++jt)
    for (int64_t d = 0; d < p.D; ++d) kb[((d / 2) * lay.Tkp + jt) * 2 + (d & 1)] = k[(j0 + jt) * p.D + d].bits;
  if (mode != Bf16Mode::amx) return;
  uint16_t* vb = vbpack + (bh * p.n_kt + kt) * lay.Tkp * lay.Dp;
  std::fill_n(vb, lay.Tkp * lay.Dp, uint16_t(0));
  for (int64_t jt = 0; jt < span; ++jt)
    for (int64_t d = 0; d < p.D; ++d) vb[((jt / 2) * lay.Dp + d) * 2 + (jt & 1)] = v[(j0 + jt) * p.D + d].bits;
}

template <class T>
void AttendQueryTile(const MaskedParams& p, const Layout& lay, const MaskedRopes& ropes, const float* kpack,
                     const float* vpack, const RowIntervals* intervals, const ForwardTile& w, int64_t task,
                     const uint16_t* kbpack, const uint16_t* vbpack) {
  const DF df;
  const int64_t qt = task % p.n_qt, bh = task / p.n_qt, b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * p.tile_q, rows = std::min(p.tile_q, p.Nq - i0);
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));

  const T* q = static_cast<const T*>(p.q) + (bh * p.Nq + i0) * p.D;
  if (w.mode == Bf16Mode::off) {
    for (int64_t r = 0; r < rows; ++r) load_row(w.q + r * p.D, q + r * p.D, p.D, ropes.q, i0 + r, qscale);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    // Raw bf16 query rows, D padded to dk and rows to 16 with zeros (S is scaled after the product).
    std::fill_n(w.qb, round_up(rows, 16) * w.dk, uint16_t(0));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < p.D; ++d) w.qb[r * w.dk + d] = q[r * p.D + d].bits;
  }

  const float* kt_head = kpack + bh * p.n_kt * p.D * lay.Tkp;
  const float* v_head = vpack + bh * p.Nkv * lay.Dp;
  int64_t v_stride = lay.Dp;
  if (lay.direct_v) {
    v_head = static_cast<const float*>(p.v) + bh * p.Nkv * p.D;
    v_stride = p.D;
  }
  size_t cursor[kMaxTileQ];  // interval masks: each row's first interval not yet behind
  if (intervals)
    for (int64_t r = 0; r < rows; ++r) cursor[r] = intervals->first[size_t(i0 + r)];
  const int64_t mb = p.map_batches > 1 ? b : 0;
  const int64_t map_row = (mb * p.n_qt + qt) * p.n_kt;
  const bool mod = p.mod.kind != mask::ScoreModKind::none;
  bool partial = false;
  ForwardRows(
      df, w, rows, p.D,
      [&](auto&& f) {
        for (int64_t n = 0; n < p.kv_count[mb * p.n_qt + qt]; ++n) {
          const int64_t kt = p.kv_index[map_row + n], j0 = kt * p.tile_k;
#if defined(ATTNBENCH_MUTANT_masked_ignore_mask)  // scripts/mutation-test.sh: partial tiles are not masked
          partial = false;
#else
          partial = mask::Tile(p.tiles[map_row + kt]) == mask::Tile::partial;
#endif
          f(KeyTileView{j0, std::min(p.tile_k, p.Nkv - j0), kt_head + kt * p.D * lay.Tkp, lay.Tkp,
                        v_head + j0 * v_stride, v_stride,
                        kbpack ? kbpack + (bh * p.n_kt + kt) * lay.dk * lay.Tkp : nullptr,
                        vbpack ? vbpack + (bh * p.n_kt + kt) * lay.Tkp * lay.Dp : nullptr});
        }
      },
      [&](const KeyTileView& t, int64_t) {
        if (!mod && !partial) return;
        for (int64_t r = 0; r < rows; ++r) {
          float* s = w.s + r * w.s_ld;
          const int64_t i = i0 + r;
          if (mod) ApplyScoreMod(p.mod, h, i, t.j0, t.span, s, nullptr);
          if (partial && intervals)
            intervals->mask_row(i, t.j0, t.span, s, cursor[r]);
          else if (partial)
            visit_mask(p.mask, [&](const auto& m) { MaskRow(m, b, i, t.j0, t.span, s); });
          w.stale[r] = true;
        }
      });
  float* o = p.o + (bh * p.Nq + i0) * p.D;
  FinishRows(
      w, rows, p.D, [&](int64_t r) { return o + r * p.D; },
      [&](int64_t r) { return p.lse ? p.lse + bh * p.Nq + i0 + r : nullptr; });
}

template <class T>
void ForwardTyped(const MaskedParams& p, float* scratch, int threads) {
  const Layout lay(p);
  const RopeSpan rs(p);
  float* kpack = scratch;
  float* vpack = kpack + lay.kpack;
  float* cos_t = vpack + lay.vpack;
  float* sin_t = cos_t + rs.n_pos * rs.half;
  uint16_t* kbpack = reinterpret_cast<uint16_t*>(vpack + lay.vpack + lay.rope);
  uint16_t* vbpack = reinterpret_cast<uint16_t*>(vpack + lay.vpack + lay.rope + lay.kbpack);
  float* slabs = vpack + lay.vpack + lay.rope + lay.kbpack + lay.vbpack;
  const Bf16Mode mode = lay.mode(kAvx3);

  if (p.q_pos) RopeTables(rs.pos_min, rs.n_pos, p.D, cos_t, sin_t, threads);
  const MaskedRopes ropes(p, cos_t, sin_t);
  const std::optional<RowIntervals> intervals = collect_intervals(p);

#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + lay.per_thread * omp_get_thread_num();
    ForwardTile w = ForwardTile::carve(slab, lay.rows_tile, p.D, lay.Tkp, lay.Dp);
    float* rows = slab + round_up(forward_tile_floats(lay.rows_tile, p.D, lay.Tkp, lay.Dp), 16);
    if (mode != Bf16Mode::off) {
      float* b16 = rows + 16 * round_up(p.D, 16);
      w.mode = mode, w.dk = lay.dk, w.qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));
      w.qb = reinterpret_cast<uint16_t*>(b16);
      w.pb = reinterpret_cast<uint16_t*>(b16 + round_up(lay.rows_tile * lay.dk / 2, 16));
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.B * p.H * p.n_kt; ++task) {
      const int64_t kt = task % p.n_kt, bh = task / p.n_kt;
      if (mode != Bf16Mode::off) {
        PackTileBf16(p, lay, bh, kt, mode, kbpack, vbpack);
        if (mode == Bf16Mode::amx) continue;  // V in pairs: the f32 rows are not read
      }
      KeyPack out;
      if (mode == Bf16Mode::off) out.kt = kpack + (bh * p.n_kt + kt) * p.D * lay.Tkp;
      out.ld = lay.Tkp;
      if (!lay.direct_v) out.vrows = vpack + (bh * p.Nkv + kt * p.tile_k) * lay.Dp, out.v_ld = lay.Dp;
      PackTile<T>(p, ropes.k, bh, kt, lay.Tkp, out, rows);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * p.H * p.n_qt; ++task)
      AttendQueryTile<T>(p, lay, ropes, kpack, vpack, intervals ? &*intervals : nullptr, w, task,
                         mode != Bf16Mode::off ? kbpack : nullptr, mode == Bf16Mode::amx ? vbpack : nullptr);
  }
}

/// The kernel path the forward takes for p now ("" for the f32 path).
const char* MaskedForwardPath(const MaskedParams& p) { return bf16_mode_path(Layout(p).mode(kAvx3)); }

void MaskedForward(const MaskedParams& p, float* scratch, int threads) {
  if (p.dtype == DType::bf16)
    ForwardTyped<bf16_t>(p, scratch, threads);
  else if (p.dtype == DType::f16)
    ForwardTyped<f16_t>(p, scratch, threads);
  else
    ForwardTyped<float>(p, scratch, threads);
}

// ---- Backward ---------------------------------------------------------------------

HWY_INLINE QuerySide CarveSide(const MaskedParams& p, const BackwardLayout& bl, float* at) {
  const int64_t rd = round_up(p.Nq * p.D, 16);
  QuerySide qs;
  qs.qs = at;
  qs.dout = at + rd;
  qs.qst = at + 2 * rd;
  qs.dot = qs.qst + p.D * bl.ld;
  qs.lse2 = qs.dot + p.D * bl.ld;
  qs.lse2lo = qs.lse2 + bl.ld;
  qs.delta = qs.lse2lo + bl.ld;
  qs.ld = bl.ld;
  return qs;
}

/// The block map transposed: for every key tile, the non-empty query tiles.
struct QueryMap {
  int32_t* count;  // (map_batches, n_kt)
  int32_t* index;  // (map_batches, n_kt, n_qt)
};

inline void TransposeMap(const MaskedParams& p, const QueryMap& m) {
  for (int64_t mb = 0; mb < p.map_batches; ++mb)
    for (int64_t kt = 0; kt < p.n_kt; ++kt) {
      int32_t n = 0;
      for (int64_t qt = 0; qt < p.n_qt; ++qt)
        if (mask::Tile(p.tiles[(mb * p.n_qt + qt) * p.n_kt + kt]) != mask::Tile::empty)
          m.index[(mb * p.n_kt + kt) * p.n_qt + n++] = int32_t(qt);
      m.count[mb * p.n_kt + kt] = n;
    }
}

/// Packs query rows i0 … i1 − 1 of head bh's query side and zeroes their dq
/// accumulators (the head's `splits`, bl.dq apart from dq_h).
template <class T>
void PackQueryRows(const MaskedBackwardParams& bp, const BackwardLayout& bl, const MaskedRopes& ropes, int64_t bh,
                   int64_t i0, int64_t i1, const QuerySide& qs, float* dq_h) {
  const MaskedParams& p = bp.fwd;
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  const T* q = static_cast<const T*>(p.q) + bh * p.Nq * p.D;
  const T* dout = static_cast<const T*>(bp.dout) + bh * p.Nq * p.D;
  for (int64_t i = i0; i < i1; ++i) {
    PackQueryRow(qs, i, p.D, p.D, q + i * p.D, dout + i * p.D, p.o + (bh * p.Nq + i) * p.D, p.lse[bh * p.Nq + i],
                 ropes.q, i, qscale);
    for (int64_t s = 0; s < bl.splits; ++s) std::fill_n(dq_h + s * bl.dq + i * bl.Dp, bl.Dp, 0.0f);
  }
  TransposeQueryRows(qs, p.D, p.D, i0, i1, p.Nq);
}

/// Key tiles kt ≡ split (mod splits) of head bh into the split's accumulator dq,
/// each against the non-empty query tiles of its block-map column (score mod on
/// every visited tile, the mask on partial ones); then the tile's dK and dV.
template <class T>
void BackwardKeyTiles(const MaskedBackwardParams& bp, const BackwardLayout& bl, const MaskedRopes& ropes, int64_t bh,
                      int64_t split, const QuerySide& qs, float* dq, const QueryMap& qmap,
                      const RowIntervals* intervals, const KeyTileGrads& kg, const PairTiles& tiles, float* rows_buf) {
  const DF df;
  const MaskedParams& p = bp.fwd;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t mb = p.map_batches > 1 ? b : 0;
  const bool mod = p.mod.kind != mask::ScoreModKind::none;
  PairTiles w = tiles;
  if (p.mod.kind != mask::ScoreModKind::softcap) w.dmod = nullptr;
  auto dk_row = [&](int64_t j) { return bp.dk + (bh * p.Nkv + j) * p.D; };
  auto dv_row = [&](int64_t j) { return bp.dv + (bh * p.Nkv + j) * p.D; };
  for (int64_t kt = split; kt < p.n_kt; kt += bl.splits) {
    const int64_t j0 = kt * p.tile_k, span = std::min(p.tile_k, p.Nkv - j0);
    const int64_t count = qmap.count[mb * p.n_kt + kt];
    if (count == 0) {  // no query sees these keys
      for (int64_t jt = 0; jt < span; ++jt) std::fill_n(dk_row(j0 + jt), p.D, 0.0f), std::fill_n(dv_row(j0 + jt), p.D, 0.0f);
      continue;
    }
    PackTile<T>(p, ropes.k, bh, kt, bl.Tkp, kg.pack(), rows_buf);
    std::fill_n(kg.dkt, p.D * kg.ld, 0.0f);
    std::fill_n(kg.dvt, p.D * kg.ld, 0.0f);
    for (int64_t n = 0; n < count; ++n) {
      const int64_t qt = qmap.index[(mb * p.n_kt + kt) * p.n_qt + n];
      const bool partial = mask::Tile(p.tiles[(mb * p.n_qt + qt) * p.n_kt + kt]) == mask::Tile::partial;
      const int64_t i0 = qt * p.tile_q, rows = std::min(p.tile_q, p.Nq - i0);
      BackwardPair(df, p.D, p.D, qs, dq, i0, rows, span, kg, w, [&](float* s, int64_t ncols, float* dmod) {
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s + r * w.ld;
          const int64_t i = i0 + r;
          if (mod) ApplyScoreMod(p.mod, h, i, j0, span, sr, dmod ? dmod + r * w.ld : nullptr);
          if (partial && intervals) {
            size_t c = intervals->seek(i, j0);
            intervals->mask_row(i, j0, span, sr, c);
          } else if (partial) {
            visit_mask(p.mask, [&](const auto& m) { MaskRow(m, b, i, j0, span, sr); });
          }
          std::fill(sr + span, sr + ncols, kNegInf);
        }
      });
    }
    StoreKeyGrads(
        kg, p.D, p.D, span, ropes.k, j0, [&](int64_t jt) { return dk_row(j0 + jt); },
        [&](int64_t jt) { return dv_row(j0 + jt); });
  }
}

/// dq of query rows i0 … i1 − 1 of head bh: its split accumulators summed, scaled, rotated back.
void StoreQueryRows(const MaskedBackwardParams& bp, const BackwardLayout& bl, const MaskedRopes& ropes, int64_t bh,
                    int64_t i0, int64_t i1, const float* dq_h) {
  const MaskedParams& p = bp.fwd;
  const float scale = float(1.0 / std::sqrt(double(p.D)));
  for (int64_t i = i0; i < i1; ++i)
    StoreQueryGrad(bp.dq + (bh * p.Nq + i) * p.D, dq_h + i * bl.Dp, bl.splits, bl.dq, p.D, scale, ropes.q, i);
}

/// One task per head (bl.owned): its query side packed into the thread's slab in
/// 64-row chunks, all its key tiles, then its dq. Otherwise three passes: every
/// head's side, (head, split) tasks, the splits summed.
template <class T>
void BackwardTyped(const MaskedBackwardParams& bp, float* scratch, int threads) {
  const MaskedParams& p = bp.fwd;
  const BackwardLayout bl(p, threads);
  const RopeSpan rs(p);
  float* sides = scratch;  // split heads only
  float* dq_acc = sides + (bl.owned ? 0 : bl.heads * bl.side);
  float* after_dq = dq_acc + (bl.owned ? 0 : bl.heads * bl.splits * bl.dq);
  const QueryMap qmap{reinterpret_cast<int32_t*>(after_dq), reinterpret_cast<int32_t*>(after_dq + bl.qmap_count)};
  float* cos_t = after_dq + bl.qmap_count + bl.qmap_index;
  float* sin_t = cos_t + rs.n_pos * rs.half;
  float* slabs = cos_t + bl.rope;
  if (p.q_pos) RopeTables(rs.pos_min, rs.n_pos, p.D, cos_t, sin_t, threads);
  const MaskedRopes ropes(p, cos_t, sin_t);
  const std::optional<RowIntervals> intervals = collect_intervals(p);
  const RowIntervals* iv = intervals ? &*intervals : nullptr;
  TransposeMap(p, qmap);

  const int64_t per_head = (p.Nq + kBwdChunk - 1) / kBwdChunk;
#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + bl.per_thread * omp_get_thread_num();
    const int64_t kt = p.D * bl.Tkp, tile = p.tile_q * bl.Tkp;
    const KeyTileGrads kg{slab, slab + kt, slab + 2 * kt, slab + 2 * kt + bl.Tkp * bl.Dp,
                          slab + 3 * kt + bl.Tkp * bl.Dp, bl.Tkp, bl.Dp};
    float* t0 = slab + 4 * kt + bl.Tkp * bl.Dp;
    const PairTiles w{t0, t0 + tile, t0 + 2 * tile, bl.Tkp};
    float* rows_buf = t0 + 3 * tile;
    float* own = rows_buf + 16 * round_up(p.D, 16);  // owned: the head's side, then its dq accumulator
    if (bl.owned) {
      const QuerySide qs = CarveSide(p, bl, own);
      float* dq = own + bl.side;
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < bl.heads; ++bh) {
        for (int64_t i0 = 0; i0 < p.Nq; i0 += kBwdChunk)
          PackQueryRows<T>(bp, bl, ropes, bh, i0, std::min(p.Nq, i0 + kBwdChunk), qs, dq);
        BackwardKeyTiles<T>(bp, bl, ropes, bh, 0, qs, dq, qmap, iv, kg, w, rows_buf);
        StoreQueryRows(bp, bl, ropes, bh, 0, p.Nq, dq);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t task = 0; task < bl.heads * per_head; ++task) {
        const int64_t bh = task / per_head, i0 = (task % per_head) * kBwdChunk;
        PackQueryRows<T>(bp, bl, ropes, bh, i0, std::min(p.Nq, i0 + kBwdChunk), CarveSide(p, bl, sides + bh * bl.side),
                         dq_acc + bh * bl.splits * bl.dq);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < bl.heads * bl.splits; ++task) {
        const int64_t bh = task / bl.splits, split = task % bl.splits;
        BackwardKeyTiles<T>(bp, bl, ropes, bh, split, CarveSide(p, bl, sides + bh * bl.side), dq_acc + task * bl.dq,
                            qmap, iv, kg, w, rows_buf);
      }
#pragma omp for schedule(static)
      for (int64_t task = 0; task < bl.heads * per_head; ++task) {
        const int64_t bh = task / per_head, i0 = (task % per_head) * kBwdChunk;
        StoreQueryRows(bp, bl, ropes, bh, i0, std::min(p.Nq, i0 + kBwdChunk), dq_acc + bh * bl.splits * bl.dq);
      }
    }
  }
}

void MaskedBackward(const MaskedBackwardParams& p, float* scratch, int threads) {
  if (p.fwd.dtype == DType::bf16)
    BackwardTyped<bf16_t>(p, scratch, threads);
  else if (p.fwd.dtype == DType::f16)
    BackwardTyped<f16_t>(p, scratch, threads);
  else
    BackwardTyped<float>(p, scratch, threads);
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(MaskedForward);
HWY_EXPORT(MaskedForwardPath);
HWY_EXPORT(MaskedBackward);

namespace {
void check_common(const MaskedParams& p, const char* who) {
  const std::string w(who);
  if (p.dtype != DType::f32 && p.dtype != DType::bf16 && p.dtype != DType::f16)
    throw std::invalid_argument(w + ": q, k, v must be f32, bf16 or f16");
  if (p.q_pos && (p.D % 2 != 0 || !p.k_pos))
    throw std::invalid_argument(w + ": RoPE needs an even D and both position arrays");
  if (p.tile_q > masked_detail::kMaxTileQ) throw std::invalid_argument(w + ": tile_q above 1024");
  if (p.n_qt != (p.Nq + p.tile_q - 1) / p.tile_q || p.n_kt != (p.Nkv + p.tile_k - 1) / p.tile_k)
    throw std::invalid_argument(w + ": block map tiles do not match Nq, Nkv");
}
}  // namespace

size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p, int threads) {
  const masked_detail::Layout lay(p);
  return size_t(lay.kpack + lay.vpack + lay.rope + lay.kbpack + lay.vbpack + lay.per_thread * std::max(1, threads)) *
         sizeof(float);
}

std::string masked_forward_path(const MaskedParams& p) {
  const char* bf16 = HWY_DYNAMIC_DISPATCH(MaskedForwardPath)(p);
  return *bf16 ? std::string(bf16) : f32_kernel_path();
}

void masked_forward_block_sparse(const MaskedParams& p, void* scratch, int threads) {
  check_common(p, "masked_forward_block_sparse");
  HWY_DYNAMIC_DISPATCH(MaskedForward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

size_t masked_backward_block_sparse_scratch_bytes(const MaskedBackwardParams& p, int threads) {
  threads = std::max(1, threads);
  const masked_detail::BackwardLayout bl(p.fwd, threads);
  return (bl.shared() + size_t(bl.per_thread) * size_t(threads)) * sizeof(float);
}

void masked_backward_block_sparse(const MaskedBackwardParams& p, void* scratch, int threads) {
  check_common(p.fwd, "masked_backward_block_sparse");
  if (!p.fwd.o || !p.fwd.lse || !p.dout || !p.dq || !p.dk || !p.dv)
    throw std::invalid_argument("masked_backward_block_sparse: o, lse, dout, dq, dk and dv must all be set");
  HWY_DYNAMIC_DISPATCH(MaskedBackward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

}  // namespace attnbench::cpu
#endif
