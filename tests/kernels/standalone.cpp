// The kernel library on its own (CMake target attnbench_kernels, nothing of
// the harness linked): a trainer's view. Calls the fused CPU SDPA forward on
// raw pointers with caller-owned scratch and compares it with a direct
// softmax(q·kᵀ/√D)·v computed here in double. Exit 0 when they agree.
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
  const int threads = 2;
  void* scratch = std::aligned_alloc(64, (cpu::sdpa_forward_fused_scratch_bytes(p, threads) + 63) / 64 * 64);
  cpu::sdpa_forward_fused(p, scratch, threads);
  std::free(scratch);

  double worst = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < N; ++i) {
      const float* qi = &q[size_t((h * N + i) * D)];
      std::vector<double> s(size_t(i + 1));
      double m = -INFINITY, l = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(qi[d]) * k[size_t((h * N + j) * D + d)];
        s[size_t(j)] = dot / std::sqrt(double(D));
        m = std::max(m, s[size_t(j)]);
      }
      for (auto& x : s) l += (x = std::exp(x - m));
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += s[size_t(j)] / l * v[size_t((h * N + j) * D + d)];
        worst = std::max(worst, std::abs(acc - o[size_t((h * N + i) * D + d)]));
      }
    }
  std::printf("kernel library standalone: sdpa_forward_fused max_abs %.3g\n", worst);
  return worst < 1e-5 ? 0 : 1;
}
