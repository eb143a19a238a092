// The CUDA backward passes (impls/cuda/sdpa.cu, impls/cuda/masked.cu): their per-element
// host/device helpers (impls/cuda/sdpa_math.hpp, masked_math.hpp) against direct formulas on
// the host — the log-sum-exp the forward saves, the probabilities recomputed from it, the
// score gradient dS, RoPE's gradient rotation, the first query row of a key tile, the score
// mods' derivatives — and, where a device is usable, the kernels against a double-precision
// backward written out here (naive loops over reference::sdpa's mask and RoPE, with an
// optional tanh softcap; the masked kernels on the causal and no-mask cases it covers).
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "harness/variant.hpp"
#include "impls/block_map.hpp"
#include "impls/cpu/masked.hpp"
#include "impls/cpu/sdpa.hpp"
#include "impls/cuda/masked_math.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "reference/sdpa.hpp"

#if ATTNBENCH_HAVE_CUDA
#include <cuda_runtime.h>

#include "harness/cuda_support.hpp"
#include "impls/cuda/masked.hpp"
#include "impls/cuda/sdpa.hpp"
#endif

using namespace attnbench;

namespace {

const float kNinf = -std::numeric_limits<float>::infinity();

/// Scores of one row with masked entries, as in the online-softmax test of sdpa_test.cpp.
std::vector<float> row_scores(int n, int variant, std::mt19937_64& g) {
  std::normal_distribution<double> nd;
  std::vector<float> s(static_cast<size_t>(n));
  for (int j = 0; j < n; ++j) {
    s[size_t(j)] = float(3 * nd(g));
    if (variant == 0 && j % 5 == 1) s[size_t(j)] = kNinf;
    if (variant == 1) s[size_t(j)] = kNinf;
  }
  return s;
}

}  // namespace

TEST_CASE("sdpa cuda math: the saved lse is log Σ exp of the row, probabilities from it are the softmax",
          "[sdpa][cuda-math]") {
  std::mt19937_64 g(21);
  for (int variant = 0; variant < 3; ++variant) {
    const int n = 45, tile = 8;
    const std::vector<float> s = row_scores(n, variant, g);  // natural units
    // The forward's base-2 online softmax over tiles (flash_tile.cuh's online_softmax).
    float m = kNinf, l = 0;
    for (int j0 = 0; j0 < n; j0 += tile) {
      float tmax = kNinf;
      for (int j = j0; j < std::min(n, j0 + tile); ++j) tmax = std::max(tmax, sdpa_math::kLog2e * s[size_t(j)]);
      const float m_new = sdpa_math::softmax_new_max(m, tmax);
      float sum = 0;
      for (int j = j0; j < std::min(n, j0 + tile); ++j)
        sum += sdpa_math::softmax_prob(sdpa_math::kLog2e * s[size_t(j)], m_new);
      l = sdpa_math::softmax_alpha(m, m_new) * l + sum;
      m = m_new;
    }
    const float lse = sdpa_math::lse_from_base2(m, l);
    double den = 0;
    for (float x : s) den += x == kNinf ? 0.0 : std::exp(double(x));
    if (variant == 1) {
      CHECK(lse == kNinf);
    } else {
      CHECK(lse == Approx(std::log(den)).margin(1e-5));
    }
    for (int j = 0; j < n; ++j) {
      const float p = sdpa_math::prob_from_lse(sdpa_math::kLog2e * s[size_t(j)], lse);
      REQUIRE(std::isfinite(p));
      const double want = s[size_t(j)] == kNinf ? 0.0 : std::exp(double(s[size_t(j)])) / den;
      CHECK(p == Approx(want).margin(1e-6));
    }
  }
}

TEST_CASE("sdpa cuda math: dS = P∘(dP − Δ) is the gradient of Σ dO·O through the softmax", "[sdpa][cuda-math]") {
  std::mt19937_64 g(22);
  std::normal_distribution<double> nd;
  const int n = 13;
  std::vector<double> s(n), dp(n);  // dp_j = dO·v_j
  for (int j = 0; j < n; ++j) s[size_t(j)] = nd(g), dp[size_t(j)] = nd(g);
  // L(s) = Σ_j softmax(s)_j dp_j = dO·O; its gradient by central differences.
  auto loss = [&](const std::vector<double>& x) {
    double mx = -INFINITY, den = 0, num = 0;
    for (double e : x) mx = std::max(mx, e);
    for (int j = 0; j < n; ++j) den += std::exp(x[size_t(j)] - mx), num += std::exp(x[size_t(j)] - mx) * dp[size_t(j)];
    return num / den;
  };
  std::vector<double> p(n);
  double den = 0, delta = 0;
  for (int j = 0; j < n; ++j) den += std::exp(s[size_t(j)]);
  for (int j = 0; j < n; ++j) p[size_t(j)] = std::exp(s[size_t(j)]) / den, delta += p[size_t(j)] * dp[size_t(j)];
  for (int j = 0; j < n; ++j) {
    std::vector<double> hi = s, lo = s;
    hi[size_t(j)] += 1e-5, lo[size_t(j)] -= 1e-5;
    const double want = (loss(hi) - loss(lo)) / 2e-5;
    CHECK(sdpa_math::score_grad(float(p[size_t(j)]), float(dp[size_t(j)]), float(delta)) == Approx(want).margin(1e-5));
  }
  CHECK(sdpa_math::score_grad(0.0f, 3.0f, 1.0f) == 0.0f);  // masked / empty rows: zero gradient
}

TEST_CASE("sdpa cuda math: RoPE's gradient rotation is the transpose of the rotation", "[sdpa][cuda-math]") {
  std::mt19937_64 g(23);
  std::normal_distribution<double> nd;
  const int D = 10, half = D / 2;
  for (int mode : {1, 2})
    for (int64_t pos : {int64_t(-3), int64_t(0), int64_t(7), int64_t(3000)}) {
      std::vector<float> gr(D);  // gradient of the rotated values
      for (auto& e : gr) e = float(nd(g));
      for (int f = 0; f < half; ++f) {
        const int d1 = sdpa_math::rope_first_dim(mode, f);
        const sdpa_math::RopePair pr = sdpa_math::rope_pair(mode, D, d1);
        REQUIRE(pr.freq == f);
        REQUIRE(!pr.second);
      }
      // L(x) = Σ_e gr_e · rot(x)_e is linear: ∂L/∂x_d = L(unit vector d).
      for (int d = 0; d < D; ++d) {
        const sdpa_math::RopePair pr = sdpa_math::rope_pair(mode, D, d);
        const double angle = sdpa_math::rope_angle(pos, pr.freq, D);
        const float c = float(std::cos(angle)), sn = float(std::sin(angle));
        double want = 0;
        for (int e = 0; e < D; ++e) {
          const sdpa_math::RopePair pe = sdpa_math::rope_pair(mode, D, e);
          const double ce = std::cos(sdpa_math::rope_angle(pos, pe.freq, D)),
                       se = std::sin(sdpa_math::rope_angle(pos, pe.freq, D));
          const float xe = e == d ? 1.0f : 0.0f, ye = pe.partner == d ? 1.0f : 0.0f;
          want += gr[size_t(e)] * sdpa_math::rope_rotate(xe, ye, float(ce), float(se), pe.second);
        }
        const float got = sdpa_math::rope_rotate_grad(gr[size_t(d)], gr[size_t(pr.partner)], c, sn, pr.second);
        CHECK(got == Approx(want).margin(1e-5));
      }
    }
}

TEST_CASE("sdpa cuda math: first_query_row is the first row whose key limit passes j", "[sdpa][cuda-math]") {
  for (bool causal : {false, true})
    for (int64_t Nq : {1, 5, 70})
      for (int64_t Nkv : {1, 4, 9, 130})
        for (int64_t len : {int64_t(0), int64_t(2), Nkv, Nkv + 3})
          for (int64_t j = 0; j < Nkv + 2; ++j) {
            int64_t want = Nq;
            for (int64_t i = Nq - 1; i >= 0; --i)
              if (sdpa_math::row_limit(i, Nq, Nkv, len, causal) > j) want = i;
            REQUIRE(sdpa_math::first_query_row(j, Nq, Nkv, len, causal) == want);
          }
}

TEST_CASE("masked cuda math: score-mod derivatives match central differences of the mods", "[masked][cuda-math]") {
  using mask::ScoreModKind;
  for (ScoreModKind kind :
       {ScoreModKind::none, ScoreModKind::relative, ScoreModKind::cyclic, ScoreModKind::alibi, ScoreModKind::softcap})
    for (float s : {-30.0f, -2.5f, -0.3f, 0.0f, 0.7f, 4.0f, 25.0f}) {
      mask::ScoreMod mod;
      mod.kind = kind, mod.N = 50, mod.H = 4, mod.softcap = 5.0f;
      const int64_t h = 2, i = 7, j = 31;
      const double eps = 1e-3;
      const auto cap = [](double x) { return 5.0 * std::tanh(x / 5.0); };
      const double want = kind == ScoreModKind::softcap ? (cap(s + eps) - cap(s - eps)) / (2 * eps) : 1.0;
      if (kind == ScoreModKind::softcap) CHECK(mask::apply_score_mod(mod, s, h, i, j) == Approx(cap(s)).margin(1e-5));
      CHECK(masked_math::score_mod_grad(mod, s) == Approx(want).margin(1e-5));
      // The additive mods shift s by a constant: the float mod's own difference quotient.
      if (kind != ScoreModKind::softcap) {
        const float d = mask::apply_score_mod(mod, s + 0.5f, h, i, j) - mask::apply_score_mod(mod, s - 0.5f, h, i, j);
        CHECK(d == Approx(1.0f).margin(1e-4));
      }
    }
}

#if ATTNBENCH_HAVE_CUDA
namespace {

/// Double-precision SDPA backward of one case: dq, dk, dv (dense, the shapes of q, k, v)
/// of Σ dO·O, from reference::sdpa's mask and RoPE (naive loops).
struct Grads {
  std::vector<double> dq, dk, dv;
};
Grads backward_reference(const ref::SdpaDims& d, const std::vector<double>& q, const std::vector<double>& k,
                         const std::vector<double>& v, const std::vector<double>& dout,
                         const std::vector<int32_t>& kv_len, double softcap = 0) {
  const int64_t G = d.H / d.Hkv, D = d.D;
  Grads gr{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(v.size())};
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t hk = h / G;
      ref::Matrix<double> Q(d.Nq, D), K(d.Nkv, D), V(d.Nkv, D), dO(d.Nq, D);
      for (int64_t i = 0; i < d.Nq; ++i)
        for (int64_t e = 0; e < D; ++e)
          Q(i, e) = q[size_t(((b * d.H + h) * d.Nq + i) * D + e)],
               dO(i, e) = dout[size_t(((b * d.H + h) * d.Nq + i) * D + e)];
      for (int64_t j = 0; j < d.Nkv; ++j)
        for (int64_t e = 0; e < D; ++e)
          K(j, e) = k[size_t(((b * d.Hkv + hk) * d.Nkv + j) * D + e)],
               V(j, e) = v[size_t(((b * d.Hkv + hk) * d.Nkv + j) * D + e)];
      ref::Matrix<double> Qr = Q, Kr = K;
      ref::rope_rotate_rows(Qr, d.Nkv - d.Nq, d.rope);
      ref::rope_rotate_rows(Kr, 0, d.rope);
      const ref::Matrix<double> S = (Qr * Kr.transpose()) / std::sqrt(double(D));
      ref::Matrix<double> P = S;
      if (softcap > 0) P = (S / softcap).array().tanh().matrix() * softcap;
      for (int64_t i = 0; i < d.Nq; ++i) {
        double mx = -INFINITY, den = 0;
        for (int64_t j = 0; j < d.Nkv; ++j)
          if (ref::sdpa_allowed(d, i, j, kv_len[size_t(b)])) mx = std::max(mx, P(i, j));
        for (int64_t j = 0; j < d.Nkv; ++j) {
          P(i, j) = ref::sdpa_allowed(d, i, j, kv_len[size_t(b)]) ? std::exp(P(i, j) - mx) : 0.0;
          den += P(i, j);
        }
        for (int64_t j = 0; j < d.Nkv; ++j) P(i, j) = den > 0 ? P(i, j) / den : 0.0;
      }
      const ref::Matrix<double> O = P * V, dP = dO * V.transpose(), dV = P.transpose() * dO;
      ref::Matrix<double> dS = P;
      for (int64_t i = 0; i < d.Nq; ++i) {
        const double delta = dO.row(i).dot(O.row(i));
        for (int64_t j = 0; j < d.Nkv; ++j) {
          const double t = softcap > 0 ? std::tanh(S(i, j) / softcap) : 0.0;  // d(c tanh(s/c))/ds = 1 − t²
          dS(i, j) = P(i, j) * (dP(i, j) - delta) * (1 - t * t);
        }
      }
      ref::Matrix<double> dQr = dS * Kr / std::sqrt(double(D)), dKr = dS.transpose() * Qr / std::sqrt(double(D));
      // Through the rotation: its transpose is the rotation at −pos.
      auto unrotate = [&](ref::Matrix<double>& x, int64_t pos0) {
        const int64_t half = D / 2;
        if (d.rope == ref::RopeMode::none) return;
        const int mode = d.rope == ref::RopeMode::half ? 1 : 2;
        for (int64_t r = 0; r < x.rows(); ++r)
          for (int f = 0; f < half; ++f) {
            const int d1 = sdpa_math::rope_first_dim(mode, f), d2 = sdpa_math::rope_pair(mode, int(D), d1).partner;
            const double a = sdpa_math::rope_angle(pos0 + r, f, int(D)), c = std::cos(a), s = std::sin(a);
            const double g1 = x(r, d1), g2 = x(r, d2);
            x(r, d1) = g1 * c + g2 * s;
            x(r, d2) = g2 * c - g1 * s;
          }
      };
      unrotate(dQr, d.Nkv - d.Nq);
      unrotate(dKr, 0);
      for (int64_t i = 0; i < d.Nq; ++i)
        for (int64_t e = 0; e < D; ++e) gr.dq[size_t(((b * d.H + h) * d.Nq + i) * D + e)] = dQr(i, e);
      for (int64_t j = 0; j < d.Nkv; ++j)
        for (int64_t e = 0; e < D; ++e) {
          gr.dk[size_t(((b * d.Hkv + hk) * d.Nkv + j) * D + e)] += dKr(j, e);
          gr.dv[size_t(((b * d.Hkv + hk) * d.Nkv + j) * D + e)] += dV(j, e);
        }
    }
  return gr;
}

template <class T>
T* device_copy(const std::vector<T>& x) {
  T* p = nullptr;
  ATTNBENCH_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * std::max<size_t>(x.size(), 1)));
  ATTNBENCH_CUDA_CHECK(cudaMemcpy(p, x.data(), sizeof(T) * x.size(), cudaMemcpyHostToDevice));
  return p;
}

std::vector<float> host_copy(const float* p, size_t n) {
  std::vector<float> x(n);
  ATTNBENCH_CUDA_CHECK(cudaMemcpy(x.data(), p, sizeof(float) * n, cudaMemcpyDeviceToHost));
  return x;
}

/// Random f32 inputs of one case and their double-precision gradients.
struct CaseData {
  std::vector<float> q, k, v, dout;
  std::vector<int32_t> kv_len;
  Grads want;
};
CaseData make_case(const ref::SdpaDims& d, bool padding, uint64_t seed, double softcap = 0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd;
  const size_t nq = size_t(d.B * d.H * d.Nq * d.D), nk = size_t(d.B * d.Hkv * d.Nkv * d.D);
  CaseData c{std::vector<float>(nq),
             std::vector<float>(nk),
             std::vector<float>(nk),
             std::vector<float>(nq),
             std::vector<int32_t>(size_t(d.B), int32_t(d.Nkv)),
             {}};
  for (auto* x : {&c.q, &c.k, &c.v, &c.dout})
    for (auto& e : *x) e = nd(g);
  if (padding)  // b = 0: no keys, empty rows
    for (int64_t b = 0; b < d.B; ++b) c.kv_len[size_t(b)] = b == 0 ? 0 : int32_t((b * 37 + 5) % (d.Nkv + 1));
  const auto wide = [](const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); };
  c.want = backward_reference(d, wide(c.q), wide(c.k), wide(c.v), wide(c.dout), c.kv_len, softcap);
  return c;
}

/// Every element finite, max abs error ≤ 2e-4 × the largest reference gradient (f32 inputs).
void check_grad(const char* name, const float* got_d, const std::vector<double>& ref) {
  const std::vector<float> got = host_copy(got_d, ref.size());
  double scale = 1e-3, err = 0;
  for (double x : ref) scale = std::max(scale, std::abs(x));
  for (size_t i = 0; i < ref.size(); ++i) {
    REQUIRE(std::isfinite(got[i]));
    err = std::max(err, std::abs(double(got[i]) - ref[i]));
  }
  INFO(name << ": max abs error " << err << " of max |grad| " << scale);
  CHECK(err <= 2e-4 * scale);
}

/// Device buffers freed at scope exit.
struct DeviceArena {
  std::vector<void*> ptrs;
  template <class T>
  T* copy(const std::vector<T>& x) {
    T* p = device_copy(x);
    ptrs.push_back(p);
    return p;
  }
  void* bytes(size_t n) {
    void* p = nullptr;
    ATTNBENCH_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 256)));
    ptrs.push_back(p);
    return p;
  }
  ~DeviceArena() {
    for (void* p : ptrs) cudaFree(p);
  }
};

/// The CUDA SDPA forward (saving lse) and backward in f32 against backward_reference.
void check_backward_case(ref::SdpaDims d, bool padding, uint64_t seed) {
  INFO("sdpa B " << d.B << " H " << d.H << " Hkv " << d.Hkv << " Nq " << d.Nq << " Nkv " << d.Nkv << " D " << d.D
                 << " causal " << d.causal << " rope " << int(d.rope) << " padding " << padding);
  const CaseData c = make_case(d, padding, seed);
  DeviceArena dev;
  SdpaBackwardParams bp;
  SdpaParams& p = bp.fwd;
  p.B = d.B, p.H = d.H, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nkv = d.Nkv, p.D = d.D, p.causal = d.causal;
  p.rope = d.rope == ref::RopeMode::half          ? SdpaRope::half
           : d.rope == ref::RopeMode::interleaved ? SdpaRope::interleaved
                                                  : SdpaRope::none;
  p.q_strides = p.o_strides = bp.do_strides = bp.dq_strides = sdpa_dense_strides(d.H, d.Nq, d.D);
  p.k_strides = p.v_strides = bp.dk_strides = bp.dv_strides = sdpa_dense_strides(d.Hkv, d.Nkv, d.D);
  p.q = dev.copy(c.q), p.k = dev.copy(c.k), p.v = dev.copy(c.v), p.kv_len = dev.copy(c.kv_len);
  bp.dout = dev.copy(c.dout);
  p.o = dev.copy(std::vector<float>(c.q.size()));
  p.lse = dev.copy(std::vector<float>(size_t(d.B * d.H * d.Nq)));
  bp.dq = dev.copy(std::vector<float>(c.q.size(), NAN));
  bp.dk = dev.copy(std::vector<float>(c.k.size(), NAN));
  bp.dv = dev.copy(std::vector<float>(c.k.size(), NAN));
  void* scratch =
      dev.bytes(std::max(cuda::sdpa_forward_flash_scratch_bytes(p), cuda::sdpa_backward_flash_scratch_bytes(bp)));
  cuda::sdpa_forward_flash(p, scratch, nullptr);
  cuda::sdpa_backward_flash(bp, scratch, nullptr);
  ATTNBENCH_CUDA_CHECK(cudaDeviceSynchronize());
  check_grad("dq", bp.dq, c.want.dq);
  check_grad("dk", bp.dk, c.want.dk);
  check_grad("dv", bp.dv, c.want.dv);
}

/// The CUDA masked forward (saving lse) and backward in f32, mask none or causal (Nq = Nkv =
/// N), half-split RoPE at the token positions, tanh softcap c (0: none), over the block-sparse
/// or the dense block map, against backward_reference.
void check_masked_case(int64_t B, int64_t H, int64_t N, int64_t D, mask::Kind kind, bool rope, float softcap,
                       bool dense, uint64_t seed) {
  INFO("masked B " << B << " H " << H << " N " << N << " D " << D << " kind " << int(kind) << " rope " << rope
                   << " softcap " << softcap << " dense " << dense);
  ref::SdpaDims d;
  d.B = B, d.H = d.Hkv = H, d.Nq = d.Nkv = N, d.D = D, d.causal = kind == mask::Kind::causal;
  d.rope = rope ? ref::RopeMode::half : ref::RopeMode::none;
  const CaseData c = make_case(d, false, seed, softcap);
  DeviceArena dev;
  MaskedBackwardParams bp;
  MaskedParams& p = bp.fwd;
  p.B = B, p.H = H, p.Nq = p.Nkv = N, p.D = D;
  p.mask.kind = kind, p.mask.Nq = p.mask.Nkv = N;
  if (softcap > 0) p.mod.kind = mask::ScoreModKind::softcap, p.mod.softcap = softcap;
  mask::BlockMap map = mask::build_block_map(p.mask, B, cuda::kMaskedTileQ, cuda::kMaskedTileK);
  if (dense) map = mask::dense_block_map(map);
  p.tile_q = map.tile_q, p.tile_k = map.tile_k, p.n_qt = map.n_qt, p.n_kt = map.n_kt, p.map_batches = map.batches;
  p.tiles = dev.copy(map.tiles), p.kv_count = dev.copy(map.kv_count), p.kv_index = dev.copy(map.kv_index);
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[size_t(i)] = int32_t(i);
  if (rope) p.q_pos = p.k_pos = dev.copy(pos);
  p.q = dev.copy(c.q), p.k = dev.copy(c.k), p.v = dev.copy(c.v);
  bp.dout = dev.copy(c.dout);
  p.o = dev.copy(std::vector<float>(c.q.size()));
  p.lse = dev.copy(std::vector<float>(size_t(B * H * N)));
  bp.dq = dev.copy(std::vector<float>(c.q.size(), NAN));
  bp.dk = dev.copy(std::vector<float>(c.k.size(), NAN));
  bp.dv = dev.copy(std::vector<float>(c.k.size(), NAN));
  void* scratch = dev.bytes(std::max(cuda::masked_forward_block_sparse_scratch_bytes(p),
                                     cuda::masked_backward_block_sparse_scratch_bytes(bp)));
  cuda::masked_forward_block_sparse(p, scratch, nullptr);
  cuda::masked_backward_block_sparse(bp, scratch, nullptr);
  ATTNBENCH_CUDA_CHECK(cudaDeviceSynchronize());
  check_grad("dq", bp.dq, c.want.dq);
  check_grad("dk", bp.dk, c.want.dk);
  check_grad("dv", bp.dv, c.want.dv);
}

ref::SdpaDims dims(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nkv, int64_t D, bool causal,
                   ref::RopeMode rope) {
  ref::SdpaDims d;
  d.B = B, d.H = H, d.Hkv = Hkv, d.Nq = Nq, d.Nkv = Nkv, d.D = D, d.causal = causal, d.rope = rope;
  return d;
}

}  // namespace
#endif

TEST_CASE("sdpa cuda: the backward matches a double-precision backward on a device", "[sdpa][cuda]") {
#if ATTNBENCH_HAVE_CUDA
  if (!cuda_usable()) {
    WARN("sdpa cuda backward test skipped: " << cuda_unusable_reason());
    return;
  }
  using ref::RopeMode;
  // GQA, D ≤ 32 (one 32-column chunk); causal Nq < Nkv with RoPE, two chunks; causal Nq > Nkv;
  // padding with an empty batch entry, interleaved RoPE, D = 200 (four chunks, the last partial).
  check_backward_case(dims(2, 6, 2, 77, 77, 24, false, RopeMode::none), false, 1);
  check_backward_case(dims(1, 2, 1, 37, 300, 128, true, RopeMode::half), false, 2);
  check_backward_case(dims(1, 2, 2, 300, 37, 64, true, RopeMode::none), false, 3);
  check_backward_case(dims(3, 2, 1, 130, 130, 200, false, RopeMode::interleaved), true, 4);
#else
  WARN("sdpa cuda backward test skipped: " << cuda_unusable_reason());
#endif
}

TEST_CASE("masked cuda: the backward matches a double-precision backward on a device", "[masked][cuda]") {
#if ATTNBENCH_HAVE_CUDA
  if (!cuda_usable()) {
    WARN("masked cuda backward test skipped: " << cuda_unusable_reason());
    return;
  }
  // Causal (full, partial and empty tiles), block-sparse and dense maps; softcap; RoPE with
  // partners in another head-dim chunk (D = 128); D = 40 (one padded chunk of 64).
  for (bool dense : {false, true}) {
    check_masked_case(2, 2, 150, 64, mask::Kind::causal, false, 0.0f, dense, 5);
    check_masked_case(1, 3, 130, 128, mask::Kind::causal, true, 0.0f, dense, 6);
  }
  check_masked_case(1, 2, 97, 40, mask::Kind::none, false, 3.0f, false, 7);
  check_masked_case(2, 1, 200, 128, mask::Kind::causal, true, 2.0f, false, 8);
#else
  WARN("masked cuda backward test skipped: " << cuda_unusable_reason());
#endif
}
