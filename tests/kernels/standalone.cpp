// The kernel library on its own (CMake target attnbench_kernels, nothing of
// the harness linked): a trainer's view. Calls the fused CPU SDPA forward
// (saving the log-sum-exp) and backward on raw pointers with caller-owned
// scratch and compares them with a direct softmax(q·kᵀ/√D)·v and its gradients
// computed here in double. Exit 0 when they agree.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "impls/cpu/sdpa.hpp"

int main() {
  using namespace attnbench;
  const int64_t B = 1, H = 2, N = 37, D = 24;
  std::vector<float> q(size_t(B * H * N * D)), k(q.size()), v(q.size()), o(q.size());
  uint32_t state = 12345;
  auto uniform = [&] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / float(1 << 24) - 0.5f;
  };
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = uniform();

  SdpaParams p;
  p.B = B, p.H = H, p.Hkv = H, p.Nq = N, p.Nkv = N, p.D = D;
  p.causal = true;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data();
  p.q_strides = p.k_strides = p.v_strides = p.o_strides = sdpa_dense_strides(H, N, D);
  std::vector<float> lse(size_t(B * H * N)), dout(q.size()), dq(q.size()), dk(q.size()), dv(q.size());
  for (float& e : dout) e = uniform();
  p.lse = lse.data();
  SdpaBackwardParams b;
  b.fwd = p;
  b.dout = dout.data(), b.dq = dq.data(), b.dk = dk.data(), b.dv = dv.data();
  b.do_strides = b.dq_strides = b.dk_strides = b.dv_strides = p.q_strides;
  const int threads = 2;
  const size_t bytes =
      std::max(cpu::sdpa_forward_fused_scratch_bytes(p, threads), cpu::sdpa_backward_fused_scratch_bytes(b, threads));
  void* scratch = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  cpu::sdpa_forward_fused(p, scratch, threads);
  cpu::sdpa_backward_fused(b, scratch, threads);
  std::free(scratch);

  // Direct: P = softmax(S), o = P·v; dP = dO·vᵀ, dS = P ∘ (dP − Σ_j P dP), dq = dS·k/√D,
  // dk = dSᵀ·q/√D, dv = Pᵀ·dO (causal: key j ≤ query i).
  double worst = 0, worst_grad = 0;
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> gq(q.size()), gk(q.size()), gv(q.size());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < N; ++i) {
      const float* qi = &q[size_t((h * N + i) * D)];
      const float* gi = &dout[size_t((h * N + i) * D)];
      std::vector<double> s(size_t(i + 1)), dp(size_t(i + 1));
      double m = -INFINITY, l = 0, delta = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0, g = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += double(qi[d]) * k[size_t((h * N + j) * D + d)];
          g += double(gi[d]) * v[size_t((h * N + j) * D + d)];
        }
        s[size_t(j)] = dot * scale;
        dp[size_t(j)] = g;
        m = std::max(m, s[size_t(j)]);
      }
      for (auto& x : s) l += (x = std::exp(x - m));
      for (auto& x : s) x /= l;  // P
      for (int64_t j = 0; j <= i; ++j) delta += s[size_t(j)] * dp[size_t(j)];
      worst = std::max(worst, std::abs(m + std::log(l) - lse[size_t(h * N + i)]));
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += s[size_t(j)] * v[size_t((h * N + j) * D + d)];
        worst = std::max(worst, std::abs(acc - o[size_t((h * N + i) * D + d)]));
      }
      for (int64_t j = 0; j <= i; ++j) {
        const double ds = s[size_t(j)] * (dp[size_t(j)] - delta);
        for (int64_t d = 0; d < D; ++d) {
          gq[size_t((h * N + i) * D + d)] += ds * scale * k[size_t((h * N + j) * D + d)];
          gk[size_t((h * N + j) * D + d)] += ds * scale * qi[d];
          gv[size_t((h * N + j) * D + d)] += s[size_t(j)] * gi[d];
        }
      }
    }
  for (size_t x = 0; x < q.size(); ++x)
    worst_grad = std::max({worst_grad, std::abs(gq[x] - dq[x]), std::abs(gk[x] - dk[x]), std::abs(gv[x] - dv[x])});
  std::printf("kernel library standalone: sdpa_forward_fused (o, lse) max_abs %.3g, sdpa_backward_fused max_abs %.3g\n",
              worst, worst_grad);
  return worst < 1e-5 && worst_grad < 1e-5 ? 0 : 1;
}
