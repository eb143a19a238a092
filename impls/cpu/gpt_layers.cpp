// The tiny GPT's layers: impls/cpu/gpt_layers.hpp has the contracts.
//
// Linear layers in f32 run on the kernels' register-blocked GEMM
// (impls/cpu/gemm.hpp, dispatched to the machine's widest SIMD target): y and
// dx over chunks of rows, dW with the sum over rows split over the threads and
// added in a fixed order, so the result depends only on the shapes and the
// thread count. The f64 oracle's use Eigen's GEMM on one fixed, contiguous
// partition per OpenMP thread (this build compiles Eigen for the baseline
// x86-64 target, SSE2: 22 GFLOP/s on the seed's FFN shape, docs/train.md).
#include "impls/cpu/gpt_layers.hpp"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "impls/cpu/gemm.hpp"

namespace attnbench::gpt {
namespace {

template <class Real>
using Mat = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Real>
using Map = Eigen::Map<Mat<Real>>;
template <class Real>
using CMap = Eigen::Map<const Mat<Real>>;

/// [lo, hi) of `n` items for thread `t` of `nt`.
inline void chunk(int64_t n, int t, int nt, int64_t& lo, int64_t& hi) {
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

inline int clamp_threads(int threads, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(threads < 1 ? 1 : threads, work)));
}

}  // namespace

template <class Real>
void linear_forward(Real* y, const Real* x, const Real* W, int64_t N, int64_t in, int64_t out, int threads) {
  const CMap<Real> Wm(W, out, in);
#pragma omp parallel num_threads(clamp_threads(threads, N))
  {
    int64_t lo, hi;
    chunk(N, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    if (hi > lo) {
      Map<Real> Y(y + lo * out, hi - lo, out);
      const CMap<Real> X(x + lo * in, hi - lo, in);
      Y.noalias() = X * Wm.transpose();
    }
  }
}

template <class Real>
void linear_backward(Real* dx, Real* dW, const Real* dy, const Real* x, const Real* W, int64_t N, int64_t in,
                     int64_t out, bool accumulate_dx, int threads) {
  const CMap<Real> Wm(W, out, in), DY(dy, N, out), X(x, N, in);
#pragma omp parallel num_threads(clamp_threads(threads, std::max(N, out)))
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo, hi;
    if (dx) {
      chunk(N, t, nt, lo, hi);
      if (hi > lo) {
        Map<Real> DX(dx + lo * in, hi - lo, in);
        const CMap<Real> DYc(dy + lo * out, hi - lo, out);
        if (accumulate_dx)
          DX.noalias() += DYc * Wm;
        else
          DX.noalias() = DYc * Wm;
      }
    }
    if (dW) {
      chunk(out, t, nt, lo, hi);
      if (hi > lo) {
        Map<Real> DW(dW + lo * in, hi - lo, in);
        DW.noalias() = DY.middleCols(lo, hi - lo).transpose() * X;
      }
    }
  }
}

template <>
void linear_forward<float>(float* y, const float* x, const float* W, int64_t N, int64_t in, int64_t out,
                           int threads) {
  const int nt = clamp_threads(threads, N);
  const int64_t pack = cpu::gemm_pack_floats(out);
  std::vector<float> packs(size_t(nt * pack));
  cpu::gemm_rows(N, out, in, {x, in, 1}, {W, 1, in}, y, out, false, packs.data(), pack, nt);
}

template <>
void linear_backward<float>(float* dx, float* dW, const float* dy, const float* x, const float* W, int64_t N,
                            int64_t in, int64_t out, bool accumulate_dx, int threads) {
  const int nt = clamp_threads(threads, std::max(N, out));
  const int64_t pack = cpu::gemm_pack_floats(std::max(in, out));
  std::vector<float> scratch(size_t(nt * (pack + out * in)));
  if (dx) cpu::gemm_rows(N, in, out, {dy, out, 1}, {W, in, 1}, dx, in, accumulate_dx, scratch.data(), pack, nt);
  if (dW)
    cpu::gemm_reduce(out, in, N, {dy, 1, out}, {x, in, 1}, dW, in, scratch.data() + nt * pack, scratch.data(), pack,
                     nt);
}

template <class Real>
void layernorm_forward(Real* y, Real* mean, Real* rstd, const Real* x, const Real* g, int64_t N, int64_t C,
                       Real eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N))
  for (int64_t n = 0; n < N; ++n) {
    const Real* xr = x + n * C;
    Real s = 0;
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const Real m = s / Real(C);
    Real v = 0;
    for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
    const Real r = Real(1) / std::sqrt(v / Real(C) + eps);
    Real* yr = y + n * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * r * g[c];
    mean[n] = m;
    rstd[n] = r;
  }
}

template <class Real>
void layernorm_backward(Real* dx, Real* dg, const Real* dy, const Real* x, const Real* mean, const Real* rstd,
                        const Real* g, int64_t N, int64_t C, int threads) {
  // xhat = (x − m) r, y = xhat g: dxhat = dy g,
  // dx = r (dxhat − mean(dxhat) − xhat mean(dxhat xhat)), dg = Σ_n dy xhat.
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N))
  for (int64_t n = 0; n < N; ++n) {
    const Real* xr = x + n * C;
    const Real* dyr = dy + n * C;
    const Real m = mean[n], r = rstd[n];
    Real a = 0, b = 0;
    for (int64_t c = 0; c < C; ++c) {
      const Real xh = (xr[c] - m) * r, dxh = dyr[c] * g[c];
      a += dxh;
      b += dxh * xh;
    }
    a /= Real(C);
    b /= Real(C);
    Real* dxr = dx + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const Real xh = (xr[c] - m) * r;
      dxr[c] = r * (dyr[c] * g[c] - a - xh * b);
    }
  }
  // dg: a fixed serial order over rows (N·C multiply-adds, small next to the GEMMs).
  std::fill(dg, dg + C, Real(0));
  for (int64_t n = 0; n < N; ++n) {
    const Real* xr = x + n * C;
    const Real* dyr = dy + n * C;
    const Real m = mean[n], r = rstd[n];
    for (int64_t c = 0; c < C; ++c) dg[c] += dyr[c] * (xr[c] - m) * r;
  }
}

template <class Real>
void relu_forward(Real* y, const Real* x, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] > Real(0) ? x[i] : Real(0);
}

template <class Real>
void relu_backward(Real* dx, const Real* dy, const Real* x, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > Real(0) ? dy[i] : Real(0);
}

namespace {
template <class Real>
Real sigmoid(Real z) {
  return Real(1) / (Real(1) + std::exp(-z));
}
}  // namespace

template <class Real>
void sigmoid_gate_forward(Real* y, Real* g, const Real* a, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) {
    g[i] = sigmoid(g[i]);
    y[i] = g[i] * a[i];
  }
}

template <class Real>
void sigmoid_gate_backward(Real* da, Real* dpre, const Real* dy, const Real* a, const Real* g, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) {
    const Real d = dy[i];
    dpre[i] = d * a[i] * g[i] * (Real(1) - g[i]);
    da[i] = d * g[i];
  }
}

template <class Real>
void swiglu_forward(Real* y, const Real* h, const Real* u, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) y[i] = h[i] * sigmoid(h[i]) * u[i];
}

template <class Real>
void swiglu_backward(Real* dh, Real* du, const Real* dy, const Real* h, const Real* u, int64_t n, int threads) {
  // silu'(z) = σ(z) (1 + z (1 − σ(z))).
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) {
    const Real d = dy[i], s = sigmoid(h[i]);
    du[i] = d * h[i] * s;
    dh[i] = d * u[i] * s * (Real(1) + h[i] * (Real(1) - s));
  }
}

template <class Real>
void scaled_residual_forward(Real* r, const Real* x, const Real* gamma, const Real* f, int64_t N, int64_t C,
                             int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 64 + 1))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) r[n * C + c] = x[n * C + c] + gamma[c] * f[n * C + c];
}

template <class Real>
void scaled_residual_backward(Real* df, Real* dgamma, const Real* dr, const Real* f, const Real* gamma, int64_t N,
                              int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 64 + 1))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) df[n * C + c] = gamma[c] * dr[n * C + c];
  std::fill(dgamma, dgamma + C, Real(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) dgamma[c] += dr[n * C + c] * f[n * C + c];
}

template <class Real>
void value_mix_forward(Real* v, const Real* vl, const Real* v1, const Real* z, int64_t N, int64_t H, int64_t dh,
                       int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 64 + 1))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const Real m = sigmoid(z[n * H + h]);
      const int64_t o = (n * H + h) * dh;
      for (int64_t c = o; c < o + dh; ++c) v[c] = m * vl[c] + (Real(1) - m) * v1[c];
    }
}

template <class Real>
void value_mix_backward(Real* dvl, Real* dv1, Real* dz, const Real* dv, const Real* vl, const Real* v1, const Real* z,
                        int64_t N, int64_t H, int64_t dh, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 64 + 1))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const Real m = sigmoid(z[n * H + h]);
      const int64_t o = (n * H + h) * dh;
      Real s = 0;
      for (int64_t c = o; c < o + dh; ++c) {
        const Real d = dv[c];
        s += d * (vl[c] - v1[c]);
        dv1[c] += (Real(1) - m) * d;
        dvl[c] = m * d;
      }
      dz[n * H + h] = m * (Real(1) - m) * s;
    }
}

template <class Real>
void embedding_forward(Real* y, const int32_t* tokens, const Real* wte, int64_t N, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 64 + 1))
  for (int64_t n = 0; n < N; ++n) std::copy(wte + int64_t(tokens[n]) * C, wte + int64_t(tokens[n] + 1) * C, y + n * C);
}

template <class Real>
void embedding_backward(Real* dwte, const Real* dy, const int32_t* tokens, int64_t N, int64_t V, int64_t C) {
  std::fill(dwte, dwte + V * C, Real(0));
  for (int64_t n = 0; n < N; ++n) {
    Real* d = dwte + int64_t(tokens[n]) * C;
    const Real* s = dy + n * C;
    for (int64_t c = 0; c < C; ++c) d[c] += s[c];
  }
}

template <class Real>
CrossEntropyStats cross_entropy(Real* dlogits, Real* row_loss, const Real* logits, const int32_t* targets,
                                int64_t N, int64_t V, Real grad_scale, int threads) {
  std::vector<unsigned char> hit(size_t(N), 0);
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, N / 16 + 1))
  for (int64_t n = 0; n < N; ++n) {
    const Real* l = logits + n * V;
    const int32_t t = targets[n];
    if (t < 0) {
      row_loss[n] = 0;
      if (dlogits) std::fill(dlogits + n * V, dlogits + (n + 1) * V, Real(0));
      continue;
    }
    int64_t arg = 0;
    for (int64_t v = 1; v < V; ++v)
      if (l[v] > l[arg]) arg = v;
    const Real mx = l[arg];
    Real s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - mx);
    const Real lse = mx + std::log(s);
    row_loss[n] = lse - l[t];
    hit[size_t(n)] = arg == t;
    if (dlogits) {
      Real* d = dlogits + n * V;
      for (int64_t v = 0; v < V; ++v) d[v] = std::exp(l[v] - lse) * grad_scale;
      d[t] -= grad_scale;
    }
  }
  CrossEntropyStats st;
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] < 0) continue;
    st.loss_sum += double(row_loss[n]);
    ++st.count;
    st.correct += hit[size_t(n)];
  }
  return st;
}

template <class Real>
void adam_update(Real* p, const Real* g, Real* m, Real* v, int64_t n, const AdamParams& a, int threads) {
  const Real b1 = Real(a.beta1), b2 = Real(a.beta2), lr = Real(a.lr), eps = Real(a.eps);
  const Real c1 = Real(1) / Real(1 - std::pow(a.beta1, double(a.step)));
  const Real c2 = Real(1) / Real(1 - std::pow(a.beta2, double(a.step)));
#pragma omp parallel for schedule(static) num_threads(clamp_threads(threads, n / 4096 + 1))
  for (int64_t i = 0; i < n; ++i) {
    m[i] = b1 * m[i] + (Real(1) - b1) * g[i];
    v[i] = b2 * v[i] + (Real(1) - b2) * g[i] * g[i];
    p[i] -= lr * (m[i] * c1) / (std::sqrt(v[i] * c2) + eps);
  }
}

// The f32 linear layers are the explicit specializations above.
template void linear_forward<double>(double*, const double*, const double*, int64_t, int64_t, int64_t, int);
template void linear_backward<double>(double*, double*, const double*, const double*, const double*, int64_t,
                                      int64_t, int64_t, bool, int);

#define ATTNBENCH_GPT_INSTANTIATE(Real)                                                                                \
  template void layernorm_forward<Real>(Real*, Real*, Real*, const Real*, const Real*, int64_t, int64_t, Real, int);   \
  template void layernorm_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*, const Real*,             \
                                         const Real*, int64_t, int64_t, int);                                          \
  template void relu_forward<Real>(Real*, const Real*, int64_t, int);                                                  \
  template void relu_backward<Real>(Real*, const Real*, const Real*, int64_t, int);                                    \
  template void sigmoid_gate_forward<Real>(Real*, Real*, const Real*, int64_t, int);                                   \
  template void sigmoid_gate_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*, int64_t, int);        \
  template void swiglu_forward<Real>(Real*, const Real*, const Real*, int64_t, int);                                   \
  template void swiglu_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*, int64_t, int);              \
  template void scaled_residual_forward<Real>(Real*, const Real*, const Real*, const Real*, int64_t, int64_t, int);    \
  template void scaled_residual_backward<Real>(Real*, Real*, const Real*, const Real*, const Real*, int64_t, int64_t,  \
                                               int);                                                                   \
  template void value_mix_forward<Real>(Real*, const Real*, const Real*, const Real*, int64_t, int64_t, int64_t, int); \
  template void value_mix_backward<Real>(Real*, Real*, Real*, const Real*, const Real*, const Real*, const Real*,      \
                                         int64_t, int64_t, int64_t, int);                                              \
  template void embedding_forward<Real>(Real*, const int32_t*, const Real*, int64_t, int64_t, int);                    \
  template void embedding_backward<Real>(Real*, const Real*, const int32_t*, int64_t, int64_t, int64_t);               \
  template CrossEntropyStats cross_entropy<Real>(Real*, Real*, const Real*, const int32_t*, int64_t, int64_t, Real,    \
                                                 int);                                                                 \
  template void adam_update<Real>(Real*, const Real*, Real*, Real*, int64_t, const AdamParams&, int);

ATTNBENCH_GPT_INSTANTIATE(float)
ATTNBENCH_GPT_INSTANTIATE(double)

}  // namespace attnbench::gpt
