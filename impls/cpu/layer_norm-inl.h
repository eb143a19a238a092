// Row-wise LayerNorm forward and backward and column sums over many rows, for the CPU kernels
// whose activations are [rows, channels] matrices (impls/cpu/trimul.cpp, impls/cpu/transition.cpp).
// LayerNorm as torch.nn.LayerNorm: biased variance, eps 1e-5 inside the square root. The
// gradients of the affine parameters (and any column sum over the rows, e.g. a bias gradient)
// accumulate in double: a sum over N² rows in f32 lost up to ~14 ulps at N 33 (docs/trimul.md).
//
// Per-target header (Highway's foreach_target pattern): include it after "hwy/highway.h" from a
// file compiled with HWY_TARGET_INCLUDE; the code lives in attnbench::cpu_rows::HWY_NAMESPACE.
#if defined(ATTNBENCH_IMPLS_CPU_LAYER_NORM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTNBENCH_IMPLS_CPU_LAYER_NORM_INL_H_
#undef ATTNBENCH_IMPLS_CPU_LAYER_NORM_INL_H_
#else
#define ATTNBENCH_IMPLS_CPU_LAYER_NORM_INL_H_
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "harness/dtype.hpp"

HWY_BEFORE_NAMESPACE();
namespace attnbench::cpu_rows::HWY_NAMESPACE {

inline constexpr float kLayerNormEps = 1e-5f;

/// Mean and 1/σ of n floats, in double (two passes, biased variance). With f32 moments
/// and normalization the LayerNorm'd rows were the largest single error source of trimul's
/// CPU forward: 2–3× the error of the naive f32 reference at N 7, c_z 12 (docs/trimul.md).
inline void Moments(const float* v, int64_t n, double& mean, double& rstd) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += double(v[k]);
  mean = s / double(n);
  double q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t k = 0; k < n; ++k) q += (double(v[k]) - mean) * (double(v[k]) - mean);
  rstd = 1.0 / std::sqrt(q / double(n) + double(kLayerNormEps));
}

/// y = LayerNorm(x) ⊙ gamma + beta over the rows of x (`src` of dtype `st`, f32 or 16-bit,
/// rows × cols contiguous), OpenMP over rows, each row normalized in double and rounded
/// once; keeps each row's mean and 1/σ.
inline void LayerNormRows(const void* src, DType st, int64_t rows, int64_t cols, const float* gamma, const float* beta,
                          float* y, float* mean, float* rstd, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * cols;
    for (int64_t k = 0; k < cols; ++k) yr[k] = load_float(src, st, r * cols + k);
    double m, rs;
    Moments(yr, cols, m, rs);
    mean[r] = float(m);
    rstd[r] = float(rs);
#pragma omp simd
    for (int64_t k = 0; k < cols; ++k) yr[k] = float((double(yr[k]) - m) * rs * double(gamma[k]) + double(beta[k]));
  }
}

/// out[k] = Σ_r x[r·ld + k] (cols), summed in double: per-thread partial rows in `part`
/// (threads × cols doubles), then added in thread order (deterministic for a thread count).
inline void ColumnSums(const float* x, int64_t rows, int64_t cols, int64_t ld, double* part, float* out, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    double* p = part + t * cols;
    std::fill(p, p + cols, 0.0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ld;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) p[k] += xr[k];
    }
#pragma omp single
    for (int64_t k = 0; k < cols; ++k) {
      double s = 0;
      for (int u = 0; u < nt; ++u) s += part[u * cols + k];
      out[k] = float(s);
    }
  }
}

/// Where the backward reads the normalized input n of row r: a kept [rows, cols] matrix, or
/// (when `n` is null) recomputed from the forward's input `src` (dtype `st`) and its moments.
struct NormalizedRows {
  const float* n = nullptr;
  const void* src = nullptr;
  DType st = DType::f32;
  const float* mean = nullptr;
};

/// LayerNorm backward over the rows of dy, in place (dy becomes dx), from n (see
/// NormalizedRows) and 1/σ per row; dw, db = Σ_r dy ⊙ n, Σ_r dy, summed in double. `part`:
/// threads × 2·cols doubles; `nbufs`: a row of cols floats per thread, nbuf_stride apart
/// (used only when n is recomputed).
inline void LayerNormBackwardRows(float* dy, const NormalizedRows& nr, const float* rstd, const float* gamma,
                                  int64_t rows, int64_t cols, double* part, float* dw, float* db, float* nbufs,
                                  int64_t nbuf_stride, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    double* pw = part + t * 2 * cols;
    double* pb = pw + cols;
    std::fill(pw, pw + 2 * cols, 0.0);
    float* nbuf = nbufs + t * nbuf_stride;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* g = dy + r * cols;
      const float* n = nr.n ? nr.n + r * cols : nbuf;
      if (!nr.n)
        for (int64_t k = 0; k < cols; ++k)
          nbuf[k] = float((double(load_float(nr.src, nr.st, r * cols + k)) - double(nr.mean[r])) * double(rstd[r]));
      float s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t k = 0; k < cols; ++k) {
        pw[k] += double(g[k]) * double(n[k]);
        pb[k] += double(g[k]);
        const float dn = g[k] * gamma[k];
        s1 += dn;
        s2 += dn * n[k];
      }
      const float m1 = s1 / float(cols), m2 = s2 / float(cols), rs = rstd[r];
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) g[k] = rs * (g[k] * gamma[k] - m1 - n[k] * m2);
    }
#pragma omp single
    for (int64_t k = 0; k < cols; ++k) {
      double a = 0, b = 0;
      for (int u = 0; u < nt; ++u) {
        a += part[u * 2 * cols + k];
        b += part[u * 2 * cols + cols + k];
      }
      dw[k] = float(a);
      db[k] = float(b);
    }
  }
}

}  // namespace attnbench::cpu_rows::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTNBENCH_IMPLS_CPU_LAYER_NORM_INL_H_
