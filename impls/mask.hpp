// The mask / score-mod engine of the masked-attention family (DESIGN §5 "Mask
// family"), shared by the CPU kernel, the CUDA kernel, the block-map builder and
// the `attnbench mask` tool. Everything here is __host__ __device__.
//
// A mask is a functor with
//   bool operator()(b, i, j)            may query i (of Nq) attend to key j (of Nkv) in batch b
// and, when its rows are unions of a few key intervals, also
//   static constexpr bool kIntervals = true;
//   void row_keys(b, i, emit)           calls emit(lo, hi) for the allowed keys [lo, hi) of row i,
//                                       in increasing order, disjoint (adjacent ones allowed)
// (window, wrapped window, strided, document, prefix, registers, DAG). The
// block map is built from the intervals (O(intervals) per row, exact), and the
// CPU kernel masks a partial tile row with at most a few fills. Masks without
// intervals (mask attention, key masks) are classified by evaluating the
// predicate on each tile (a key mask: once per key tile, every row is alike). A new mask is a struct here plus one case in visit_mask().
//
// A score mod turns a logit s (already scaled by 1/√D) of head h, query i and
// key j into another: relative s − |i − j|, cyclic s − min(d, N − d), ALiBi
// s + m_h (j − i) with m_h = 2^(−8(h+1)/H), softcap c·tanh(s/c). Masks act after
// the score mod (a masked logit is −inf whatever the mod does).
#pragma once

#include <cmath>
#include <cstdint>

#include "impls/common.hpp"

namespace attnbench::mask {

enum class Kind : uint8_t {
  none,            // every key
  causal,          // j ≤ i + Nkv − Nq (bottom-right aligned)
  window,          // |i − j| ≤ h
  wrapped_window,  // min(d, N − d) ≤ h (hits sorted by φ; hepattn)
  strided,         // |j − c_i| ≤ h, c_i = round_half_even(i·Nkv/Nq) (cyclic: also c_i ± Nkv)
  strided_t,       // the transpose: |i − c'_j| ≤ h, c'_j = round_half_even(j·Nq/Nkv)
  document,        // doc[i] = doc[j] (causal: and j ≤ i)
  prefix,          // j < P or (doc[i] = doc[j] and j ≤ i)
  registers,       // i < R or j < R or |i − j| ≤ h
  dag,             // (node(j) = node(i) and j ≤ i) or node(i) sees node(j) (parents or ancestors)
  maskattn,        // sigmoid(logit_ij) ≥ threshold; optionally empty rows attend every key
  key_mask,        // keys[b, j]: a boolean key mask per batch entry (hepattn's kv_mask)
  sliding_window,  // 0 ≤ i − j < w: causal, the w most recent keys (Mistral's sliding window; the GPT trainer's)
};

enum class ScoreModKind : uint8_t { none, relative, cyclic, alibi, softcap };

enum class Tile : uint8_t { empty = 0, partial = 1, full = 2 };

/// Everything a mask reads. Plain data: pointers are host or device pointers,
/// whichever side evaluates the mask.
struct MaskData {
  Kind kind = Kind::none;
  int64_t Nq = 1, Nkv = 1;
  int64_t half = 0;        // h = w / 2: window, wrapped_window, strided(_t), registers
  int64_t lookback = 0;    // sliding_window: w − 1
  bool cyclic = false;     // strided(_t): distances modulo the strided length
  bool causal = false;     // document
  int64_t prefix = 0;      // prefix: P
  int64_t registers = 0;   // registers: R
  const int32_t* group = nullptr;        // (N,) document id (document, prefix: −1 in the prefix) or DAG node
  const int32_t* group_start = nullptr;  // (groups + 1,) first token of each document / node, then N
  const uint32_t* reach = nullptr;       // dag: (nodes, reach_words) bit b of row a: node a sees node b
  int64_t reach_words = 0;
  const float* logits = nullptr;         // maskattn: (B, Nq, Nkv) f32
  float logit_threshold = 0.0f;          // maskattn: log(t / (1 − t)); allowed iff logit ≥ it
  const uint8_t* row_all = nullptr;      // maskattn attend_all: (B, Nq) 1 = row has no allowed key, sees all
  const uint8_t* keys = nullptr;         // key_mask: (B, Nkv) 1 = key kept
};

struct ScoreMod {
  ScoreModKind kind = ScoreModKind::none;
  int64_t N = 1;        // cyclic: the period (Nkv)
  int64_t H = 1;        // alibi: heads
  float softcap = 0.0f; // softcap: c > 0
};

ATTNBENCH_HD int64_t abs64(int64_t x) { return x < 0 ? -x : x; }
ATTNBENCH_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNBENCH_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/// round(num / den) with ties to even, like torch.round (num ≥ 0, den > 0).
ATTNBENCH_HD int64_t div_round_half_even(int64_t num, int64_t den) {
  const int64_t q = num / den, r = num - q * den;
  if (2 * r > den) return q + 1;
  if (2 * r < den) return q;
  return q + (q & 1);
}

/// Cyclic distance of two indices of a sequence of length n (|δ| < n).
ATTNBENCH_HD int64_t cyclic_distance(int64_t delta, int64_t n) {
  const int64_t d = abs64(delta);
  return min64(d, n - d);
}

// --- masks -------------------------------------------------------------------------

struct Full {
  static constexpr bool kIntervals = true;
  int64_t Nkv;
  ATTNBENCH_HD bool operator()(int64_t, int64_t, int64_t) const { return true; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t, Emit&& emit) const { emit(int64_t(0), Nkv); }
};

struct Causal {
  static constexpr bool kIntervals = true;
  int64_t Nq, Nkv;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const { return j <= i + Nkv - Nq; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    const int64_t hi = min64(Nkv, i + Nkv - Nq + 1);
    if (hi > 0) emit(int64_t(0), hi);
  }
};

struct Window {
  static constexpr bool kIntervals = true;
  int64_t N, half;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const { return abs64(i - j) <= half; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    emit(max64(0, i - half), min64(N, i + half + 1));
  }
};

struct SlidingWindow {
  static constexpr bool kIntervals = true;
  int64_t lookback;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const { return j <= i && i - j <= lookback; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    emit(max64(0, i - lookback), i + 1);
  }
};

struct WrappedWindow {
  static constexpr bool kIntervals = true;
  int64_t N, half;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const { return cyclic_distance(i - j, N) <= half; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    if (2 * half + 1 >= N) return emit(int64_t(0), N);
    const int64_t lo = i - half, hi = i + half + 1;  // [lo, hi) modulo N, shorter than N
    if (lo < 0) {
      emit(int64_t(0), hi);
      emit(lo + N, N);
    } else if (hi > N) {
      emit(int64_t(0), hi - N);
      emit(lo, N);
    } else {
      emit(lo, hi);
    }
  }
};

/// Keys [c − h, c + h] around a centre c in a sequence of length n, clipped or
/// (cyclic) wrapped: emits up to two intervals in increasing order.
template <class Emit>
ATTNBENCH_HD void centred_keys(int64_t c, int64_t half, int64_t n, bool cyclic, Emit&& emit) {
  int64_t lo = c - half, hi = c + half + 1;
  if (cyclic && hi - lo >= n) return emit(int64_t(0), n);  // the window covers the whole cycle
  if (!cyclic) {
    lo = max64(lo, 0), hi = min64(hi, n);
    if (lo < hi) emit(lo, hi);
    return;
  }
  if (lo < 0) {
    emit(int64_t(0), hi);
    emit(lo + n, n);
  } else if (hi > n) {
    emit(int64_t(0), hi - n);
    emit(lo, n);
  } else {
    emit(lo, hi);
  }
}

/// Is j within h of centre c (cyclic: |j − c ± n| ≤ h also counts)?
ATTNBENCH_HD bool near_centre(int64_t j, int64_t c, int64_t half, int64_t n, bool cyclic) {
  const int64_t d = j - c;
  return abs64(d) <= half || (cyclic && (abs64(d - n) <= half || abs64(d + n) <= half));
}

struct Strided {
  static constexpr bool kIntervals = true;
  int64_t Nq, Nkv, half;
  bool cyclic;
  ATTNBENCH_HD int64_t centre(int64_t i) const { return div_round_half_even(i * Nkv, Nq); }
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const {
    return near_centre(j, centre(i), half, Nkv, cyclic);
  }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    centred_keys(centre(i), half, Nkv, cyclic, emit);
  }
};

/// The transpose of Strided: key j has the centre c'_j = round(j·Nq/Nkv) among
/// the queries. c' is non-decreasing in j, so the keys of row i are the j with
/// c'_j in [i − h, i + h] (cyclic: also shifted by ±Nq): contiguous runs found
/// by inverting c' (first j with c'_j ≥ x).
struct StridedT {
  static constexpr bool kIntervals = true;
  int64_t Nq, Nkv, half;
  bool cyclic;
  ATTNBENCH_HD int64_t centre(int64_t j) const { return div_round_half_even(j * Nq, Nkv); }
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const {
    return near_centre(i, centre(j), half, Nq, cyclic);
  }
  /// First key j with centre(j) ≥ x (Nkv when none), by bisection.
  ATTNBENCH_HD int64_t first_at_least(int64_t x) const {
    int64_t lo = 0, hi = Nkv;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (centre(mid) >= x) hi = mid; else lo = mid + 1;
    }
    return lo;
  }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    // Keys whose centre lies in [a, b] (centres of keys are in [0, Nq]).
    auto run = [&](int64_t a, int64_t b) {
      const int64_t lo = first_at_least(a), hi = first_at_least(b + 1);
      if (lo < hi) emit(lo, hi);
    };
    const int64_t a = i - half, b = i + half;
    if (!cyclic) return run(a, b);
    if (2 * half + 1 >= Nq) return emit(int64_t(0), Nkv);  // the window covers the whole cycle
    // Centres x with |i − x ± Nq| ≤ h: x ∈ [a − Nq, b − Nq], [a, b] or [a + Nq, b + Nq],
    // disjoint and in this order because 2h < Nq; c' is monotone, so the key runs are too.
    run(a - Nq, b - Nq);
    run(a, b);
    run(a + Nq, b + Nq);
  }
};

struct Document {
  static constexpr bool kIntervals = true;
  const int32_t* doc;        // (N,) document of each token: 0, 1, ... non-decreasing
  const int32_t* doc_start;  // (documents + 1,) first token of each document, then N
  bool causal;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const {
    return doc[i] == doc[j] && (!causal || j <= i);
  }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    emit(int64_t(doc_start[doc[i]]), causal ? i + 1 : int64_t(doc_start[doc[i] + 1]));
  }
};

struct Prefix {
  static constexpr bool kIntervals = true;
  const int32_t* doc;        // (N,) −1 for the first P tokens, then 0, 1, ... non-decreasing
  const int32_t* doc_start;  // (documents + 1,) first token of each document (≥ P), then N
  int64_t P;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const {
    return j < P || (doc[i] == doc[j] && j <= i);
  }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    if (i < P) return emit(int64_t(0), P);
    if (P > 0) emit(int64_t(0), P);
    emit(int64_t(doc_start[doc[i]]), i + 1);
  }
};

struct Registers {
  static constexpr bool kIntervals = true;
  int64_t N, R, half;
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const { return i < R || j < R || abs64(i - j) <= half; }
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    if (i < R) return emit(int64_t(0), N);
    const int64_t lo = max64(0, i - half), hi = min64(N, i + half + 1);
    if (lo <= R) return emit(int64_t(0), max64(hi, R));
    if (R > 0) emit(int64_t(0), R);
    emit(lo, hi);
  }
};

struct Dag {
  static constexpr bool kIntervals = true;
  const int32_t* node;        // (N,) node of each token, non-decreasing
  const int32_t* node_start;  // (nodes + 1,)
  const uint32_t* reach;      // (nodes, words)
  int64_t words;
  ATTNBENCH_HD bool sees(int64_t a, int64_t b) const { return (reach[a * words + b / 32] >> (b % 32)) & 1u; }
  ATTNBENCH_HD bool operator()(int64_t, int64_t i, int64_t j) const {
    const int64_t ni = node[i], nj = node[j];
    return ni == nj ? j <= i : sees(ni, nj);
  }
  /// Visible nodes come before node(i) (topological layout): their token ranges
  /// in order, then the own node's tokens up to i.
  template <class Emit>
  ATTNBENCH_HD void row_keys(int64_t, int64_t i, Emit&& emit) const {
    const int64_t ni = node[i];
    const uint32_t* row = reach + ni * words;
    for (int64_t w = 0; w * 32 < ni; ++w) {
      uint32_t bits = row[w];
      while (bits) {
#if defined(__CUDA_ARCH__)
        const int bit = __ffs(int(bits)) - 1;
#else
        const int bit = __builtin_ctz(bits);
#endif
        bits &= bits - 1;
        const int64_t nj = w * 32 + bit;
        if (nj < ni) emit(int64_t(node_start[nj]), int64_t(node_start[nj + 1]));
      }
    }
    emit(int64_t(node_start[ni]), i + 1);
  }
};

struct MaskAttn {
  static constexpr bool kIntervals = false;
  const float* logits;     // (B, Nq, Nkv)
  const uint8_t* row_all;  // (B, Nq) or null
  int64_t Nq, Nkv;
  float threshold;         // on the logit
  ATTNBENCH_HD bool operator()(int64_t b, int64_t i, int64_t j) const {
    if (row_all && row_all[b * Nq + i]) return true;
    return logits[(b * Nq + i) * Nkv + j] >= threshold;
  }
};

/// A boolean key mask per batch entry: every query of batch entry b sees the
/// keys j with keys[b, j] (the same row for every query, so its block map is
/// one row of tiles per batch entry; no intervals: a random mask has ~Nkv/4 runs).
struct KeyMask {
  static constexpr bool kIntervals = false;
  const uint8_t* keys;  // (B, Nkv)
  int64_t Nkv;
  ATTNBENCH_HD bool operator()(int64_t b, int64_t, int64_t j) const { return keys[b * Nkv + j] != 0; }
};

/// Calls f(functor) with the mask functor of `m`.
template <class F>
ATTNBENCH_HD decltype(auto) visit_mask(const MaskData& m, F&& f) {
  switch (m.kind) {
    case Kind::causal: return f(Causal{m.Nq, m.Nkv});
    case Kind::window: return f(Window{m.Nkv, m.half});
    case Kind::wrapped_window: return f(WrappedWindow{m.Nkv, m.half});
    case Kind::strided: return f(Strided{m.Nq, m.Nkv, m.half, m.cyclic});
    case Kind::strided_t: return f(StridedT{m.Nq, m.Nkv, m.half, m.cyclic});
    case Kind::document: return f(Document{m.group, m.group_start, m.causal});
    case Kind::prefix: return f(Prefix{m.group, m.group_start, m.prefix});
    case Kind::registers: return f(Registers{m.Nkv, m.registers, m.half});
    case Kind::dag: return f(Dag{m.group, m.group_start, m.reach, m.reach_words});
    case Kind::maskattn: return f(MaskAttn{m.logits, m.row_all, m.Nq, m.Nkv, m.logit_threshold});
    case Kind::key_mask: return f(KeyMask{m.keys, m.Nkv});
    case Kind::sliding_window: return f(SlidingWindow{m.lookback});
    case Kind::none: break;
  }
  return f(Full{m.Nkv});
}

/// Does the mask depend on the batch index (one block map per batch entry)?
ATTNBENCH_HD bool per_batch(const MaskData& m) { return m.kind == Kind::maskattn || m.kind == Kind::key_mask; }

// --- score mods --------------------------------------------------------------------

/// ALiBi slope of head h of H: 2^(−8(h+1)/H).
ATTNBENCH_HD float alibi_slope(int64_t h, int64_t H) { return exp2f(-8.0f * float(h + 1) / float(H)); }

/// The modded logit of head h, query i, key j (s scaled by 1/√D, natural units).
ATTNBENCH_HD float apply_score_mod(const ScoreMod& m, float s, int64_t h, int64_t i, int64_t j) {
  switch (m.kind) {
    case ScoreModKind::relative: return s - float(abs64(i - j));
    case ScoreModKind::cyclic: return s - float(cyclic_distance(i - j, m.N));
    case ScoreModKind::alibi: return s + alibi_slope(h, m.H) * float(j - i);
    case ScoreModKind::softcap: return m.softcap * tanhf(s / m.softcap);
    case ScoreModKind::none: break;
  }
  return s;
}

}  // namespace attnbench::mask
