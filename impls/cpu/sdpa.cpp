// Scaled-dot-product attention, fused CPU forward and backward (DESIGN §5 "SDPA").
//
//   q: (B, H, Nq, D)   k: (B, Hkv, Nkv, D)   v: (B, Hkv, Nkv, Dv)   kv_len: (B,)
//   head h reads kv head h/(H/Hkv);  Dv = D unless p.Dv says otherwise
//   o_i = Σ_j softmax_j(RoPE(q_i)·RoPE(k_j)/√D + mask_ij) v_j            o: (B, H, Nq, Dv) f32
//   mask_ij = 0 if j < lim_i else −inf,  lim_i = min(kv_len[b], causal ? i + Nkv − Nq + 1 : Nkv)
//   weights (need_weights): the probabilities, (B, H, Nq, Nkv) f32
//
// Every row's allowed keys are a prefix [0, lim_i) (causal aligned bottom-right
// and key padding both cut the row), so a (query tile, key tile) pair is either
// full, partial (mask the row tails) or empty (skipped; all later tiles too).
//
// Algorithm (FlashAttention's, on CPU): pack K once per kv head, transposed to
// (D, 256-key tiles) with RoPE applied, and V to (Nkv, D padded to 16) in f32
// (f32 V with D a multiple of 16 is read in place); then OpenMP over (b, kv
// head, tile of 48 rows of its H/Hkv query heads, ordered (query, head) so the
// GQA heads share every K/V tile): load the query rows (RoPE, times log2(e)/√D
// so the softmax works in base 2), and for each key tile
//   S = Q·Kᵀ (6×64 register blocks) → mask → online softmax (running max m,
//   sum l, P = 2^(S−m), O *= 2^(m_old−m_new)) → O += P·V (6×64 register blocks).
// Finally O /= l (0 for a row without keys). need_weights recomputes S in a
// second pass and writes 2^(S−m)/l. bf16 inputs are widened to f32 while
// packing (q, k, v are read once), so the inner loops are the f32 ones.
// Never materializes (Nq, Nkv) beyond one 48×256 tile per thread. With p.lse
// set each row's log-sum-exp is written too ((m + log2 l)·ln 2, in double).
// The packing and the tile loop are the shared ones of attention-inl.h
// (PackKeyTile, ForwardRows, FinishRows: masked attention runs the same code).
//
// Strategies, f32 B=1 H=8 N=4096 D=64 non-causal, 2 Zen 4 cores, quiet machine.
// GFLOP/s = 4·B·H·N²·D / wall time; "% FMA" is of this machine's measured zmm
// FMA throughput (`attnbench roofline`: 234 GFLOP/s for both cores; one 512-bit
// FMA per cycle per core; DESIGN's "≈ 400" assumes two):
//
// | strategy                                                      | GFLOP/s | % FMA |
// |---------------------------------------------------------------|---------|-------|
// | Eigen reference in f32 (materialized S per head, scalar exp)  |     9.6 |     4 |
// | fused: 48×128 tiles, 6×64 register blocks, degree-7 exp2      |     189 |    81 |
// | 48×256 tiles (fewer per-tile row reductions; 24/96 × 128–512  |         |       |
// |   all within ±2 %, cpu-time measured under load)              |     197 |    84 |
// | K packed in 16-key blocks, f32 V read in place (decode, pack) |     197 |    84 |
// | row max folded into the QK kernel, degree-6 exp2, no select   |     200 |    85 |
//
// Causal (N(N+1)/2 pairs): 185–194 GFLOP/s. bf16 (widened while packing): same
// as f32 within noise. What is left is the softmax: ~18 vector ops per 16 scores
// against 128 FMAs at D = 64. The last row block of a tile uses 1..5-row
// register blocks instead of zero-padded rows (decode Nq = 1, H 32, Hkv 8,
// Nkv 8192, D 128: 1.7× less CPU time), and a task holds the rows of all H/Hkv
// query heads of its kv head (that decode: 10.6 → 7.9 ms). Not done: decode is
// now bound by packing K (transposed, 8 MB); reading K in place with dot
// products along D for small Nq·H/Hkv would remove that.
//
// Backward (FlashAttention-2's algorithm):
//   Δ_i = Σ_d dO_id O_id;  P = 2^(S − lse₂) recomputed per tile from q, k and the
//   saved lse;  dP = dO·Vᵀ;  dS = P ∘ (dP − Δ);  dV = Pᵀ·dO;  dK = dSᵀ·Q/√D;  dQ = dS·K/√D
// then RoPE's transpose on dQ and dK. Per kv head:
//   * the query side, packed once — rotated q × log2(e)/√D (bitwise the
//     forward's, so the scores are too), dO widened, both also transposed
//     (D, rows), lse₂ as a hi + lo pair of floats, Δ, the row's key limit;
//   * for each of its 128-key tiles, K rotated (rows and transposed) and Vᵀ
//     packed, dKᵀ and dVᵀ accumulated over the query rows that see the tile (a
//     suffix: limits are non-decreasing) in 64-row pairs:
//       S = Qs·Kᵀ, dP = dO·Vᵀ (score kernel) → mask → P, dS (vector pass) →
//       dVᵀ += dOᵀ·P, dKᵀ += Qsᵀ·dS (accumulate kernel, D rows) →
//       dQ += dS·K (accumulate kernel, into the task's dq accumulator);
//     then dK, dV of the tile stored (scaled, rotated back);
//   * dq = Σ accumulators / √D, rotated back.
// No atomics: a task owns its key tiles' dK, dV and its dq accumulator. With
// B·Hkv ≥ 2·threads a task is a whole kv head and its query side and dq live
// in the thread's slab (packed right before use, L2-resident); otherwise a kv
// head's key tiles are split over 1–8 tasks (interleaved) and three passes run:
// every side packed, the (kv head, split) tasks, the splits summed.
// Accumulate kernels sum each call from zero and add to memory, so a long
// accumulation (dK over N query rows) is a sum of 64-term partial sums: the
// f32 error fell 2–4× below the f32 reference's (N 1000: ratio 2.4 → 0.7).
//
// Backward strategies, f32 B=1 H=8 N=4096 D=64 non-causal, 2 Sapphire-Rapids-
// class cores, quiet machine (`attnbench roofline` 408 GFLOP/s; FLOPs 2.5 × fwd):
// | three shared passes (every kv head's query side written to memory first) | 273–283 GFLOP/s |
// | a task's query side packed in its thread's slab                           | 289–292 (70 %)  |
// | pairs 64×128 vs 64×64, 32×128, 48×128, 128×64, 64×256                     | all within ±3 % |
// Profile: the five products ~16.5 % each, the P/dS pass ~6 %; the
// micro-kernels run at ~63 % of peak inside the backward (L2 working set)
// against 75–80 % L1-resident in isolation. fwd_bwd 263 GFLOP/s, causal bwd 256,
// D 128 bwd 286 (docs/sdpa.md).

#include "impls/cpu/sdpa.hpp"

#include <omp.h>

#include "impls/cpu/cpu_features.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/sdpa.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "impls/cpu/attention-inl.h"

// Target-independent shapes and scalar helpers (compiled once).
#ifndef ATTNBENCH_IMPLS_CPU_SDPA_SHARED_
#define ATTNBENCH_IMPLS_CPU_SDPA_SHARED_
namespace attnbench::cpu::sdpa_detail {
using namespace attn;

inline constexpr int64_t kTileQ = 48;   // forward: query rows per task (multiple of every kBlockRows)
inline constexpr int64_t kTileK = 256;  // forward: keys per tile (multiple of every key block)
inline constexpr int64_t kBwdTileQ = 64;   // backward: query rows per pair
inline constexpr int64_t kBwdTileK = 128;  // backward: keys per tile (a task's dK, dV accumulators)
inline constexpr int64_t kBwdChunk = 64;   // backward: query rows per packing task (a multiple of 16)

/// Positions of the RoPE table rows: queries sit at i + Nkv − Nq, keys at j.
struct RopeSpan {
  int64_t pos_min, n_pos, half, floats;
  explicit RopeSpan(const SdpaParams& p) {
    pos_min = std::min<int64_t>(0, p.Nkv - p.Nq);
    n_pos = p.Nkv - pos_min;
    half = p.D / 2;
    floats = p.rope == SdpaRope::none ? 0 : round_up(2 * n_pos * half, 16);
  }
};

/// Sizes of the forward's packed operands and per-thread tiles, in floats.
struct Layout {
  int64_t Dv, Dp, T, Nkv_p;  // Dp: Dv padded to 16 (V rows, the output accumulator)
  int64_t kpack, vpack, rope, per_thread;
  bool direct_v;  // f32 V with Dv a multiple of 16 is read in place, not packed
  // Native bf16 products (bf16 inputs without RoPE or weights): K in pairs along
  // D (dk = D rounded up to 32), V in pairs along keys, per thread the raw query
  // tile and AMX's P parts; sizes in floats.
  bool bf16_ok;
  int64_t dk, kbpack, vbpack;
  explicit Layout(const SdpaParams& p) {
    Dv = sdpa_value_dim(p);
    Dp = round_up(Dv, 16);
    direct_v = p.dtype == DType::f32 && Dp == Dv;
    T = (p.Nkv + kTileK - 1) / kTileK;
    Nkv_p = T * kTileK;
    kpack = p.B * p.Hkv * T * p.D * kTileK;
    vpack = direct_v ? 0 : p.B * p.Hkv * Nkv_p * Dp;
    rope = RopeSpan(p).floats;
    // Not when the forward saves the lse for a backward: that recomputes S with the f32
    // products, and P = 2^(S − lse) needs the forward's S bit for bit (attention-inl.h).
    // The bf16 tile kernels take one head dimension for Q·Kᵀ and P·V.
    bf16_ok = p.dtype == DType::bf16 && p.rope == SdpaRope::none && !p.weights && !p.lse && Dv == p.D;
    dk = round_up(p.D, 32);
    kbpack = bf16_ok ? round_up(p.B * p.Hkv * T * dk * kTileK / 2, 16) : 0;
    vbpack = bf16_ok ? round_up(p.B * p.Hkv * Nkv_p * Dp / 2, 16) : 0;
    per_thread = forward_thread_floats(kTileQ, p.D, kTileK, Dp, bf16_ok);
  }
  /// The mode a call takes now (the machine, the path limit, the Highway target).
  Bf16Mode mode(bool avx3) const { return bf16_mode(bf16_ok, avx3); }
};

/// Sizes of the backward's packed query side, accumulators and per-thread tiles, in floats.
struct BackwardLayout {
  int64_t G, R, ld, D, Dv, Dp, n_kt, groups, splits;  // Dp: D padded to 16 (krows, the dq accumulators)
  int64_t side, dq, rope, per_thread;  // side: one group's query side; dq: one group-split accumulator
  bool owned;  // one task per group: its query side and dq accumulator live in the thread's slab
  BackwardLayout(const SdpaParams& p, int threads) {
    G = p.H / p.Hkv;
    R = p.Nq * G;
    ld = round_up(R, 16);
    D = p.D, Dv = sdpa_value_dim(p);
    Dp = round_up(p.D, 16);
    n_kt = (p.Nkv + kBwdTileK - 1) / kBwdTileK;
    groups = p.B * p.Hkv;
    // Key tiles of a group are split among tasks (each with its own dq accumulator)
    // only when there are too few groups to keep every thread busy.
    splits = std::clamp<int64_t>((4 * int64_t(threads) + groups - 1) / groups, 1, std::min<int64_t>(n_kt, 8));
    if (groups >= 2 * int64_t(threads)) splits = 1;
    owned = splits == 1;
    // qs, dout, qst, dot, lse2 (hi, lo), delta, lim
    side = round_up(R * p.D, 16) + round_up(R * Dv, 16) + (p.D + Dv) * ld + 4 * ld;
    dq = ld * Dp;
    rope = RopeSpan(p).floats;
    per_thread = key_tile_floats() + 2 * kBwdTileQ * kBwdTileK + pack_rows_floats(p.D, Dv);
    if (owned) per_thread += side + dq;
  }
  /// Floats of one thread's KeyTileGrads: kt, dkt (D rows), vt, dvt (Dv rows), krows.
  int64_t key_tile_floats() const { return 2 * (D + Dv) * kBwdTileK + kBwdTileK * Dp; }
  /// Floats shared by all threads: the query sides and accumulators (split groups), the RoPE table.
  size_t shared() const { return size_t((owned ? 0 : groups * (side + splits * dq)) + rope); }
};

/// Keys visible to query row i of batch b: [0, lim).
inline int64_t row_limit(const SdpaParams& p, int64_t b, int64_t i) {
  int64_t lim = p.kv_len ? std::clamp<int64_t>(p.kv_len[b], 0, p.Nkv) : p.Nkv;
  if (p.causal) lim = std::min(lim, std::max<int64_t>(0, i + p.Nkv - p.Nq + 1));
  return lim;
}

inline RopePairs pairs_of(SdpaRope r) { return RopePairs(uint8_t(r)); }

}  // namespace attnbench::cpu::sdpa_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace sdpa_detail;

// The native bf16 products need AVX-512 register tiles (64-column score blocks).
inline constexpr bool kAvx3 = HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3;

/// RoPE of the queries (at i + Nkv − Nq) and of the keys (at j) over the tables.
struct SdpaRopes {
  Rope q, k;
  SdpaRopes(const SdpaParams& p, const float* cos_t, const float* sin_t) {
    const RopeSpan span(p);
    q.pairs = k.pairs = pairs_of(p.rope);
    q.cos_t = k.cos_t = cos_t, q.sin_t = k.sin_t = sin_t;
    q.half = k.half = span.half, q.pos_min = k.pos_min = span.pos_min;
    q.offset = p.Nkv - p.Nq;
  }
};

/// −inf in the scores of rows whose key limit falls inside this tile; returns
/// whether any row was cut. s: (rows, s_ld), keys j0 … j0 + ncols − 1.
HWY_INLINE bool MaskRowLimits(float* s, int64_t s_ld, int64_t rows, const int64_t* lim, int64_t j0, int64_t ncols,
                              bool* cut) {
  bool any = false;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = std::clamp<int64_t>(lim[r] - j0, 0, ncols);
    if (start < ncols) {
      std::fill(s + r * s_ld + start, s + r * s_ld + ncols, kNegInf);
      any = true;
      if (cut) cut[r] = true;
    }
  }
  return any;
}

/// Packs key tile t of kv head (b, hk): K rotated and transposed to (D, kTileK),
/// V widened to (kTileK, Dp) unless read in place.
template <class T>
void PackKV(const SdpaParams& p, const Layout& lay, const SdpaRopes& ropes, float* kpack, float* vpack, float* rows,
            int64_t task, Bf16Mode mode, uint16_t* kbpack, uint16_t* vbpack) {
  const int64_t t = task % lay.T, bk = task / lay.T, b = bk / p.Hkv, hk = bk % p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  const int64_t j0 = t * kTileK;
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (mode != Bf16Mode::off) {
      // The bf16 bits as they are: K in pairs along D, (AMX) V in pairs along keys; pads zero.
      const int64_t span = std::min(kTileK, p.Nkv - j0);
      uint16_t* kb = kbpack + (bk * lay.T + t) * lay.dk * kTileK;
      std::fill_n(kb, lay.dk * kTileK, uint16_t(0));
      for (int64_t jt = 0; jt < span; ++jt) {
        const bf16_t* kr = k + (j0 + jt) * p.k_strides.n;
        for (int64_t d = 0; d < p.D; ++d) kb[((d / 2) * kTileK + jt) * 2 + (d & 1)] = kr[d].bits;
      }
      if (mode == Bf16Mode::amx) {
        uint16_t* vb = vbpack + (bk * lay.Nkv_p + j0) * lay.Dp;
        std::fill_n(vb, kTileK * lay.Dp, uint16_t(0));
        for (int64_t jt = 0; jt < span; ++jt) {
          const bf16_t* vr = v + (j0 + jt) * p.v_strides.n;
          for (int64_t d = 0; d < p.D; ++d) vb[((jt / 2) * lay.Dp + d) * 2 + (jt & 1)] = vr[d].bits;
        }
        return;
      }
    }
  }
  KeyPack out;
  if (mode == Bf16Mode::off) out.kt = kpack + (bk * lay.T + t) * p.D * kTileK;
  out.ld = kTileK;
  if (!lay.direct_v) out.vrows = vpack + (bk * lay.Nkv_p + j0) * lay.Dp, out.v_ld = lay.Dp;
  PackKeyTile<T>(
      p.D, lay.Dv, std::min(kTileK, p.Nkv - j0), kTileK, [&](int64_t jt) { return k + (j0 + jt) * p.k_strides.n; },
      [&](int64_t jt) { return v + (j0 + jt) * p.v_strides.n; }, ropes.k, j0, out, rows);
}

/// Writes the weights rows of the tile (row r to w_rows[r]): 2^(S − m)/l, 0 where masked.
HWY_INLINE void WeightsPass(DF df, const SdpaParams& p, const Layout& lay, const ForwardTile& w, const float* kt_head,
                            float* const* w_rows, int64_t rows, const int64_t* lim, int64_t hi) {
  const int64_t L = int64_t(hn::Lanes(df));
  for (int64_t t = 0; t < lay.T; ++t) {
    const int64_t j0 = t * kTileK, width = std::min(kTileK, p.Nkv - j0);
    if (j0 >= hi) {
      for (int64_t r = 0; r < rows; ++r) std::fill_n(w_rows[r] + j0, width, 0.0f);
      continue;
    }
    const KeyTileView view{j0, std::min(kTileK, hi - j0), kt_head + t * p.D * kTileK, kTileK, nullptr, 0};
    const int64_t ncols = ForwardScores(df, w, rows, p.D, view);
    MaskRowLimits(w.s, w.s_ld, rows, lim, j0, ncols, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s + r * w.s_ld;
      float* out = w_rows[r] + j0;
      if (w.l[r] == 0.0f) {
        std::fill_n(out, width, 0.0f);
        continue;
      }
      const auto vm = hn::Set(df, w.m[r]);
      const auto inv = hn::Set(df, 1.0f / w.l[r]);
      for (int64_t j = 0; j < ncols; j += L)
        hn::Store(hn::Mul(Exp2NonPositive(df, hn::Sub(hn::Load(df, s + j), vm)), inv), df, s + j);
      const int64_t n = std::min(width, ncols);
      std::memcpy(out, s, size_t(n) * sizeof(float));
      std::fill_n(out + n, width - n, 0.0f);
    }
  }
}

/// The forward's score scale log2(e)/√D (base-2 softmax).
template <class T>
float ForwardQScale(int64_t D) {
#if defined(ATTNBENCH_MUTANT_sdpa_scale_bf16)  // scripts/mutation-test.sh: scale off by 1e-3, bf16 only
  return float(1.4426950408889634 / std::sqrt(double(D)) * (std::is_same_v<T, bf16_t> ? 1.001 : 1.0));
#else
  return float(1.4426950408889634 / std::sqrt(double(D)));
#endif
}

/// Number of query tiles of one kv head: its H/Hkv query heads are attended
/// together, rows ordered (query i, head) so that a tile's row limits are close.
inline int64_t query_tiles(const SdpaParams& p) { return (p.Nq * (p.H / p.Hkv) + kTileQ - 1) / kTileQ; }

/// One task: query tile qt of kv head (b, hk), i.e. flat rows f ∈ [qt·kTileQ, …)
/// with f = i·G + g for query i of head hk·G + g (G = H/Hkv). Grouping the
/// query heads that share K and V reads each key tile once per tile of rows.
template <class T>
void AttendQueryTile(const SdpaParams& p, const Layout& lay, const SdpaRopes& ropes, const float* kpack,
                     const float* vpack, const ForwardTile& w, int64_t task, const uint16_t* kbpack,
                     const uint16_t* vbpack) {
  const DF df;
  const int64_t G = p.H / p.Hkv, n_qt = query_tiles(p);
  const int64_t qt = task % n_qt, bk = task / n_qt, b = bk / p.Hkv, hk = bk % p.Hkv;
  const int64_t f0 = qt * kTileQ, rows = std::min(kTileQ, p.Nq * G - f0);
  const float qscale = ForwardQScale<T>(p.D);

  // Query tile: rotate, scale into log2 units; output (and weights, lse) row pointers.
  int64_t lim[kTileQ];
  float* o_rows[kTileQ];
  float* w_rows[kTileQ];
  float* lse_rows[kTileQ];
  int64_t hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (f0 + r) / G, h = hk * G + (f0 + r) % G;
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h + i * p.q_strides.n;
    o_rows[r] = p.o + b * p.o_strides.b + h * p.o_strides.h + i * p.o_strides.n;
    w_rows[r] = p.weights ? p.weights + b * p.w_strides.b + h * p.w_strides.h + i * p.w_strides.n : nullptr;
    lse_rows[r] = p.lse ? p.lse + (b * p.H + h) * p.Nq + i : nullptr;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (w.mode != Bf16Mode::off) {
        uint16_t* qr = w.qb + r * w.dk;
        for (int64_t d = 0; d < p.D; ++d) qr[d] = q[d].bits;
        std::fill(qr + p.D, qr + w.dk, uint16_t(0));
      }
    }
    if (w.mode == Bf16Mode::off) load_row(w.q + r * p.D, q, p.D, ropes.q, i, qscale);
    lim[r] = row_limit(p, b, i);
#if defined(ATTNBENCH_MUTANT_sdpa_drop_key)  // scripts/mutation-test.sh: the last visible key is dropped
    lim[r] = std::max<int64_t>(0, lim[r] - 1);
#endif
    hi = std::max(hi, lim[r]);
  }
  if (w.mode != Bf16Mode::off) std::fill(w.qb + rows * w.dk, w.qb + round_up(rows, 16) * w.dk, uint16_t(0));

  const float* kt_head = kpack + bk * lay.T * p.D * kTileK;
  // V rows: packed (Nkv_p, Dp), or the f32 input itself (rows ≥ lim are never read).
  const float* v_head = vpack + bk * lay.Nkv_p * lay.Dp;
  int64_t v_stride = lay.Dp;
  if (lay.direct_v) {
    v_head = static_cast<const float*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
    v_stride = p.v_strides.n;
  }
  ForwardRows(
      df, w, rows, p.D,
      [&](auto&& f) {
        for (int64_t j0 = 0; j0 < hi; j0 += kTileK)
          f(KeyTileView{j0, std::min(kTileK, hi - j0), kt_head + (j0 / kTileK) * p.D * kTileK, kTileK,
                        v_head + j0 * v_stride, v_stride,
                        kbpack ? kbpack + (bk * lay.T + j0 / kTileK) * lay.dk * kTileK : nullptr,
                        vbpack ? vbpack + (bk * lay.Nkv_p + j0) * lay.Dp : nullptr});
      },
      [&](const KeyTileView& t, int64_t ncols) { MaskRowLimits(w.s, w.s_ld, rows, lim, t.j0, ncols, w.stale); });
  FinishRows(
      w, rows, lay.Dv, [&](int64_t r) { return o_rows[r]; }, [&](int64_t r) { return lse_rows[r]; });
  if (p.weights) WeightsPass(df, p, lay, w, kt_head, w_rows, rows, lim, hi);
}

template <class T>
void ForwardTyped(const SdpaParams& p, float* scratch, int threads) {
  const Layout lay(p);
  const RopeSpan rs(p);
  float* kpack = scratch;
  float* vpack = kpack + lay.kpack;
  float* cos_t = lay.rope ? vpack + lay.vpack : nullptr;
  float* sin_t = lay.rope ? cos_t + rs.n_pos * rs.half : nullptr;
  uint16_t* kbpack = reinterpret_cast<uint16_t*>(vpack + lay.vpack + lay.rope);
  uint16_t* vbpack = reinterpret_cast<uint16_t*>(vpack + lay.vpack + lay.rope + lay.kbpack);
  float* slabs = vpack + lay.vpack + lay.rope + lay.kbpack + lay.vbpack;
  const Bf16Mode mode = lay.mode(kAvx3);

  if (lay.rope) RopeTables(rs.pos_min, rs.n_pos, p.D, cos_t, sin_t, threads);
  const SdpaRopes ropes(p, cos_t, sin_t);
  const float qscale = ForwardQScale<T>(p.D);

  const int64_t n_qt = query_tiles(p);
#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + lay.per_thread * omp_get_thread_num();
    ForwardTile w = ForwardTile::carve(slab, kTileQ, p.D, kTileK, lay.Dp);
    float* rows = slab + round_up(forward_tile_floats(kTileQ, p.D, kTileK, lay.Dp), 16);
    if (mode != Bf16Mode::off) {
      float* b16 = rows + pack_rows_floats(p.D, lay.Dv);
      w.mode = mode, w.dk = lay.dk, w.qscale = qscale;
      w.qb = reinterpret_cast<uint16_t*>(b16);
      w.pb = reinterpret_cast<uint16_t*>(b16 + round_up(kTileQ * lay.dk / 2, 16));
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.B * p.Hkv * lay.T; ++task)
      PackKV<T>(p, lay, ropes, kpack, vpack, rows, task, mode, kbpack, vbpack);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * p.Hkv * n_qt; ++task)
      AttendQueryTile<T>(p, lay, ropes, kpack, vpack, w, task, mode != Bf16Mode::off ? kbpack : nullptr,
                         mode == Bf16Mode::amx ? vbpack : nullptr);
  }
}

/// The kernel path the forward takes for p now.
const char* ForwardPath(const SdpaParams& p) { return bf16_mode_path(Layout(p).mode(kAvx3)); }

void SdpaForward(const SdpaParams& p, float* scratch, int threads) {
  if (p.dtype == DType::bf16)
    ForwardTyped<bf16_t>(p, scratch, threads);
  else if (p.dtype == DType::f16)
    ForwardTyped<f16_t>(p, scratch, threads);
  else
    ForwardTyped<float>(p, scratch, threads);
}

// ---- Backward ---------------------------------------------------------------------

/// The query side of a group (kv head (b, hk)) carved from `at` (bl.side floats), and its key limits.
struct GroupSide {
  QuerySide qs;
  int32_t* lim;  // (ld,) keys visible to each flattened row, non-decreasing
};

HWY_INLINE GroupSide CarveSide(const SdpaParams& p, const BackwardLayout& bl, float* at) {
  GroupSide gs;
  gs.qs.qs = at;
  gs.qs.dout = at + round_up(bl.R * p.D, 16);
  gs.qs.qst = gs.qs.dout + round_up(bl.R * bl.Dv, 16);
  gs.qs.dot = gs.qs.qst + p.D * bl.ld;
  gs.qs.lse2 = gs.qs.dot + bl.Dv * bl.ld;
  gs.qs.lse2lo = gs.qs.lse2 + bl.ld;
  gs.qs.delta = gs.qs.lse2lo + bl.ld;
  gs.lim = reinterpret_cast<int32_t*>(gs.qs.delta + bl.ld);
  gs.qs.ld = bl.ld;
  return gs;
}

/// Packs flattened rows r0 … r1 − 1 of group g's query side and zeroes their
/// dq accumulators (the group's `splits`, bl.dq apart from dq_g).
template <class T>
void PackQueryRows(const SdpaBackwardParams& bp, const BackwardLayout& bl, const SdpaRopes& ropes, int64_t g,
                   int64_t r0, int64_t r1, const GroupSide& gs, float* dq_g) {
  const SdpaParams& p = bp.fwd;
  const int64_t b = g / p.Hkv, hk = g % p.Hkv;
  const float qscale = float(1.4426950408889634 / std::sqrt(double(p.D)));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / bl.G, h = hk * bl.G + r % bl.G;
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.b + h * p.q_strides.h + i * p.q_strides.n;
    const T* dout = static_cast<const T*>(bp.dout) + b * bp.do_strides.b + h * bp.do_strides.h + i * bp.do_strides.n;
    const float* o = p.o + b * p.o_strides.b + h * p.o_strides.h + i * p.o_strides.n;
    PackQueryRow(gs.qs, r, p.D, bl.Dv, q, dout, o, p.lse[(b * p.H + h) * p.Nq + i], ropes.q, i, qscale);
    gs.lim[r] = int32_t(row_limit(p, b, i));
    for (int64_t s = 0; s < bl.splits; ++s) std::fill_n(dq_g + s * bl.dq + r * bl.Dp, bl.Dp, 0.0f);
  }
  TransposeQueryRows(gs.qs, p.D, bl.Dv, r0, r1, bl.R);
}

/// Key tiles kt ≡ split (mod splits) of group g, into the split's accumulator dq.
/// For each, the query rows that see any of its keys (a suffix: row limits are
/// non-decreasing) in pairs of kBwdTileQ rows; then the tile's dK and dV.
template <class T>
void BackwardKeyTiles(const SdpaBackwardParams& bp, const BackwardLayout& bl, const SdpaRopes& ropes, int64_t g,
                      int64_t split, const GroupSide& gs, float* dq, const KeyTileGrads& kg, const PairTiles& w,
                      float* rows_buf) {
  const DF df;
  const SdpaParams& p = bp.fwd;
  const int64_t b = g / p.Hkv, hk = g % p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.b + hk * p.k_strides.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.b + hk * p.v_strides.h;
  float* dk = bp.dk + b * bp.dk_strides.b + hk * bp.dk_strides.h;
  float* dv = bp.dv + b * bp.dv_strides.b + hk * bp.dv_strides.h;
  auto dk_row = [&](int64_t j) { return dk + j * bp.dk_strides.n; };
  auto dv_row = [&](int64_t j) { return dv + j * bp.dv_strides.n; };
  for (int64_t kt = split; kt < bl.n_kt; kt += bl.splits) {
    const int64_t j0 = kt * kBwdTileK, span = std::min(kBwdTileK, p.Nkv - j0);
    const int64_t r_first = std::partition_point(gs.lim, gs.lim + bl.R, [&](int32_t l) { return l <= j0; }) - gs.lim;
    if (r_first == bl.R) {  // no query sees these keys
      for (int64_t jt = 0; jt < span; ++jt)
        std::fill_n(dk_row(j0 + jt), p.D, 0.0f), std::fill_n(dv_row(j0 + jt), bl.Dv, 0.0f);
      continue;
    }
    PackKeyTile<T>(
        p.D, bl.Dv, span, kBwdTileK, [&](int64_t jt) { return k + (j0 + jt) * p.k_strides.n; },
        [&](int64_t jt) { return v + (j0 + jt) * p.v_strides.n; }, ropes.k, j0, kg.pack(), rows_buf);
    std::fill_n(kg.dkt, p.D * kg.ld, 0.0f);
    std::fill_n(kg.dvt, bl.Dv * kg.ld, 0.0f);
    for (int64_t r0 = r_first; r0 < bl.R; r0 += kBwdTileQ) {
      const int64_t rows = std::min(kBwdTileQ, bl.R - r0);
      const int32_t* lim = gs.lim + r0;
      BackwardPair(df, p.D, bl.Dv, gs.qs, dq, r0, rows, span, kg, w, [&](float* s, int64_t ncols, float*) {
        if (lim[0] >= j0 + span) return;  // every row sees the whole tile
        for (int64_t r = 0; r < rows && lim[r] < j0 + span; ++r) {
          const int64_t start = std::clamp<int64_t>(lim[r] - j0, 0, ncols);
          std::fill(s + r * w.ld + start, s + r * w.ld + ncols, kNegInf);
        }
      });
    }
    StoreKeyGrads(
        kg, p.D, bl.Dv, span, ropes.k, j0, [&](int64_t jt) { return dk_row(j0 + jt); },
        [&](int64_t jt) { return dv_row(j0 + jt); });
  }
}

/// dq of flattened rows r0 … r1 − 1 of group g: its split accumulators summed, scaled, rotated back.
void StoreQueryRows(const SdpaBackwardParams& bp, const BackwardLayout& bl, const SdpaRopes& ropes, int64_t g,
                    int64_t r0, int64_t r1, const float* dq_g) {
  const SdpaParams& p = bp.fwd;
  const int64_t b = g / p.Hkv, hk = g % p.Hkv;
  const float scale = float(1.0 / std::sqrt(double(p.D)));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / bl.G, h = hk * bl.G + r % bl.G;
    float* out = bp.dq + b * bp.dq_strides.b + h * bp.dq_strides.h + i * bp.dq_strides.n;
    StoreQueryGrad(out, dq_g + r * bl.Dp, bl.splits, bl.dq, p.D, scale, ropes.q, i);
  }
}

/// One task per group (bl.owned): pack its query side into the thread's slab in
/// 64-row chunks (transposes stay in L1), all its key tiles, then its dq — the
/// query side stays in cache instead of a shared pass writing it to memory.
/// Otherwise three passes: pack every group's side, (group, split) tasks, sum the splits.
template <class T>
void BackwardTyped(const SdpaBackwardParams& bp, float* scratch, int threads) {
  const SdpaParams& p = bp.fwd;
  const BackwardLayout bl(p, threads);
  const RopeSpan rs(p);
  float* sides = scratch;  // split groups only
  float* dq_acc = sides + (bl.owned ? 0 : bl.groups * bl.side);
  float* cos_t = dq_acc + (bl.owned ? 0 : bl.groups * bl.splits * bl.dq);
  float* sin_t = cos_t + rs.n_pos * rs.half;
  float* slabs = cos_t + bl.rope;
  if (bl.rope) RopeTables(rs.pos_min, rs.n_pos, p.D, cos_t, sin_t, threads);
  const SdpaRopes ropes(p, bl.rope ? cos_t : nullptr, bl.rope ? sin_t : nullptr);

  const int64_t per_group = (bl.R + kBwdChunk - 1) / kBwdChunk;
#pragma omp parallel num_threads(threads)
  {
    float* slab = slabs + bl.per_thread * omp_get_thread_num();
    const int64_t kt = p.D * kBwdTileK, vt = bl.Dv * kBwdTileK;
    KeyTileGrads kg;
    kg.kt = slab, kg.vt = kg.kt + kt, kg.krows = kg.vt + vt, kg.dkt = kg.krows + kBwdTileK * bl.Dp;
    kg.dvt = kg.dkt + kt, kg.ld = kBwdTileK, kg.Dp = bl.Dp;
    float* tiles = slab + bl.key_tile_floats();
    const PairTiles w{tiles, tiles + kBwdTileQ * kBwdTileK, nullptr, kBwdTileK};
    float* rows_buf = tiles + 2 * kBwdTileQ * kBwdTileK;
    float* own = rows_buf + pack_rows_floats(p.D, bl.Dv);  // owned: the group's side, then its dq accumulator
    if (bl.owned) {
      const GroupSide gs = CarveSide(p, bl, own);
      float* dq = own + bl.side;
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < bl.groups; ++g) {
        for (int64_t r0 = 0; r0 < bl.R; r0 += kBwdChunk)
          PackQueryRows<T>(bp, bl, ropes, g, r0, std::min(bl.R, r0 + kBwdChunk), gs, dq);
        BackwardKeyTiles<T>(bp, bl, ropes, g, 0, gs, dq, kg, w, rows_buf);
        StoreQueryRows(bp, bl, ropes, g, 0, bl.R, dq);
      }
    } else {
      auto chunk = [&](int64_t task, int64_t& g, int64_t& r0, int64_t& r1) {
        g = task / per_group, r0 = (task % per_group) * kBwdChunk, r1 = std::min(bl.R, r0 + kBwdChunk);
      };
#pragma omp for schedule(static)
      for (int64_t task = 0; task < bl.groups * per_group; ++task) {
        int64_t g, r0, r1;
        chunk(task, g, r0, r1);
        PackQueryRows<T>(bp, bl, ropes, g, r0, r1, CarveSide(p, bl, sides + g * bl.side),
                         dq_acc + g * bl.splits * bl.dq);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < bl.groups * bl.splits; ++task) {
        const int64_t g = task / bl.splits, split = task % bl.splits;
        BackwardKeyTiles<T>(bp, bl, ropes, g, split, CarveSide(p, bl, sides + g * bl.side), dq_acc + task * bl.dq, kg,
                            w, rows_buf);
      }
#pragma omp for schedule(static)
      for (int64_t task = 0; task < bl.groups * per_group; ++task) {
        int64_t g, r0, r1;
        chunk(task, g, r0, r1);
        StoreQueryRows(bp, bl, ropes, g, r0, r1, dq_acc + g * bl.splits * bl.dq);
      }
    }
  }
}

void SdpaBackward(const SdpaBackwardParams& p, float* scratch, int threads) {
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

HWY_EXPORT(SdpaForward);
HWY_EXPORT(SdpaBackward);
HWY_EXPORT(ForwardPath);

namespace {
void check_common(const SdpaParams& p, const char* who) {
  if (p.dtype != DType::f32 && p.dtype != DType::bf16 && p.dtype != DType::f16)
    throw std::invalid_argument(std::string(who) + ": q, k, v must be f32, bf16 or f16");
  if (p.rope != SdpaRope::none && p.D % 2 != 0) throw std::invalid_argument(std::string(who) + ": RoPE needs an even D");
  if (p.Hkv < 1 || p.H % p.Hkv != 0) throw std::invalid_argument(std::string(who) + ": H must be a multiple of Hkv");
  if (p.Dv < 0) throw std::invalid_argument(std::string(who) + ": Dv must be >= 0 (0: the same as D)");
}
}  // namespace

size_t sdpa_forward_fused_scratch_bytes(const SdpaParams& p, int threads) {
  const sdpa_detail::Layout lay(p);
  return size_t(lay.kpack + lay.vpack + lay.rope + lay.kbpack + lay.vbpack + lay.per_thread * std::max(1, threads)) *
         sizeof(float);
}

std::string sdpa_forward_path(const SdpaParams& p) {
  const char* bf16 = HWY_DYNAMIC_DISPATCH(ForwardPath)(p);
  return *bf16 ? std::string(bf16) : f32_kernel_path();
}

void sdpa_forward_fused(const SdpaParams& p, void* scratch, int threads) {
  check_common(p, "sdpa_forward_fused");
  HWY_DYNAMIC_DISPATCH(SdpaForward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

size_t sdpa_backward_fused_scratch_bytes(const SdpaBackwardParams& p, int threads) {
  threads = std::max(1, threads);
  const sdpa_detail::BackwardLayout bl(p.fwd, threads);
  return (bl.shared() + size_t(bl.per_thread) * size_t(threads)) * sizeof(float);
}

void sdpa_backward_fused(const SdpaBackwardParams& p, void* scratch, int threads) {
  check_common(p.fwd, "sdpa_backward_fused");
  if (!p.fwd.o || !p.fwd.lse || !p.dout || !p.dq || !p.dk || !p.dv)
    throw std::invalid_argument("sdpa_backward_fused: o, lse, dout, dq, dk and dv must all be set");
  HWY_DYNAMIC_DISPATCH(SdpaBackward)(p, static_cast<float*>(scratch), std::max(1, threads));
}

}  // namespace attnbench::cpu
#endif
