// Selective attention on the CPU, forward and backward (DESIGN §5; math in
// reference/selective.hpp, write-up in docs/selective.md).
//
//   x: (B, T, d)  wq: (d, d)  wk = [A | B], wv = [C | D]: (d, 2d)   o: (B, T,
//   d) q_i = wq x_i;  k_ij = A q_i + B x_j;  v_ij = C q_i + D x_j   (per head,
//   dh = d / H) o_i = Σ_{j ≤ i} softmax_j(R_i q_i · R_j k_ij / √dh) v_ij
//
// Materialized (the seed's algorithm, `cpu_materialized`): per query i, the
// keys and values K_i, V_i (i+1, d) = [q_i ; x_j] wkᵀ, wvᵀ are built with the
// full concatenated product (8 d² FLOPs per pair), then one attention row per
// head. OpenMP over (b, i), dynamic schedule in the forward (work grows with
// i); inner loops over d are unit-stride and vectorize. The backward recomputes
// K_i, V_i per query and keeps per-thread dx / dwk / dwv accumulators, so it
// deals the rows out statically (schedule(static, 1)): the same rows reach the
// same accumulator on every call and the sums are bit-identical run to run.
//
// Fused (`cpu`), exact, never materializing k_ij / v_ij:
//   score  R_i q_i · R_j (a_i + b_j) with a_i = A q_i, b_j = B x_j. The b_j
//   part
//          is an ordinary RoPE key. The a_i part is q_iᵀ R_{j−i} a_i; per pair
//          (t, t + dh/2) it is cos φ·P_t + sin φ·Q_t, φ = θ_t (j − i),
//          P_t = q1 a1 + q2 a2, Q_t = q2 a1 − q1 a2; expanding cos/sin(θj − θi)
//          gives u_i · c_j with u_i[t] = P cos θi − Q sin θi,
//          u_i[t + dh/2] = P sin θi + Q cos θi, c_j = [cos θ_t j, sin θ_t j].
//          So scores = ordinary attention with head dim 2·dh on
//          q' = [R_i q_i, u_i], k' = [R_j b_j, c_j]. Without RoPE the a_i term
//          is constant in j and cancels in the softmax (q' = q_i, k' = b_j).
//   value  Σ_j p_ij (C q_i + D x_j) = C q_i + Σ_j p_ij D x_j (rows sum to one;
//          a causal row always holds j = i).
//   The forward runs impls/cpu/sdpa.hpp's sdpa_forward_fused on q', k' (head
//   dimension 2·dh with RoPE) and the values D x read in place (Dv = dh), the
//   output kept with its rows' log-sum-exp (SelectiveSaved) and o = it + C q;
//   q' carries √2 so that the kernel's 1/√(2 dh) is the layer's 1/√dh. The
//   backward reads what the forward saved (projections, q', k', output, lse),
//   runs sdpa_backward_fused on the same operands (dO and d(D x) in the layer's
//   own (B·T, d) layout), then the chain rule through u, RoPE and the five
//   projections.
//
// Strategies (T 300, d 64, H 2, B 16, 2 shared cores; docs/selective.md):
//   Highway foreach_target around auto-vectorized loops (the build has no
//     -march=native): materialized 1.8× faster (SSE2 → AVX-512).
//   linear(): transposed weights, axpy rows, not dots: fused forward
//     0.079 → 0.054 s (1 thread, loaded machine); then the kernels' GEMM
//     (impls/cpu/gemm.hpp): fused fwd 12 → 8.8 ms, fwd_bwd 50 → 40 ms (2 threads).
//   materialized: causal pairs only (j ≤ i): 2× fewer pairs than the seed.
//   fused: the sdpa kernels reused (forward and backward), v and dO padded to
//     2·dh with RoPE (P·V at 2·dh, +50% attention FLOPs); then the kernels'
//     separate value head dimension (SdpaParams::Dv) instead of the padding
//     (docs/selective.md has the measurement); then the forward's state saved
//     for the backward (SelectiveSaved) instead of recomputed there.
#include "impls/cpu/selective.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "impls/cpu/gemm.hpp"
#include "impls/cpu/sdpa.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "impls/cuda/selective_math.hpp"

// Highway's foreach_target: this file is compiled once per x86 target (SSE4,
// AVX2, AVX-512, ...) with that target's instruction set enabled, so the
// unit-stride loops below auto-vectorize at the widest width the machine has;
// the entry points dispatch at run time (the build has no -march=native).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "impls/cpu/selective.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu::HWY_NAMESPACE {
namespace {

/// Carves 64-byte aligned float buffers out of scratch; with a null base it
/// only counts (the *_scratch_bytes functions run the same layout code).
struct Carve {
  char* base = nullptr;
  size_t off = 0;
  float* take(size_t n) {
    off = (off + 63) & ~size_t(63);
    float* p = base ? reinterpret_cast<float*>(base + off) : nullptr;
    off += n * sizeof(float);
    return p;
  }
  void* take_bytes(size_t n) {
    off = (off + 63) & ~size_t(63);
    void* p = base ? base + off : nullptr;
    off += n;
    return p;
  }
};

/// dst (rows, cols) dense f32 ← src with row stride `ld` (elements of dtype t).
void load_rows(float* dst, const void* src, DType t, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = load_float(src, t, r * ld + c);
}

/// x or dout (B, T, d) with strides → dense (B·T, d) f32.
void load_btd(float* dst, const void* src, DType t, const SelectiveParams& p, SelectiveStrides s) {
#pragma omp parallel for
  for (int64_t bt = 0; bt < p.B * p.T; ++bt) {
    const int64_t b = bt / p.T, i = bt % p.T;
    for (int64_t c = 0; c < p.d; ++c) dst[bt * p.d + c] = load_float(src, t, b * s.b + i * s.t + c);
  }
}

/// Floats of the projections' GEMM scratch (impls/cpu/gemm.hpp): per thread a
/// packing buffer and a (d, d) partial sum for the weight gradients.
size_t gemm_floats(int64_t d, int threads) {
  return size_t(threads) * size_t(gemm_pack_floats(d) + d * d);
}

/// Y (rows, out) = X (rows, in) Wᵀ, W (out, in) with row stride ldw.
void linear(float* Y, const float* X, const float* W, int64_t ldw, int64_t rows, int64_t out, int64_t in, float* g,
            int threads) {
  gemm_rows(rows, out, in, {X, in, 1}, {W, 1, ldw}, Y, out, false, g, gemm_pack_floats(out), threads);
}

/// dX (rows, in) += dY (rows, out) W, W (out, in) with row stride ldw.
void linear_dx(float* dX, const float* dY, const float* W, int64_t ldw, int64_t rows, int64_t out, int64_t in,
               float* g, int threads) {
  gemm_rows(rows, in, out, {dY, out, 1}, {W, ldw, 1}, dX, in, true, g, gemm_pack_floats(in), threads);
}

/// dW (out, in) with row stride lddw = dYᵀ X: dY (rows, out), X (rows, in); the
/// sum over rows split over the threads and added in a fixed order.
void linear_dw(float* dW, int64_t lddw, const float* dY, const float* X, int64_t rows, int64_t out, int64_t in,
               float* g, int threads) {
  const int64_t pack = gemm_pack_floats(in);
  gemm_reduce(out, in, rows, {dY, 1, out}, {X, in, 1}, dW, lddw, g + threads * pack, g, pack, threads);
}

/// cos/sin tables (T, dh/2): θ_t = 10000^(−2t/dh), angles in double.
void rope_table(float* cs, float* sn, int64_t T, int64_t dh) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t t = 0; t < half; ++t) {
      const double a = sdpa_math::rope_angle(i, int(t), int(dh));
      cs[i * half + t] = float(std::cos(a));
      sn[i * half + t] = float(std::sin(a));
    }
}

/// Rotates every head slice of a d-vector by the table row (sign −1: by −pos).
void rope_vec(float* v, const float* cs, const float* sn, int64_t d, int64_t H, float sign) {
  const int64_t dh = d / H, half = dh / 2;
  for (int64_t h = 0; h < H; ++h) {
    float* x = v + h * dh;
#pragma omp simd
    for (int64_t t = 0; t < half; ++t) {
      const float c = cs[t], s = sign * sn[t], a = x[t], b = x[t + half];
      x[t] = a * c - b * s;
      x[t + half] = b * c + a * s;
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

// ---------------------------------------------------------------- fused ----

/// What the fused forward computes and the backward reads (SelectiveSaved),
/// carved from `c`: the caller's buffer (selective_saved_at) or the scratch of
/// a forward that keeps nothing.
SelectiveSaved carve_saved(const SelectiveParams& p, Carve& c) {
  const size_t bt = size_t(p.B * p.T), d = size_t(p.d), aug = p.rope ? 2 * bt * d : 0;
  SelectiveSaved s;
  s.Q = c.take(bt * d), s.KB = c.take(bt * d), s.VD = c.take(bt * d), s.o = c.take(bt * d);
  s.A = p.rope ? c.take(bt * d) : nullptr;
  s.q2 = p.rope ? c.take(aug) : nullptr, s.k2 = p.rope ? c.take(aug) : nullptr;
  s.lse = c.take(size_t(p.B * p.H * p.T));
  return s;
}

/// Scratch of the fused form. The forward's state (Q, A q, B x, D x, q', k',
/// the attention output and its lse) lives in a SelectiveSaved: the caller's
/// when it keeps it for the backward, else carved from the forward's scratch.
struct Fused {
  int64_t dh = 0, half = 0, Dk = 0, BT = 0;
  size_t bytes = 0;  // scratch the layout needs
  float gamma = 1;   // q' carries √(Dk/dh) so that sdpa's 1/√Dk is 1/√dh
  float *X, *Wq, *Wk, *Wv, *cs, *sn,
      *g;               // g: the projections' GEMM scratch (gemm_floats)
  SelectiveSaved s;     // Q, A, KB, VD (BT, d); q2, k2 (BT, H, Dk) with RoPE; o (BT, d) the attention output; lse
  float* CQ = nullptr;  // (BT, d) C q (forward only)
  void* sdpa_scratch = nullptr;
  // backward
  float *dO, *dq2, *dKB, *dVD, *dQ, *dA, *dX;
  float* dk2 = nullptr;  // (BT, H, Dk) the augmented keys' gradient (RoPE only; first dh columns: d(R b))
};

/// The attention on the SDPA kernels: queries and keys q', k' with RoPE (head
/// dimension Dk = 2·dh, (BT, H, Dk) buffers), else q and B x; the values D x,
/// the output and their gradients in the layer's (B·T, d) layout (Dv = dh).
SdpaParams fused_sdpa_params(const SelectiveParams& p, const Fused& f) {
  SdpaParams s = selective_math::attention_params(p);
  s.Dv = f.dh;
  s.v_strides = s.o_strides = {p.T * p.d, f.dh, p.d};
  s.q = p.rope ? f.s.q2 : f.s.Q, s.k = p.rope ? f.s.k2 : f.s.KB, s.v = f.s.VD;
  s.o = f.s.o, s.lse = f.s.lse;
  return s;
}

/// The attention backward: sdpa_backward_fused reading the forward's output and
/// lse. Gradients land in dq2 (laid out like q2, or like Q without RoPE), dk2
/// (RoPE: augmented, its first dh columns per head are d(R b)) or straight in
/// dKB without RoPE, and d(D x) straight in dVD.
SdpaBackwardParams fused_sdpa_backward_params(const SelectiveParams& p, const Fused& f) {
  SdpaBackwardParams b;
  b.fwd = fused_sdpa_params(p, f);
  b.dout = f.dO, b.dq = f.dq2, b.dk = p.rope ? f.dk2 : f.dKB, b.dv = f.dVD;
  b.dq_strides = b.dk_strides = b.fwd.q_strides;
  b.do_strides = b.dv_strides = b.fwd.v_strides;
  return b;
}

/// The forward's layout (`saved` null: its state carved here too) or the
/// backward's (`saved` required: the forward's state).
Fused fused_layout(const SelectiveParams& p, int threads, bool backward, const SelectiveSaved* saved, char* base) {
  Fused f;
  Carve c{base};
  f.dh = p.d / p.H, f.half = f.dh / 2, f.Dk = p.rope ? 2 * f.dh : f.dh, f.BT = p.B * p.T;
  f.gamma = selective_math::query_gamma(p);
  const size_t bt = size_t(f.BT), d = size_t(p.d);
  f.X = c.take(bt * d), f.Wq = c.take(d * d), f.Wk = c.take(2 * d * d), f.Wv = c.take(2 * d * d);
  f.cs = c.take(size_t(p.T * f.half) + 1), f.sn = c.take(size_t(p.T * f.half) + 1);
  f.g = c.take(gemm_floats(p.d, threads));
  f.s = saved ? *saved : carve_saved(p, c);
  if (!backward) {
    f.CQ = c.take(bt * d);
    f.sdpa_scratch = c.take_bytes(sdpa_forward_fused_scratch_bytes(fused_sdpa_params(p, f), threads));
    f.bytes = c.off;
    return f;
  }
  const size_t aug = size_t(f.BT * p.H * f.Dk);
  f.dO = c.take(bt * d), f.dq2 = c.take(aug), f.dKB = c.take(bt * d), f.dVD = c.take(bt * d);
  f.dQ = c.take(bt * d), f.dA = c.take(bt * d), f.dX = c.take(bt * d);
  if (p.rope) f.dk2 = c.take(aug);
  f.sdpa_scratch = c.take_bytes(sdpa_backward_fused_scratch_bytes(fused_sdpa_backward_params(p, f), threads));
  f.bytes = c.off;
  return f;
}

/// x and the weights in f32, and the RoPE tables: what forward and backward read.
void fused_load(const SelectiveParams& p, Fused& f) {
  const int64_t d = p.d;
  load_btd(f.X, p.x, p.dtype, p, p.x_strides);
  load_rows(f.Wq, p.wq, p.dtype, d, d, d);
  load_rows(f.Wk, p.wk, p.dtype, d, 2 * d, 2 * d);
  load_rows(f.Wv, p.wv, p.dtype, d, 2 * d, 2 * d);
  if (p.rope) rope_table(f.cs, f.sn, p.T, f.dh);
}

/// The forward's projections and augmented queries/keys.
void fused_project(const SelectiveParams& p, Fused& f, int threads) {
  const int64_t d = p.d, H = p.H, dh = f.dh, half = f.half, Dk = f.Dk;
  const SelectiveSaved& s = f.s;
  linear(s.Q, f.X, f.Wq, d, f.BT, d, d, f.g, threads);
  linear(s.KB, f.X, f.Wk + d, 2 * d, f.BT, d, d, f.g, threads);
  linear(f.CQ, s.Q, f.Wv, 2 * d, f.BT, d, d, f.g, threads);
  linear(s.VD, f.X, f.Wv + d, 2 * d, f.BT, d, d, f.g, threads);
  if (!p.rope) return;
  linear(s.A, s.Q, f.Wk, 2 * d, f.BT, d, d, f.g, threads);
#pragma omp parallel for num_threads(threads)
  for (int64_t bt = 0; bt < f.BT; ++bt) {
    const int64_t i = bt % p.T;
    const float* cs = f.cs + i * half;
    const float* sn = f.sn + i * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* q = s.Q + bt * d + h * dh;
      const float* a = s.A + bt * d + h * dh;
      const float* kb = s.KB + bt * d + h * dh;
      float* q2 = s.q2 + (bt * H + h) * Dk;
      float* k2 = s.k2 + (bt * H + h) * Dk;
      for (int64_t t = 0; t < half; ++t)
        selective_math::augment_pair(q, a, kb, cs[t], sn[t], f.gamma, t, half, q2, k2);
    }
  }
}

// --------------------------------------------------------- materialized ----

struct Materialized {
  float *X, *Wq, *Wk, *Wv, *WkT, *WvT, *cs, *sn, *Q, *g;
  float* thread = nullptr;  // per-thread blocks of `per_thread` floats
  size_t per_thread = 0;
  // backward
  float *dO, *dQ, *dX;
};

/// Per-thread block: K, V, Kr, dK, dV (T, d), P (H, T), dp (T), qr, dqr (d), z
/// (2d), and for the backward dX (B·T, d), dWk, dWv (d, 2d) accumulators.
size_t materialized_per_thread(const SelectiveParams& p, bool backward) {
  const size_t T = size_t(p.T), d = size_t(p.d), H = size_t(p.H);
  size_t n = 5 * T * d + H * T + T + 2 * d + 2 * d;
  n = (n + 15) & ~size_t(15);                                    // the accumulators start 64-byte aligned
  if (backward) n += 2 * (size_t(p.B) * T * d + 4 * d * d + d);  // dX, dWk, dWv, dq_i in double
  return (n + 15) & ~size_t(15);
}

Materialized materialized_layout(const SelectiveParams& p, int threads, bool backward, char* base, size_t* bytes) {
  Materialized m;
  Carve c{base};
  const size_t bt = size_t(p.B * p.T), d = size_t(p.d), half = size_t(p.d / p.H / 2);
  m.X = c.take(bt * d), m.Wq = c.take(d * d), m.Wk = c.take(2 * d * d), m.Wv = c.take(2 * d * d);
  m.WkT = c.take(2 * d * d), m.WvT = c.take(2 * d * d);
  m.cs = c.take(size_t(p.T) * half + 1), m.sn = c.take(size_t(p.T) * half + 1), m.Q = c.take(bt * d);
  m.g = c.take(gemm_floats(p.d, threads));
  m.per_thread = materialized_per_thread(p, backward);
  m.thread = c.take(m.per_thread * size_t(threads));
  if (backward) m.dO = c.take(bt * d), m.dQ = c.take(bt * d), m.dX = c.take(bt * d);
  *bytes = c.off;
  return m;
}

void materialized_prepare(const SelectiveParams& p, Materialized& m, int threads) {
  const int64_t d = p.d;
  load_btd(m.X, p.x, p.dtype, p, p.x_strides);
  load_rows(m.Wq, p.wq, p.dtype, d, d, d);
  load_rows(m.Wk, p.wk, p.dtype, d, 2 * d, 2 * d);
  load_rows(m.Wv, p.wv, p.dtype, d, 2 * d, 2 * d);
  // Transposed (2d, d): the per-pair product is then 2d unit-stride axpys over
  // d outputs.
  for (int64_t o = 0; o < d; ++o)
    for (int64_t c = 0; c < 2 * d; ++c) {
      m.WkT[c * d + o] = m.Wk[o * 2 * d + c];
      m.WvT[c * d + o] = m.Wv[o * 2 * d + c];
    }
  if (p.rope) rope_table(m.cs, m.sn, p.T, d / p.H);
  linear(m.Q, m.X, m.Wq, d, p.B * p.T, d, d, m.g, threads);
}

/// Per-query state of the materialized algorithm: K_i, V_i for j ≤ i, rotated
/// keys, rotated query and the probabilities per head.
struct MatQuery {
  float *K, *V, *Kr, *dK, *dV, *P, *dp, *qr, *dqr, *z;
};

MatQuery mat_query(const SelectiveParams& p, float* block) {
  const int64_t T = p.T, d = p.d, H = p.H;
  MatQuery s;
  s.K = block, s.V = s.K + T * d, s.Kr = s.V + T * d, s.dK = s.Kr + T * d, s.dV = s.dK + T * d;
  s.P = s.dV + T * d, s.dp = s.P + H * T, s.qr = s.dp + T, s.dqr = s.qr + d, s.z = s.dqr + d;
  return s;
}

void mat_query_forward(const SelectiveParams& p, const Materialized& m, int64_t b, int64_t i, MatQuery& s) {
  const int64_t d = p.d, H = p.H, dh = d / H, half = dh / 2;
  const float* qi = m.Q + (b * p.T + i) * d;
  for (int64_t j = 0; j <= i; ++j) {
    // z = [q_i ; x_j]; K_i[j] = wk z, V_i[j] = wv z: the materialized keys and
    // values.
    std::memcpy(s.z, qi, size_t(d) * sizeof(float));
    std::memcpy(s.z + d, m.X + (b * p.T + j) * d, size_t(d) * sizeof(float));
    float* kj = s.K + j * d;
    float* vj = s.V + j * d;
    std::fill(kj, kj + d, 0.0f);
    std::fill(vj, vj + d, 0.0f);
    for (int64_t c = 0; c < 2 * d; ++c) {
      axpy(kj, s.z[c], m.WkT + c * d, d);
      axpy(vj, s.z[c], m.WvT + c * d, d);
    }
    std::memcpy(s.Kr + j * d, kj, size_t(d) * sizeof(float));
    if (p.rope) rope_vec(s.Kr + j * d, m.cs + j * half, m.sn + j * half, d, H, 1.0f);
  }
  std::memcpy(s.qr, qi, size_t(d) * sizeof(float));
  if (p.rope) rope_vec(s.qr, m.cs + i * half, m.sn + i * half, d, H, 1.0f);
  const float scale = 1.0f / std::sqrt(float(dh));
  for (int64_t h = 0; h < H; ++h) {
    float* ph = s.P + h * p.T;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, ph[j] = scale * dot(s.qr + h * dh, s.Kr + j * d + h * dh, dh));
    float sum = 0;
    for (int64_t j = 0; j <= i; ++j) sum += (ph[j] = std::exp(ph[j] - mx));
    for (int64_t j = 0; j <= i; ++j) ph[j] /= sum;
  }
}

}  // namespace

size_t ForwardFusedBytes(const SelectiveParams& p, int threads, bool saving) {
  const SelectiveSaved caller{};  // with `saving` the state is the caller's
  return fused_layout(p, threads, false, saving ? &caller : nullptr, nullptr).bytes;
}
size_t BackwardFusedBytes(const SelectiveParams& p, int threads) {
  const SelectiveSaved caller{};
  return fused_layout(p, threads, true, &caller, nullptr).bytes;
}
size_t SavedBytes(const SelectiveParams& p) {
  Carve c;
  carve_saved(p, c);
  return c.off;
}
SelectiveSaved SavedAt(const SelectiveParams& p, void* base) {
  Carve c{static_cast<char*>(base)};
  return carve_saved(p, c);
}
size_t ForwardMaterializedBytes(const SelectiveParams& p, int threads) {
  size_t n = 0;
  materialized_layout(p, threads, false, nullptr, &n);
  return n;
}
size_t BackwardMaterializedBytes(const SelectiveParams& p, int threads) {
  size_t n = 0;
  materialized_layout(p, threads, true, nullptr, &n);
  return n;
}

void ForwardFused(const SelectiveParams& p, void* scratch, int threads, const SelectiveSaved* saved) {
  Fused f = fused_layout(p, threads, false, saved, static_cast<char*>(scratch));
  fused_load(p, f);
  fused_project(p, f, threads);
  // o_i = Σ_j p_ij D x_j (the attention, kept with its lse), then + C q_i.
  sdpa_forward_fused(fused_sdpa_params(p, f), f.sdpa_scratch, threads);
  const int64_t d = p.d;
#pragma omp parallel for num_threads(threads)
  for (int64_t bt = 0; bt < f.BT; ++bt) {
    float* o = p.o + (bt / p.T) * p.o_strides.b + (bt % p.T) * p.o_strides.t;
    const float *att = f.s.o + bt * d, *cq = f.CQ + bt * d;
    for (int64_t c = 0; c < d; ++c) o[c] = att[c] + cq[c];
  }
}

void BackwardFused(const SelectiveParams& p, const SelectiveSaved& saved, void* scratch, int threads) {
  Fused f = fused_layout(p, threads, true, &saved, static_cast<char*>(scratch));
  fused_load(p, f);
  const SelectiveSaved& s = f.s;
  const int64_t d = p.d, H = p.H, T = p.T, dh = f.dh, half = f.half, Dk = f.Dk, BT = f.BT;
  const size_t n = size_t(BT * d);
  load_btd(f.dO, p.dout, p.dtype, p, p.dout_strides);
  // Attention backward on q' (Dk) and D x from the forward's output and lse:
  // dq', d(R b), d(D x).
  sdpa_backward_fused(fused_sdpa_backward_params(p, f), f.sdpa_scratch, threads);
  // Through q' = γ [R_i q_i, u_i(q_i, a_i)] and k' = [R_j b_j, c_j] back to q,
  // a = A q and b = B x.
  if (p.rope) {
#pragma omp parallel for num_threads(threads)
    for (int64_t bt = 0; bt < BT; ++bt) {
      const int64_t i = bt % T;
      const float* cs = f.cs + i * half;
      const float* sn = f.sn + i * half;
      for (int64_t h = 0; h < H; ++h) {
        const float* dq2 = f.dq2 + (bt * H + h) * Dk;
        const float* qh = s.Q + bt * d + h * dh;
        const float* ah = s.A + bt * d + h * dh;
        float* dq = f.dQ + bt * d + h * dh;
        float* da = f.dA + bt * d + h * dh;
        float* dkb = f.dKB + bt * d + h * dh;
        const float* dk2 = f.dk2 + (bt * H + h) * Dk;
        for (int64_t t = 0; t < half; ++t)
          selective_math::augment_pair_backward(dq2, dk2, qh, ah, cs[t], sn[t], f.gamma, t, half, dq, da, dkb);
      }
    }
  } else {
    std::memcpy(f.dQ, f.dq2, n * sizeof(float));  // dq2 laid out like Q without RoPE
  }
  // The five projections: a = A q, b = B x, Cq, D x, q = wq x.
  std::fill(p.dwq, p.dwq + d * d, 0.0f);
  std::fill(p.dwk, p.dwk + 2 * d * d, 0.0f);
  std::fill(p.dwv, p.dwv + 2 * d * d, 0.0f);
  std::fill(f.dX, f.dX + n, 0.0f);
  if (p.rope) {
    linear_dx(f.dQ, f.dA, f.Wk, 2 * d, BT, d, d, f.g, threads);
    linear_dw(p.dwk, 2 * d, f.dA, s.Q, BT, d, d, f.g, threads);
  }
  linear_dx(f.dQ, f.dO, f.Wv, 2 * d, BT, d, d, f.g, threads);
  linear_dw(p.dwv, 2 * d, f.dO, s.Q, BT, d, d, f.g, threads);
  linear_dw(p.dwk + d, 2 * d, f.dKB, f.X, BT, d, d, f.g, threads);
  linear_dw(p.dwv + d, 2 * d, f.dVD, f.X, BT, d, d, f.g, threads);
  linear_dw(p.dwq, d, f.dQ, f.X, BT, d, d, f.g, threads);
  linear_dx(f.dX, f.dKB, f.Wk + d, 2 * d, BT, d, d, f.g, threads);
  linear_dx(f.dX, f.dVD, f.Wv + d, 2 * d, BT, d, d, f.g, threads);
  linear_dx(f.dX, f.dQ, f.Wq, d, BT, d, d, f.g, threads);
  for (int64_t bt = 0; bt < BT; ++bt)
    std::memcpy(p.dx + (bt / T) * p.dx_strides.b + (bt % T) * p.dx_strides.t, f.dX + bt * d, size_t(d) * sizeof(float));
}

void ForwardMaterialized(const SelectiveParams& p, void* scratch, int threads) {
  size_t bytes = 0;
  Materialized m = materialized_layout(p, threads, false, static_cast<char*>(scratch), &bytes);
  materialized_prepare(p, m, threads);
  const int64_t d = p.d, H = p.H, dh = d / H, T = p.T;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t bi = 0; bi < p.B * T; ++bi) {
    const int64_t b = bi / T, i = T - 1 - bi % T;  // longest rows first
    MatQuery s = mat_query(p, m.thread + m.per_thread * size_t(omp_get_thread_num()));
    mat_query_forward(p, m, b, i, s);
    float* o = p.o + b * p.o_strides.b + i * p.o_strides.t;
    std::fill(o, o + d, 0.0f);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j <= i; ++j) axpy(o + h * dh, s.P[h * T + j], s.V + j * d + h * dh, dh);
  }
}

void BackwardMaterialized(const SelectiveParams& p, void* scratch, int threads) {
  size_t bytes = 0;
  Materialized m = materialized_layout(p, threads, true, static_cast<char*>(scratch), &bytes);
  materialized_prepare(p, m, threads);
  const int64_t d = p.d, H = p.H, dh = d / H, half = dh / 2, T = p.T, BT = p.B * p.T;
  load_btd(m.dO, p.dout, p.dtype, p, p.dout_strides);
  // dX (double: it sums T products per key), dWk, dWv in each thread block.
  const size_t acc_off = (5 * size_t(T * d) + size_t(H * T + T + 4 * d) + 15) & ~size_t(15);
  const size_t acc_n = 2 * (size_t(BT * d) + 4 * size_t(d * d) + size_t(d));
  for (int t = 0; t < threads; ++t) std::fill_n(m.thread + m.per_thread * size_t(t) + acc_off, acc_n, 0.0f);
  const float scale = 1.0f / std::sqrt(float(dh));
  // Static round-robin, not dynamic: each thread's dx / dwk / dwv accumulator must get
  // the same rows on every call, or their sums differ in the last bits run to run
  // (tests/determinism_test.cpp). Rows come longest first, so chunks of 1 balance.
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t bi = 0; bi < BT; ++bi) {
    const int64_t b = bi / T, i = T - 1 - bi % T;
    float* block = m.thread + m.per_thread * size_t(omp_get_thread_num());
    double* tdX = reinterpret_cast<double*>(block + acc_off);
    double* tdWk = tdX + BT * d;  // these sum over every pair: double, like dX
    double* tdWv = tdWk + 2 * d * d;
    double* dqd = tdWv + 2 * d * d;
    MatQuery s = mat_query(p, block);
    mat_query_forward(p, m, b, i, s);
    const float* doi = m.dO + (b * T + i) * d;
    std::fill(s.dqr, s.dqr + d, 0.0f);
    for (int64_t h = 0; h < H; ++h) {
      const float* ph = s.P + h * T;
      float Di = 0;
      for (int64_t j = 0; j <= i; ++j) Di += ph[j] * (s.dp[j] = dot(doi + h * dh, s.V + j * d + h * dh, dh));
      for (int64_t j = 0; j <= i; ++j) {
        const float ds = ph[j] * (s.dp[j] - Di) * scale;
        float* dvj = s.dV + j * d + h * dh;
        float* dkj = s.dK + j * d + h * dh;
        const float* qr = s.qr + h * dh;
        for (int64_t e = 0; e < dh; ++e) {
          dvj[e] = ph[j] * doi[h * dh + e];
          dkj[e] = ds * qr[e];
        }
        axpy(s.dqr + h * dh, ds, s.Kr + j * d + h * dh, dh);
      }
    }
    if (p.rope) rope_vec(s.dqr, m.cs + i * half, m.sn + i * half, d, H, -1.0f);
    float* dqi = m.dQ + (b * T + i) * d;
    for (int64_t c = 0; c < d; ++c) dqd[c] = s.dqr[c];
    for (int64_t j = 0; j <= i; ++j) {
      float* dkj = s.dK + j * d;
      const float* dvj = s.dV + j * d;
      if (p.rope) rope_vec(dkj, m.cs + j * half, m.sn + j * half, d, H, -1.0f);
      std::memcpy(s.z, m.Q + (b * T + i) * d, size_t(d) * sizeof(float));
      std::memcpy(s.z + d, m.X + (b * T + j) * d, size_t(d) * sizeof(float));
      // dW += dK zᵀ, dz = wkᵀ dK + wvᵀ dV → dq_i (first half), dx_j (second
      // half).
      double* dxj = tdX + (b * T + j) * d;
      for (int64_t o = 0; o < d; ++o) {
        const double gk = dkj[o], gv = dvj[o];
        double* wkr = tdWk + o * 2 * d;
        double* wvr = tdWv + o * 2 * d;
#pragma omp simd
        for (int64_t c = 0; c < 2 * d; ++c) wkr[c] += gk * s.z[c], wvr[c] += gv * s.z[c];
        const float* wk = m.Wk + o * 2 * d;
        const float* wv = m.Wv + o * 2 * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) dqd[c] += gk * wk[c] + gv * wv[c];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) dxj[c] += gk * wk[d + c] + gv * wv[d + c];
      }
    }
    for (int64_t c = 0; c < d; ++c) dqi[c] = float(dqd[c]);
  }
  // Reduce the per-thread accumulators, then q = wq x.
  std::fill(p.dwk, p.dwk + 2 * d * d, 0.0f);
  std::fill(p.dwv, p.dwv + 2 * d * d, 0.0f);
  std::fill(p.dwq, p.dwq + d * d, 0.0f);
  for (int64_t e = 0; e < BT * d; ++e) {
    double sum = 0;
    for (int t = 0; t < threads; ++t)
      sum += reinterpret_cast<const double*>(m.thread + m.per_thread * size_t(t) + acc_off)[e];
    m.dX[e] = float(sum);
  }
  for (int64_t e = 0; e < 2 * d * d; ++e) {
    double sk = 0, sv = 0;
    for (int t = 0; t < threads; ++t) {
      const double* a = reinterpret_cast<const double*>(m.thread + m.per_thread * size_t(t) + acc_off) + BT * d;
      sk += a[e], sv += a[2 * d * d + e];
    }
    p.dwk[e] = float(sk), p.dwv[e] = float(sv);
  }
  linear_dw(p.dwq, d, m.dQ, m.X, BT, d, d, m.g, threads);
  linear_dx(m.dX, m.dQ, m.Wq, d, BT, d, d, m.g, threads);
  for (int64_t bt = 0; bt < BT; ++bt)
    std::memcpy(p.dx + (bt / T) * p.dx_strides.b + (bt % T) * p.dx_strides.t, m.dX + bt * d, size_t(d) * sizeof(float));
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(ForwardFusedBytes);
HWY_EXPORT(BackwardFusedBytes);
HWY_EXPORT(SavedBytes);
HWY_EXPORT(SavedAt);
HWY_EXPORT(ForwardMaterializedBytes);
HWY_EXPORT(BackwardMaterializedBytes);
HWY_EXPORT(ForwardFused);
HWY_EXPORT(BackwardFused);
HWY_EXPORT(ForwardMaterialized);
HWY_EXPORT(BackwardMaterialized);

namespace {
void check(const SelectiveParams& p, const char* who) {
  if (p.dtype != DType::f32 && p.dtype != DType::bf16 && p.dtype != DType::f16)
    throw std::invalid_argument(std::string(who) + ": x and the weights must be f32, bf16 or f16");
  if (p.H < 1 || p.d % p.H != 0 || (p.rope && (p.d / p.H) % 2 != 0))
    throw std::invalid_argument(std::string(who) + ": d must be a multiple of H (d / H even with RoPE)");
}
}  // namespace

size_t selective_forward_fused_scratch_bytes(const SelectiveParams& p, int threads, bool saving) {
  return HWY_DYNAMIC_DISPATCH(ForwardFusedBytes)(p, std::max(1, threads), saving);
}
size_t selective_backward_fused_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(BackwardFusedBytes)(p, std::max(1, threads));
}
size_t selective_saved_bytes(const SelectiveParams& p) { return HWY_DYNAMIC_DISPATCH(SavedBytes)(p); }
SelectiveSaved selective_saved_at(const SelectiveParams& p, void* base) {
  return HWY_DYNAMIC_DISPATCH(SavedAt)(p, base);
}
size_t selective_forward_materialized_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(ForwardMaterializedBytes)(p, std::max(1, threads));
}
size_t selective_backward_materialized_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(BackwardMaterializedBytes)(p, std::max(1, threads));
}
void selective_forward_fused(const SelectiveParams& p, void* scratch, int threads, const SelectiveSaved* saved) {
  check(p, "selective_forward_fused");
  HWY_DYNAMIC_DISPATCH(ForwardFused)(p, scratch, std::max(1, threads), saved);
}
void selective_backward_fused(const SelectiveParams& p, const SelectiveSaved& saved, void* scratch, int threads) {
  check(p, "selective_backward_fused");
  HWY_DYNAMIC_DISPATCH(BackwardFused)(p, saved, scratch, std::max(1, threads));
}
void selective_forward_materialized(const SelectiveParams& p, void* scratch, int threads) {
  check(p, "selective_forward_materialized");
  HWY_DYNAMIC_DISPATCH(ForwardMaterialized)(p, scratch, std::max(1, threads));
}
void selective_backward_materialized(const SelectiveParams& p, void* scratch, int threads) {
  check(p, "selective_backward_materialized");
  HWY_DYNAMIC_DISPATCH(BackwardMaterialized)(p, scratch, std::max(1, threads));
}

}  // namespace attnbench::cpu
#endif
