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
// head. OpenMP over (b, i), dynamic schedule (work grows with i); inner loops
// over d are unit-stride and vectorize. The backward recomputes K_i, V_i per
// query and keeps per-thread dx / dwk / dwv accumulators.
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
//   The forward runs impls/cpu/sdpa.hpp's sdpa_forward_fused on q', k' and v
//   padded with zeros to 2·dh (that kernel needs Dv = Dqk: the P·V product
//   costs 2× what it needs with RoPE); q' carries √2 so that the kernel's
//   1/√(2 dh) is the layer's 1/√dh. The backward is an own row-at-a-time
//   attention backward (recomputing the softmax) on the unpadded values, then
//   the chain rule through u, RoPE and the five projections.
//
// Strategies (T 300, d 64, H 2, B 16, 2 shared cores; docs/selective.md):
//   | strategy                                         | effect (1 thread,
//   loaded machine)    |
//   |--------------------------------------------------|--------------------------------------|
//   | Highway foreach_target around auto-vectorized    | materialized 1.8×
//   (SSE2 → AVX-512)   | |   loops (the build has no -march=native)         | |
//   | linear(): transposed weights, axpy rows, not dots| fused forward 0.079 →
//   0.054 s         | | backward: per-head packed kᵀ, vᵀ, loops over j   |
//   fused backward 0.32 → 0.24 s          | | backward: 4 query rows share each
//   kᵀ/vᵀ load     | 1.4× over 1 row (8 rows: no better)   | | materialized:
//   causal pairs only (j ≤ i)          | 2× fewer pairs than the seed's dense |
//   | fused: sdpa kernel reuse, v padded to 2·dh       | P·V at 2·dh: +50%
//   attention FLOPs     |
#include "impls/cpu/selective.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "impls/cpu/sdpa.hpp"

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

float load(const void* p, DType t, int64_t i) {
  return t == DType::bf16 ? to_float(static_cast<const bf16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

/// dst (rows, cols) dense f32 ← src with row stride `ld` (elements of dtype t).
void load_rows(float* dst, const void* src, DType t, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = load(src, t, r * ld + c);
}

/// x or dout (B, T, d) with strides → dense (B·T, d) f32.
void load_btd(float* dst, const void* src, DType t, const SelectiveParams& p, SelectiveStrides s) {
#pragma omp parallel for
  for (int64_t bt = 0; bt < p.B * p.T; ++bt) {
    const int64_t b = bt / p.T, i = bt % p.T;
    for (int64_t c = 0; c < p.d; ++c) dst[bt * p.d + c] = load(src, t, b * s.b + i * s.t + c);
  }
}

/// Y (rows, out) = X (rows, in) Wᵀ, W (out, in) with row stride ldw. W is first
/// transposed into wt (in, out) so that each output row is `in` unit-stride
/// axpys over `out` (no horizontal sums; the row stays in L1). Parallel over
/// rows.
void linear(float* Y, const float* X, const float* W, int64_t ldw, int64_t rows, int64_t out, int64_t in, float* wt,
            int threads) {
  for (int64_t o = 0; o < out; ++o)
    for (int64_t c = 0; c < in; ++c) wt[c * out + o] = W[o * ldw + c];
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    float* y = Y + r * out;
    const float* xr = X + r * in;
    std::fill(y, y + out, 0.0f);
    for (int64_t c = 0; c < in; ++c) {
      const float a = xr[c];
      const float* w = wt + c * out;
#pragma omp simd
      for (int64_t o = 0; o < out; ++o) y[o] += a * w[o];
    }
  }
}

/// dX (rows, in) += dY (rows, out) W, W (out, in) with row stride ldw.
void linear_dx(float* dX, const float* dY, const float* W, int64_t ldw, int64_t rows, int64_t out, int64_t in,
               int threads) {
#pragma omp parallel for num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    float* dx = dX + r * in;
    for (int64_t o = 0; o < out; ++o) {
      const float g = dY[r * out + o];
      const float* w = W + o * ldw;
#pragma omp simd
      for (int64_t c = 0; c < in; ++c) dx[c] += g * w[c];
    }
  }
}

/// dW (out, in) with row stride lddw += dYᵀ X: dY (rows, out), X (rows, in).
/// Each thread owns a range of output rows and walks X in chunks of 64 rows
/// (16 KB at in = 64) so the chunk is reused from L1 by every output row.
void linear_dw(float* dW, int64_t lddw, const float* dY, const float* X, int64_t rows, int64_t out, int64_t in,
               int threads) {
  constexpr int64_t kChunk = 64;
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = out * t / nt, hi = out * (t + 1) / nt;
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
      const int64_t r1 = std::min(rows, r0 + kChunk);
      for (int64_t o = lo; o < hi; ++o) {
        float* dw = dW + o * lddw;
        for (int64_t r = r0; r < r1; ++r) {
          const float g = dY[r * out + o];
          const float* x = X + r * in;
#pragma omp simd
          for (int64_t c = 0; c < in; ++c) dw[c] += g * x[c];
        }
      }
    }
  }
}

/// cos/sin tables (T, dh/2): θ_t = 10000^(−2t/dh), angles in double.
void rope_table(float* cs, float* sn, int64_t T, int64_t dh) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t t = 0; t < half; ++t) {
      const double a = double(i) * std::pow(10000.0, -double(2 * t) / double(dh));
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

/// Scratch of the fused form (forward and backward share the front part).
struct Fused {
  int64_t dh = 0, half = 0, Dk = 0, BT = 0;
  size_t bytes = 0;  // scratch the layout needs
  float gamma = 1;   // q' carries √(Dk/dh) so that sdpa's 1/√Dk is 1/√dh
  float *X, *Wq, *Wk, *Wv, *cs, *sn,
      *wt;                      // wt: a transposed (d, d) weight block for linear()
  float *Q, *A, *KB, *CQ, *VD;  // (BT, d): q, A q, B x, C q, D x
  float *q2, *k2, *v2,
      *o2;  // (BT, H, Dk) augmented (RoPE only; v2/o2 forward only)
  void* sdpa_scratch = nullptr;
  // backward
  float *dO, *dq2, *dKB, *dVD, *dQ, *dA, *dX;
  float* pack = nullptr;  // per thread: one head's q, kᵀ, vᵀ, do, dq, dkᵀ, dvᵀ
                          // and two rows
  size_t per_thread = 0;
};

SdpaParams fused_sdpa_params(const SelectiveParams& p, const Fused& f) {
  SdpaParams s;
  s.B = p.B, s.H = s.Hkv = p.H, s.Nq = s.Nkv = p.T, s.D = f.Dk;
  s.causal = true;
  s.rope = SdpaRope::none;
  s.dtype = DType::f32;
  if (p.rope) {
    s.q_strides = s.k_strides = s.v_strides = s.o_strides = {p.T * p.H * f.Dk, f.Dk, p.H * f.Dk};
  } else {
    s.q_strides = s.k_strides = s.v_strides = {p.T * p.d, f.dh, p.d};
    s.o_strides = {p.o_strides.b, f.dh, p.o_strides.t};
  }
  return s;
}

Fused fused_layout(const SelectiveParams& p, int threads, bool backward, char* base) {
  Fused f;
  Carve c{base};
  f.dh = p.d / p.H, f.half = f.dh / 2, f.Dk = p.rope ? 2 * f.dh : f.dh, f.BT = p.B * p.T;
  f.gamma = p.rope ? std::sqrt(2.0f) : 1.0f;
  const size_t bt = size_t(f.BT), d = size_t(p.d);
  f.X = c.take(bt * d), f.Wq = c.take(d * d), f.Wk = c.take(2 * d * d), f.Wv = c.take(2 * d * d);
  f.cs = c.take(size_t(p.T * f.half) + 1), f.sn = c.take(size_t(p.T * f.half) + 1), f.wt = c.take(d * d);
  f.Q = c.take(bt * d), f.A = c.take(bt * d), f.KB = c.take(bt * d), f.CQ = c.take(bt * d), f.VD = c.take(bt * d);
  const size_t aug = size_t(f.BT * p.H * f.Dk);
  f.q2 = f.k2 = f.v2 = f.o2 = nullptr;
  if (p.rope) {
    f.q2 = c.take(aug), f.k2 = c.take(aug);
    if (!backward) f.v2 = c.take(aug), f.o2 = c.take(aug);
  }
  if (!backward) {
    f.sdpa_scratch = c.take_bytes(sdpa_forward_fused_scratch_bytes(fused_sdpa_params(p, f), threads));
  } else {
    f.dO = c.take(bt * d), f.dq2 = c.take(aug), f.dKB = c.take(bt * d), f.dVD = c.take(bt * d);
    f.dQ = c.take(bt * d), f.dA = c.take(bt * d), f.dX = c.take(bt * d);
    f.per_thread = (size_t(p.T * (3 * f.Dk + 4 * f.dh + 8)) + 15) & ~size_t(15);
    f.pack = c.take(f.per_thread * size_t(threads));
  }
  f.bytes = c.off;
  return f;
}

/// Projections and the augmented queries/keys shared by forward and backward.
void fused_prepare(const SelectiveParams& p, Fused& f, int threads) {
  const int64_t d = p.d, H = p.H, dh = f.dh, half = f.half, Dk = f.Dk;
  load_btd(f.X, p.x, p.dtype, p, p.x_strides);
  load_rows(f.Wq, p.wq, p.dtype, d, d, d);
  load_rows(f.Wk, p.wk, p.dtype, d, 2 * d, 2 * d);
  load_rows(f.Wv, p.wv, p.dtype, d, 2 * d, 2 * d);
  linear(f.Q, f.X, f.Wq, d, f.BT, d, d, f.wt, threads);
  linear(f.KB, f.X, f.Wk + d, 2 * d, f.BT, d, d, f.wt, threads);
  linear(f.CQ, f.Q, f.Wv, 2 * d, f.BT, d, d, f.wt, threads);
  linear(f.VD, f.X, f.Wv + d, 2 * d, f.BT, d, d, f.wt, threads);
  if (!p.rope) return;
  linear(f.A, f.Q, f.Wk, 2 * d, f.BT, d, d, f.wt, threads);
  rope_table(f.cs, f.sn, p.T, dh);
#pragma omp parallel for num_threads(threads)
  for (int64_t bt = 0; bt < f.BT; ++bt) {
    const int64_t i = bt % p.T;
    const float* cs = f.cs + i * half;
    const float* sn = f.sn + i * half;
    for (int64_t h = 0; h < H; ++h) {
      const float* q = f.Q + bt * d + h * dh;
      const float* a = f.A + bt * d + h * dh;
      const float* kb = f.KB + bt * d + h * dh;
      float* q2 = f.q2 + (bt * H + h) * Dk;
      float* k2 = f.k2 + (bt * H + h) * Dk;
      for (int64_t t = 0; t < half; ++t) {
        const float c = cs[t], s = sn[t];
        const float q1 = q[t], qh = q[t + half], a1 = a[t], ah = a[t + half];
        // R_i q_i and R_j b_j (this row is both query i and key j = i).
        q2[t] = f.gamma * (q1 * c - qh * s);
        q2[t + half] = f.gamma * (qh * c + q1 * s);
        k2[t] = kb[t] * c - kb[t + half] * s;
        k2[t + half] = kb[t + half] * c + kb[t] * s;
        // u_i: the A q_i term's per-query factor; c_j: its per-key factor.
        const float P = q1 * a1 + qh * ah, Qt = qh * a1 - q1 * ah;
        q2[dh + t] = f.gamma * (P * c - Qt * s);
        q2[dh + t + half] = f.gamma * (P * s + Qt * c);
        k2[dh + t] = c;
        k2[dh + t + half] = s;
      }
    }
  }
}

/// Backward of o'_i = Σ_{j ≤ i} softmax_j(scale q_i·k_j) v_j for one (b, h),
/// recomputing the softmax. Operands packed per head so that every inner loop
/// runs over the keys j (unit stride): q (T, Dk) and dout (T, dh) by rows, kt
/// (Dk, T) and vt (dh, T) transposed. R query rows at a time share each load
/// of kt, vt, dkt and dvt (R = 4: 1.4× faster than R = 1 here, R = 8 no better;
/// keys past a row's causal end get p = 0). dq (T, Dk) is overwritten; dkt
/// (dkn, T) and dvt (dh, T), the transposed gradients of the first dkn key dims
/// and of v, are accumulated. rows: 2·4·T floats.
template <int R>
void attention_backward_tile(int64_t T, int64_t Dk, int64_t dh, int64_t dkn, float scale, int64_t i0, const float* q,
                             const float* kt, const float* vt, const float* dout, float* dq, float* dkt, float* dvt,
                             float* rows) {
  const int64_t n = i0 + R;  // keys any row of the tile sees
  float* pr = rows;          // (R, T) probabilities
  float* ds = rows + R * T;  // (R, T) dp, then ds
  std::fill(pr, pr + R * T, 0.0f);
  std::fill(ds, ds + R * T, 0.0f);
  for (int64_t c = 0; c < Dk; ++c) {
    float a[R];
    for (int r = 0; r < R; ++r) a[r] = q[(i0 + r) * Dk + c];
    const float* k = kt + c * T;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) pr[r * T + j] += a[r] * k[j];
  }
  for (int64_t e = 0; e < dh; ++e) {
    float a[R];
    for (int r = 0; r < R; ++r) a[r] = dout[(i0 + r) * dh + e];
    const float* v = vt + e * T;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) ds[r * T + j] += a[r] * v[j];
  }
  for (int r = 0; r < R; ++r) {
    float* p = pr + r * T;
    float* g = ds + r * T;
    const int64_t nr = i0 + r + 1;  // row i0 + r sees keys j ≤ i0 + r
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < nr; ++j) m = std::max(m, p[j]);
    float sum = 0;
    for (int64_t j = 0; j < nr; ++j) sum += (p[j] = std::exp(scale * (p[j] - m)));
    const float inv = 1.0f / sum;
    float Di = 0;
    for (int64_t j = 0; j < nr; ++j) Di += (p[j] *= inv) * g[j];
#pragma omp simd
    for (int64_t j = 0; j < nr; ++j) g[j] = p[j] * (g[j] - Di) * scale;
    for (int64_t j = nr; j < n; ++j) p[j] = g[j] = 0.0f;
  }
  for (int64_t c = 0; c < Dk; ++c) {
    const float* k = kt + c * T;
    float acc[R] = {};
#pragma omp simd reduction(+ : acc[:R])
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) acc[r] += ds[r * T + j] * k[j];
    for (int r = 0; r < R; ++r) dq[(i0 + r) * Dk + c] = acc[r];
  }
  for (int64_t c = 0; c < dkn; ++c) {
    float a[R];
    for (int r = 0; r < R; ++r) a[r] = q[(i0 + r) * Dk + c];
    float* g = dkt + c * T;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) g[j] += a[r] * ds[r * T + j];
  }
  for (int64_t e = 0; e < dh; ++e) {
    float a[R];
    for (int r = 0; r < R; ++r) a[r] = dout[(i0 + r) * dh + e];
    float* g = dvt + e * T;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) g[j] += a[r] * pr[r * T + j];
  }
}

void attention_backward_head(int64_t T, int64_t Dk, int64_t dh, int64_t dkn, float scale, const float* q,
                             const float* kt, const float* vt, const float* dout, float* dq, float* dkt, float* dvt,
                             float* rows) {
  int64_t i0 = 0;
  for (; i0 + 4 <= T; i0 += 4)
    attention_backward_tile<4>(T, Dk, dh, dkn, scale, i0, q, kt, vt, dout, dq, dkt, dvt, rows);
  for (; i0 < T; ++i0) attention_backward_tile<1>(T, Dk, dh, dkn, scale, i0, q, kt, vt, dout, dq, dkt, dvt, rows);
}

// --------------------------------------------------------- materialized ----

struct Materialized {
  float *X, *Wq, *Wk, *Wv, *WkT, *WvT, *cs, *sn, *Q, *wt;
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
  m.wt = c.take(d * d);
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
  linear(m.Q, m.X, m.Wq, d, p.B * p.T, d, d, m.wt, threads);
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

size_t ForwardFusedBytes(const SelectiveParams& p, int threads) {
  return fused_layout(p, threads, false, nullptr).bytes;
}
size_t BackwardFusedBytes(const SelectiveParams& p, int threads) {
  return fused_layout(p, threads, true, nullptr).bytes;
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

void ForwardFused(const SelectiveParams& p, void* scratch, int threads) {
  Fused f = fused_layout(p, threads, false, static_cast<char*>(scratch));
  fused_prepare(p, f, threads);
  SdpaParams s = fused_sdpa_params(p, f);
  const int64_t d = p.d, H = p.H, dh = f.dh, Dk = f.Dk;
  if (p.rope) {
    // v padded with zeros to Dk (the sdpa kernel has one head dimension).
#pragma omp parallel for num_threads(threads)
    for (int64_t bt = 0; bt < f.BT; ++bt)
      for (int64_t h = 0; h < H; ++h) {
        float* v2 = f.v2 + (bt * H + h) * Dk;
        std::memcpy(v2, f.VD + bt * d + h * dh, size_t(dh) * sizeof(float));
        std::fill(v2 + dh, v2 + Dk, 0.0f);
      }
    s.q = f.q2, s.k = f.k2, s.v = f.v2, s.o = f.o2;
  } else {
    s.q = f.Q, s.k = f.KB, s.v = f.VD,
    s.o = p.o;  // plain attention straight into o
  }
  sdpa_forward_fused(s, f.sdpa_scratch, threads);
  // o_i = C q_i + Σ_j p_ij D x_j.
#pragma omp parallel for num_threads(threads)
  for (int64_t bt = 0; bt < f.BT; ++bt) {
    float* o = p.o + (bt / p.T) * p.o_strides.b + (bt % p.T) * p.o_strides.t;
    const float* cq = f.CQ + bt * d;
    if (p.rope) {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < dh; ++e) o[h * dh + e] = cq[h * dh + e] + f.o2[(bt * H + h) * Dk + e];
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] += cq[c];
    }
  }
}

void BackwardFused(const SelectiveParams& p, void* scratch, int threads) {
  Fused f = fused_layout(p, threads, true, static_cast<char*>(scratch));
  fused_prepare(p, f, threads);
  const int64_t d = p.d, H = p.H, T = p.T, dh = f.dh, half = f.half, Dk = f.Dk, BT = f.BT;
  const size_t n = size_t(BT * d);
  load_btd(f.dO, p.dout, p.dtype, p, p.dout_strides);
  // Attention backward per (b, h) on q', k' (Dk) and D x (dh): dq', d(R b), d(D
  // x).
  const float* q = p.rope ? f.q2 : f.Q;
  const float* k = p.rope ? f.k2 : f.KB;
  const int64_t ldq = p.rope ? H * Dk : d;
  const float scale = 1.0f / std::sqrt(float(Dk));
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t bh = 0; bh < p.B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t qoff = p.rope ? (b * T * H + h) * Dk : b * T * d + h * dh;
    const int64_t voff = b * T * d + h * dh;
    float* qh = f.pack + f.per_thread * size_t(omp_get_thread_num());
    float* kt = qh + T * Dk;
    float* vt = kt + Dk * T;
    float* doh = vt + dh * T;
    float* dqh = doh + T * dh;
    float* dkt = dqh + T * Dk;
    float* dvt = dkt + dh * T;
    float* rows = dvt + dh * T;
    for (int64_t j = 0; j < T; ++j) {
      for (int64_t c = 0; c < Dk; ++c) {
        qh[j * Dk + c] = q[qoff + j * ldq + c];
        kt[c * T + j] = k[qoff + j * ldq + c];
      }
      for (int64_t e = 0; e < dh; ++e) {
        vt[e * T + j] = f.VD[voff + j * d + e];
        doh[j * dh + e] = f.dO[voff + j * d + e];
      }
    }
    std::fill(dkt, dkt + 2 * dh * T, 0.0f);  // dkt and dvt
    attention_backward_head(T, Dk, dh, dh, scale, qh, kt, vt, doh, dqh, dkt, dvt, rows);
    for (int64_t j = 0; j < T; ++j) {
      std::memcpy(f.dq2 + qoff + j * ldq, dqh + j * Dk, size_t(Dk) * sizeof(float));
      for (int64_t e = 0; e < dh; ++e) {
        f.dKB[voff + j * d + e] = dkt[e * T + j];
        f.dVD[voff + j * d + e] = dvt[e * T + j];
      }
    }
  }
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
        const float* qh = f.Q + bt * d + h * dh;
        const float* ah = f.A + bt * d + h * dh;
        float* dq = f.dQ + bt * d + h * dh;
        float* da = f.dA + bt * d + h * dh;
        float* dkb = f.dKB + bt * d + h * dh;
        for (int64_t t = 0; t < half; ++t) {
          const float c = cs[t], s = sn[t];
          const float g1 = f.gamma * dq2[t], g2 = f.gamma * dq2[t + half];
          const float u1 = f.gamma * dq2[dh + t], u2 = f.gamma * dq2[dh + t + half];
          const float q1 = qh[t], q2 = qh[t + half], a1 = ah[t], a2 = ah[t + half];
          const float dP = u1 * c + u2 * s, dQt = -u1 * s + u2 * c;
          dq[t] = g1 * c + g2 * s + dP * a1 - dQt * a2;  // R_iᵀ dq' + ∂u/∂q
          dq[t + half] = -g1 * s + g2 * c + dP * a2 + dQt * a1;
          da[t] = dP * q1 + dQt * q2;
          da[t + half] = dP * q2 - dQt * q1;
          const float k1 = dkb[t], k2 = dkb[t + half];
          dkb[t] = k1 * c + k2 * s;
          dkb[t + half] = -k1 * s + k2 * c;
        }
      }
    }
  } else {
    std::memcpy(f.dQ, f.dq2,
                n * sizeof(float));  // dq2 laid out like Q without RoPE
  }
  // The five projections: a = A q, b = B x, Cq, D x, q = wq x.
  std::fill(p.dwq, p.dwq + d * d, 0.0f);
  std::fill(p.dwk, p.dwk + 2 * d * d, 0.0f);
  std::fill(p.dwv, p.dwv + 2 * d * d, 0.0f);
  std::fill(f.dX, f.dX + n, 0.0f);
  if (p.rope) {
    linear_dx(f.dQ, f.dA, f.Wk, 2 * d, BT, d, d, threads);
    linear_dw(p.dwk, 2 * d, f.dA, f.Q, BT, d, d, threads);
  }
  linear_dx(f.dQ, f.dO, f.Wv, 2 * d, BT, d, d, threads);
  linear_dw(p.dwv, 2 * d, f.dO, f.Q, BT, d, d, threads);
  linear_dw(p.dwk + d, 2 * d, f.dKB, f.X, BT, d, d, threads);
  linear_dw(p.dwv + d, 2 * d, f.dVD, f.X, BT, d, d, threads);
  linear_dw(p.dwq, d, f.dQ, f.X, BT, d, d, threads);
  linear_dx(f.dX, f.dKB, f.Wk + d, 2 * d, BT, d, d, threads);
  linear_dx(f.dX, f.dVD, f.Wv + d, 2 * d, BT, d, d, threads);
  linear_dx(f.dX, f.dQ, f.Wq, d, BT, d, d, threads);
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
  linear_dw(p.dwq, d, m.dQ, m.X, BT, d, d, threads);
  linear_dx(m.dX, m.dQ, m.Wq, d, BT, d, d, threads);
  for (int64_t bt = 0; bt < BT; ++bt)
    std::memcpy(p.dx + (bt / T) * p.dx_strides.b + (bt % T) * p.dx_strides.t, m.dX + bt * d, size_t(d) * sizeof(float));
}

}  // namespace attnbench::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace attnbench::cpu {

HWY_EXPORT(ForwardFusedBytes);
HWY_EXPORT(BackwardFusedBytes);
HWY_EXPORT(ForwardMaterializedBytes);
HWY_EXPORT(BackwardMaterializedBytes);
HWY_EXPORT(ForwardFused);
HWY_EXPORT(BackwardFused);
HWY_EXPORT(ForwardMaterialized);
HWY_EXPORT(BackwardMaterialized);

namespace {
void check(const SelectiveParams& p, const char* who) {
  if (p.dtype != DType::f32 && p.dtype != DType::bf16)
    throw std::invalid_argument(std::string(who) + ": x and the weights must be f32 or bf16");
  if (p.H < 1 || p.d % p.H != 0 || (p.rope && (p.d / p.H) % 2 != 0))
    throw std::invalid_argument(std::string(who) + ": d must be a multiple of H (d / H even with RoPE)");
}
}  // namespace

size_t selective_forward_fused_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(ForwardFusedBytes)(p, std::max(1, threads));
}
size_t selective_backward_fused_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(BackwardFusedBytes)(p, std::max(1, threads));
}
size_t selective_forward_materialized_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(ForwardMaterializedBytes)(p, std::max(1, threads));
}
size_t selective_backward_materialized_scratch_bytes(const SelectiveParams& p, int threads) {
  return HWY_DYNAMIC_DISPATCH(BackwardMaterializedBytes)(p, std::max(1, threads));
}
void selective_forward_fused(const SelectiveParams& p, void* scratch, int threads) {
  check(p, "selective_forward_fused");
  HWY_DYNAMIC_DISPATCH(ForwardFused)(p, scratch, std::max(1, threads));
}
void selective_backward_fused(const SelectiveParams& p, void* scratch, int threads) {
  check(p, "selective_backward_fused");
  HWY_DYNAMIC_DISPATCH(BackwardFused)(p, scratch, std::max(1, threads));
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
