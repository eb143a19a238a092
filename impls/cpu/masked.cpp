// Masked attention, block-sparse CPU forward (DESIGN §5 "Mask family").
//
//   q: (B, H, Nq, D)   k, v: (B, H, Nkv, D)   block map: (map_batches, n_qt, n_kt) tiles
//   o_i = Σ_j softmax_j(mod_h(RoPE(q_i)·RoPE(k_j)/√D, i, j) over allowed(b, i, j)) v_j    o: (B, H, Nq, D) f32
//   (0 for a row without allowed keys)
//
// Algorithm: the SDPA kernel's (impls/cpu/sdpa.cpp: packed K tiles, 6×64
// register-blocked S = Q·Kᵀ and O += P·V, base-2 online softmax; the vector
// helpers are shared in attention-inl.h), driven by the block map
// (impls/block_map.hpp) instead of a row limit. OpenMP over (b, h, query tile);
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

inline constexpr int64_t kMaxTileQ = 1024;  // query rows per tile, at most
inline constexpr int64_t kKeyAlign = 64;  // packed key tiles: a multiple of every target's key block
inline constexpr int64_t kMaxLanes = 16;  // f32 lanes of the widest x86 target (AVX-512)
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// Sizes of the packed operands and per-thread tiles, in floats.
struct Layout {
  int64_t Dp, Tkp, half, pos_min, n_pos;
  int64_t kpack, vpack, rope, per_thread;
  bool direct_v;  // f32 V with D a multiple of 16 is read in place, not packed
  explicit Layout(const MaskedParams& p) {
    Dp = round_up(p.D, 16);
    Tkp = round_up(p.tile_k, kKeyAlign);
    direct_v = p.dtype == DType::f32 && Dp == p.D;
    half = p.D / 2;
    pos_min = n_pos = 0;
    if (p.q_pos) {
      int64_t lo = p.q_pos[0], hi = p.q_pos[0];
      for (int64_t i = 0; i < p.Nq; ++i) lo = std::min<int64_t>(lo, p.q_pos[i]), hi = std::max<int64_t>(hi, p.q_pos[i]);
      for (int64_t j = 0; j < p.Nkv; ++j) lo = std::min<int64_t>(lo, p.k_pos[j]), hi = std::max<int64_t>(hi, p.k_pos[j]);
      pos_min = lo, n_pos = hi - lo + 1;
    }
    kpack = p.B * p.H * p.n_kt * p.D * Tkp;
    vpack = direct_v ? 0 : p.B * p.H * p.Nkv * Dp;
    rope = round_up(2 * n_pos * half, 16);
    // q tile (tile_q, D), scores (tile_q, Tkp), o (tile_q, Dp), m, l, alpha, 16 key rows,
    // lane-wise row maxima, row flags.
    const int64_t tq = round_up(p.tile_q, 16);
    per_thread = round_up(p.tile_q * p.D, 16) + p.tile_q * Tkp + p.tile_q * Dp + 3 * tq + 16 * round_up(p.D, 16) +
                 p.tile_q * kMaxLanes + tq;
  }
};

inline float load_elem(const float* x, int64_t i) { return x[i]; }
inline float load_elem(const bf16_t* x, int64_t i) { return to_float(x[i]); }

/// Reads one row of D elements into f32, rotated by RoPE (half-split) with (c, s) or not (c null).
template <class T>
void load_row_rotated(float* out, const T* in, int64_t D, const float* c, const float* s) {
  for (int64_t d = 0; d < D; ++d) out[d] = load_elem(in, d);
  if (!c) return;
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = out[i], b = out[i + half];
    out[i] = a * c[i] - b * s[i];
    out[i + half] = b * c[i] + a * s[i];
  }
}

/// The allowed keys of every query row as merged intervals (CSR), collected
/// once per call: a DAG query row walks all its parents, which per (head, tile)
/// cost more than the tile's arithmetic. Key tiles are visited in ascending
/// order, so a task keeps one cursor per row to its first interval not yet behind.
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

  /// −inf in row i's scores s (keys j0 .. j0 + span) outside its intervals;
  /// `c` is the row's cursor (start it at first[i]).
  void mask_row(int64_t i, int64_t j0, int64_t span, float* s, size_t& c) const {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
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
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < span; ++j)
    if (!m(b, i, j0 + j)) s[j] = kNegInf;
}

/// Mask attention: a select against the threshold (the row's logits are contiguous).
inline void MaskRow(const mask::MaskAttn& m, int64_t b, int64_t i, int64_t j0, int64_t span, float* s) {
  if (m.row_all && m.row_all[b * m.Nq + i]) return;
  const float* logit = m.logits + (b * m.Nq + i) * m.Nkv + j0;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < span; ++j) s[j] = logit[j] >= m.threshold ? s[j] : kNegInf;
}

}  // namespace attnbench::cpu::masked_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace masked_detail;
static_assert(hn::MaxLanes(DF()) <= size_t(kMaxLanes), "row-maxima scratch sized for 16 lanes");

/// Scratch of one thread.
struct MaskedTiles {
  float* q;      // (tile_q, D)   rotated, scaled query tile
  float* s;      // (tile_q, Tkp) scores, then probabilities
  float* o;      // (tile_q, Dp)  output accumulator
  float* m;      // (tile_q,) running max (log2 units)
  float* l;      // (tile_q,) running sum
  float* alpha;  // (tile_q,) rescale factor of the current tile
  float* rows;   // (16, D) rotated key rows (packing)
  float* vmax;   // (tile_q, 16) lane-wise row maxima of the current score tile
  bool* stale;   // (tile_q,) the row's vmax no longer holds (mod, mask or padding changed it)
};

/// Packs key tile kt of head (b, h): K rotated and transposed to (D, Tkp), keys
/// past the tile zero; V widened to rows (Nkv, Dp) unless read in place.
template <class T>
void PackKV(const MaskedParams& p, const Layout& lay, const float* cos_t, const float* sin_t, float* kpack,
            float* vpack, float* rows, int64_t task) {
  constexpr int64_t kBlock = 16;
  const int64_t kt = task % p.n_kt, bh = task / p.n_kt;
  const T* k = static_cast<const T*>(p.k) + bh * p.Nkv * p.D;
  const T* v = static_cast<const T*>(p.v) + bh * p.Nkv * p.D;
  float* ktile = kpack + (bh * p.n_kt + kt) * p.D * lay.Tkp;
  const int64_t j0 = kt * p.tile_k, span = std::min(p.tile_k, p.Nkv - j0);
  for (int64_t jb = 0; jb < lay.Tkp; jb += kBlock) {
    for (int64_t jj = 0; jj < kBlock; ++jj) {
      const int64_t jt = jb + jj, j = j0 + jt;
      float* krow = rows + jj * p.D;
      if (jt >= span) {
        std::fill_n(krow, p.D, 0.0f);
        continue;
      }
      const int64_t ti = p.k_pos ? (p.k_pos[j] - lay.pos_min) * lay.half : 0;
      load_row_rotated(krow, k + j * p.D, p.D, p.k_pos ? cos_t + ti : nullptr, sin_t + ti);
      if (lay.direct_v) continue;
      float* vrow = vpack + (bh * p.Nkv + j) * lay.Dp;
      for (int64_t d = 0; d < p.D; ++d) vrow[d] = load_elem(v + j * p.D, d);
      std::fill(vrow + p.D, vrow + lay.Dp, 0.0f);
    }
    for (int64_t d = 0; d < p.D; ++d)
      for (int64_t jj = 0; jj < kBlock; ++jj) ktile[d * lay.Tkp + jb + jj] = rows[jj * p.D + d];
  }
}

/// One task: query tile qt of head (b, h) against the key tiles of its block-map row.
template <class T>
void AttendQueryTile(const MaskedParams& p, const Layout& lay, const float* cos_t, const float* sin_t,
                     const float* kpack, const float* vpack, const RowIntervals* intervals, const MaskedTiles& w,
                     int64_t task) {
  const DF df;
  const int64_t L = int64_t(hn::Lanes(df)), kb = int64_t(kBlockVecs) * L;
  const int64_t qt = task % p.n_qt, bh = task / p.n_qt, b = bh / p.H, h = bh % p.H;
  const int64_t i0 = qt * p.tile_q, rows = std::min(p.tile_q, p.Nq - i0);
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  const T* q = static_cast<const T*>(p.q) + (bh * p.Nq + i0) * p.D;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ti = p.q_pos ? (p.q_pos[i0 + r] - lay.pos_min) * lay.half : 0;
    float* qr = w.q + r * p.D;
    load_row_rotated(qr, q + r * p.D, p.D, p.q_pos ? cos_t + ti : nullptr, sin_t + ti);
    for (int64_t d = 0; d < p.D; ++d) qr[d] *= qscale;
    w.m[r] = kNegInf;
    w.l[r] = 0.0f;
  }
  std::fill_n(w.o, rows * lay.Dp, 0.0f);

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
  const int64_t n_visit = p.kv_count[mb * p.n_qt + qt];
  for (int64_t n = 0; n < n_visit; ++n) {
    const int64_t kt = p.kv_index[map_row + n];
#if defined(ATTNBENCH_MUTANT_masked_ignore_mask)  // scripts/mutation-test.sh: partial tiles are not masked
    const bool partial = false;
#else
    const bool partial = mask::Tile(p.tiles[map_row + kt]) == mask::Tile::partial;
#endif
    const int64_t j0 = kt * p.tile_k, span = std::min(p.tile_k, p.Nkv - j0), ncols = round_up(span, kb);
    const float* ktile = kt_head + kt * p.D * lay.Tkp;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows)
      for (int64_t c0 = 0; c0 < ncols; c0 += kb)
        ScoresBlockRows(df, size_t(std::min<int64_t>(kBlockRows, rows - r0)), size_t(p.D), w.q + r0 * p.D,
                        size_t(p.D), ktile + c0, size_t(lay.Tkp), w.s + r0 * lay.Tkp + c0, size_t(lay.Tkp),
                        w.vmax + r0 * L, c0 == 0);
    const bool mod = p.mod.kind != mask::ScoreModKind::none;
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s + r * lay.Tkp;
      const int64_t i = i0 + r;
      if (mod)  // in natural units: s·ln2 is the scaled logit
        for (int64_t j = 0; j < span; ++j) s[j] = kLog2e * mask::apply_score_mod(p.mod, s[j] * kLn2, h, i, j0 + j);
      if (partial && intervals)
        intervals->mask_row(i, j0, span, s, cursor[r]);
      else if (partial)
        visit_mask(p.mask, [&](const auto& m) { MaskRow(m, b, i, j0, span, s); });
      std::fill(s + span, s + ncols, kNegInf);
      w.stale[r] = mod || partial || span < ncols;
    }
    for (int64_t r = 0; r < rows; ++r)
      w.alpha[r] = OnlineSoftmaxRow(df, w.s + r * lay.Tkp, size_t(ncols), w.stale[r] ? nullptr : w.vmax + r * L,
                                    w.m[r], w.l[r]);
#if defined(ATTNBENCH_MUTANT_masked_p_bf16)  // scripts/mutation-test.sh: probabilities rounded to bf16 before P·V
    if constexpr (std::is_same_v<T, bf16_t>)
      for (int64_t x = 0; x < rows * lay.Tkp; ++x) w.s[x] = to_float(to_bf16(w.s[x]));
#endif
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows)
      for (int64_t c0 = 0; c0 < lay.Dp; c0 += kb)
        AccumulateBlockRows(df, size_t(std::min<int64_t>(kBlockRows, rows - r0)), size_t((lay.Dp - c0) / L),
                            size_t(span), w.s + r0 * lay.Tkp, size_t(lay.Tkp), v_head + j0 * v_stride + c0,
                            size_t(v_stride), w.alpha + r0, w.o + r0 * lay.Dp + c0, size_t(lay.Dp));
  }

  float* o = p.o + (bh * p.Nq + i0) * p.D;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
    for (int64_t d = 0; d < p.D; ++d) o[r * p.D + d] = w.o[r * lay.Dp + d] * inv;
  }
}

template <class T>
void ForwardTyped(const MaskedParams& p, float* scratch, int threads) {
  const Layout lay(p);
  float* kpack = scratch;
  float* vpack = kpack + lay.kpack;
  float* cos_t = vpack + lay.vpack;
  float* sin_t = cos_t + lay.n_pos * lay.half;
  float* slabs = vpack + lay.vpack + lay.rope;

  if (p.q_pos) RopeTables(lay.pos_min, lay.n_pos, p.D, cos_t, sin_t, threads);

  // Interval masks (all but mask attention, so never per batch entry): the rows' keys, once.
  std::optional<RowIntervals> intervals;
  visit_mask(p.mask, [&](const auto& m) {
    if constexpr (std::decay_t<decltype(m)>::kIntervals) intervals.emplace().collect(m, p.Nq);
  });

#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + lay.per_thread * omp_get_thread_num();
    MaskedTiles w;
    w.q = slab;
    w.s = w.q + round_up(p.tile_q * p.D, 16);
    w.o = w.s + p.tile_q * lay.Tkp;
    w.m = w.o + p.tile_q * lay.Dp;
    w.l = w.m + round_up(p.tile_q, 16);
    w.alpha = w.l + round_up(p.tile_q, 16);
    w.rows = w.alpha + round_up(p.tile_q, 16);
    w.vmax = w.rows + 16 * round_up(p.D, 16);
    w.stale = reinterpret_cast<bool*>(w.vmax + p.tile_q * kMaxLanes);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.B * p.H * p.n_kt; ++task)
      PackKV<T>(p, lay, cos_t, sin_t, kpack, vpack, w.rows, task);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * p.H * p.n_qt; ++task)
      AttendQueryTile<T>(p, lay, cos_t, sin_t, kpack, vpack, intervals ? &*intervals : nullptr, w, task);
  }
}

void MaskedForward(const MaskedParams& p, float* scratch, int threads) {
  if (p.dtype == DType::bf16)
    ForwardTyped<bf16_t>(p, scratch, threads);
  else
    ForwardTyped<float>(p, scratch, threads);
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(MaskedForward);

size_t masked_forward_block_sparse_scratch_bytes(const MaskedParams& p, int threads) {
  const masked_detail::Layout lay(p);
  return size_t(lay.kpack + lay.vpack + lay.rope + lay.per_thread * std::max(1, threads)) * sizeof(float);
}

void masked_forward_block_sparse(const MaskedParams& p, void* scratch, int threads) {
  if (p.dtype != DType::f32 && p.dtype != DType::bf16)
    throw std::invalid_argument("masked_forward_block_sparse: q, k, v must be f32 or bf16");
  if (p.q_pos && (p.D % 2 != 0 || !p.k_pos))
    throw std::invalid_argument("masked_forward_block_sparse: RoPE needs an even D and both position arrays");
  if (p.tile_q > masked_detail::kMaxTileQ)
    throw std::invalid_argument("masked_forward_block_sparse: tile_q above 1024");
  if (p.n_qt != (p.Nq + p.tile_q - 1) / p.tile_q || p.n_kt != (p.Nkv + p.tile_k - 1) / p.tile_k)
    throw std::invalid_argument("masked_forward_block_sparse: block map tiles do not match Nq, Nkv");
  HWY_DYNAMIC_DISPATCH(MaskedForward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

}  // namespace attnbench::cpu
#endif
