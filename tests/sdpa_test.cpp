// SDPA properties (the registry-driven equivalence test covers the odd test
// shapes): CPU vs the reference on GQA, causal with Nq ≠ Nkv, key padding with
// empty rows, RoPE conventions, attention weights, bf16; the CUDA kernel's host
// helpers (impls/cuda/sdpa_math.hpp) against the reference math; and the CUDA
// implementation itself where a device is usable.
#include "impls/cpu/sdpa.hpp"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "harness/errors.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "impls/cuda/sdpa_math.hpp"
#include "reference/sdpa.hpp"
#include "tests/backward_support.hpp"

using namespace attnbench;

namespace {

const Variant& sdpa() { return find_variant("sdpa", "sdpa_test"); }

Params complete(const Params& given) { return sdpa().complete(given, "sdpa_test"); }

/// Runs one case through the same runner as `attnbench run` (NaN-filled
/// outputs, input hashes, 2 seeds, the correctness rule) and requires it to pass.
void require_passes(const std::string& impl, DType dtype, const Params& given) {
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  const auto rec = run_case(CaseSpec{&sdpa(), impl, dtype, complete(given)}, o);
  INFO(impl << " " << dtype_name(dtype) << " " << given.dump() << ": " << rec.dump());
  REQUIRE(rec["status"] == "ok");
  REQUIRE(rec["checks"].size() >= 1);
  for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
}

std::string input_error(const Params& given) {
  try {
    complete(given);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

/// A small problem run directly through the CPU kernel and the f64 reference.
struct Direct {
  ref::SdpaDims d;
  std::vector<int32_t> kv_len;
  std::vector<double> q, k, v;
  std::vector<float> o, w;           // kernel outputs
  std::vector<double> o_ref, w_ref;  // f64 reference

  Direct(ref::SdpaDims dims, std::vector<int32_t> lens, DType dtype = DType::f32) : d(dims), kv_len(std::move(lens)) {
    std::mt19937_64 g(42);
    std::normal_distribution<double> nd;
    auto fill = [&](std::vector<double>& x, int64_t n) {
      x.resize(size_t(n));
      for (auto& e : x) e = round_to(dtype, nd(g));
    };
    fill(q, d.B * d.H * d.Nq * d.D);
    fill(k, d.B * d.Hkv * d.Nkv * d.D);
    fill(v, d.B * d.Hkv * d.Nkv * d.D);
    o.assign(size_t(d.B * d.H * d.Nq * d.D), std::numeric_limits<float>::quiet_NaN());
    w.assign(size_t(d.B * d.H * d.Nq * d.Nkv), std::numeric_limits<float>::quiet_NaN());
    o_ref.resize(o.size());
    w_ref.resize(w.size());
    ref::sdpa_forward_reference<double>(d, DType::f64, o_ref.data(), w_ref.data(), q.data(), k.data(), v.data(),
                                        kv_len.data());

    std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end());
    std::vector<bf16_t> qb, kb, vb;
    for (float x : qf) qb.push_back(to_bf16(x));
    for (float x : kf) kb.push_back(to_bf16(x));
    for (float x : vf) vb.push_back(to_bf16(x));
    SdpaParams p;
    p.B = d.B, p.H = d.H, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nkv = d.Nkv, p.D = d.D;
    p.causal = d.causal;
    p.rope = d.rope == ref::RopeMode::half          ? SdpaRope::half
             : d.rope == ref::RopeMode::interleaved ? SdpaRope::interleaved
                                                    : SdpaRope::none;
    p.dtype = dtype;
    const bool bf = dtype == DType::bf16;
    p.q = bf ? static_cast<const void*>(qb.data()) : qf.data();
    p.k = bf ? static_cast<const void*>(kb.data()) : kf.data();
    p.v = bf ? static_cast<const void*>(vb.data()) : vf.data();
    p.q_strides = p.o_strides = sdpa_dense_strides(d.H, d.Nq, d.D);
    p.k_strides = p.v_strides = sdpa_dense_strides(d.Hkv, d.Nkv, d.D);
    p.w_strides = sdpa_dense_strides(d.H, d.Nq, d.Nkv);
    p.o = o.data();
    p.weights = w.data();
    p.kv_len = kv_len.data();
    std::vector<float> scratch(cpu::sdpa_forward_fused_scratch_bytes(p, 2) / sizeof(float) + 16);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    cpu::sdpa_forward_fused(p, aligned, 2);
  }

  /// Is query row (b, h, i) without any allowed key?
  bool empty_row(int64_t b, int64_t i) const {
    for (int64_t j = 0; j < d.Nkv; ++j)
      if (ref::sdpa_allowed(d, i, j, kv_len[size_t(b)])) return false;
    return true;
  }
};

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::isfinite(a[i]) ? std::abs(double(a[i]) - b[i]) : INFINITY);
  return e;
}

}  // namespace

TEST_CASE("sdpa: invalid shapes name the parameter", "[sdpa]") {
  CHECK_THAT(input_error({{"D", 59}, {"rope", "half"}}), Catch::Contains("D: RoPE needs an even"));
  CHECK_THAT(input_error({{"H", 6}, {"Hkv", 4}}), Catch::Contains("Hkv: H = 6 is not a multiple of Hkv = 4"));
  CHECK_THAT(input_error({{"N", 0}}), Catch::Contains("N: expected >= 1"));
  CHECK_THAT(input_error({{"Nkv", -3}}), Catch::Contains("Nkv: expected >= 0"));
  CHECK_THAT(input_error({{"rope", "halves"}}), Catch::Contains("rope: expected"));
  CHECK(input_error({{"D", 59}}).empty());  // odd D is fine without RoPE
}

TEST_CASE("sdpa: N fills Nq and Nkv, Hkv 0 means H", "[sdpa]") {
  const Params p = complete({{"N", 33}, {"H", 4}, {"need_weights", true}});
  const auto out = sdpa().outputs(p, DType::f32);
  REQUIRE(out.size() == 2);
  CHECK(out[0].shape == Shape{1, 4, 33, 64});
  CHECK(out[1].shape == Shape{1, 4, 33, 33});
  const auto in = sdpa().make_inputs(complete({{"N", 33}, {"Nkv", 7}, {"H", 4}, {"Hkv", 2}}), 0, "k");
  CHECK(in.at("q").shape() == Shape{1, 4, 33, 64});
  CHECK(in.at("k").shape() == Shape{1, 2, 7, 64});
  CHECK(in.at("kv_len").dtype() == DType::i32);
  CHECK(in.at("kv_len").get(0) == 7);
  // Causal N = 8: 36 of 64 pairs are allowed.
  CHECK(sdpa().flops(complete({{"N", 8}, {"D", 4}, {"H", 1}, {"causal", true}})) == 4.0 * 4 * 36);
}

TEST_CASE("sdpa cpu: GQA, causal with Nq != Nkv, RoPE, padding, weights", "[sdpa]") {
  for (DType dt : {DType::f32, DType::bf16}) {
    require_passes("cpu", dt, {{"B", 2}, {"H", 6}, {"Hkv", 2}, {"N", 77}, {"D", 48}});
    require_passes("cpu", dt, {{"H", 2}, {"Nq", 37}, {"Nkv", 300}, {"D", 64}, {"causal", true}});
    require_passes("cpu", dt, {{"H", 2}, {"Nq", 300}, {"Nkv", 37}, {"D", 64}, {"causal", true}});
    require_passes("cpu", dt, {{"H", 2}, {"N", 150}, {"D", 32}, {"rope", "half"}, {"causal", true}});
    require_passes("cpu", dt, {{"H", 2}, {"Nq", 50}, {"Nkv", 70}, {"D", 32}, {"rope", "interleaved"}});
    require_passes("cpu", dt,
                   {{"B", 4}, {"H", 2}, {"Hkv", 1}, {"N", 65}, {"D", 16}, {"padding", true}, {"need_weights", true}});
  }
  require_passes("reference", DType::f16, {{"H", 2}, {"N", 40}, {"D", 24}, {"causal", true}});
}

TEST_CASE("sdpa cpu: empty rows are zeros, weights rows sum to one", "[sdpa]") {
  // kv_len 0 empties batch 0; causal with Nq > Nkv empties the first Nq − Nkv rows.
  ref::SdpaDims d;
  d.B = 3, d.H = 2, d.Hkv = 1, d.Nq = 70, d.Nkv = 50, d.D = 24, d.causal = true;
  const Direct x(d, {0, 37, 50});
  CHECK(max_abs_diff(x.o, x.o_ref) < 1e-5);
  CHECK(max_abs_diff(x.w, x.w_ref) < 1e-6);
  int empty = 0;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t i = 0; i < d.Nq; ++i) {
        const size_t row = size_t((b * d.H + h) * d.Nq + i);
        double sum = 0;
        for (int64_t j = 0; j < d.Nkv; ++j) {
          const float w = x.w[row * size_t(d.Nkv) + size_t(j)];
          REQUIRE(std::isfinite(w));
          if (!ref::sdpa_allowed(d, i, j, x.kv_len[size_t(b)])) REQUIRE(w == 0.0f);
          sum += w;
        }
        bool zero_out = true;
        for (int64_t c = 0; c < d.D; ++c) {
          REQUIRE(std::isfinite(x.o[row * size_t(d.D) + size_t(c)]));
          zero_out = zero_out && x.o[row * size_t(d.D) + size_t(c)] == 0.0f;
        }
        if (x.empty_row(b, i)) {
          ++empty;
          CHECK(sum == 0.0);
          CHECK(zero_out);
        } else {
          CHECK(sum == Approx(1.0).margin(1e-5));
        }
      }
  CHECK(empty == 2 * 70 + 2 * 2 * 20);  // all of batch 0, and rows i < 20 of the others
}

TEST_CASE("sdpa cpu: bf16 inputs are as accurate as f32 on the same values", "[sdpa]") {
  ref::SdpaDims d;
  d.B = 1, d.H = 3, d.Hkv = 3, d.Nq = 200, d.Nkv = 333, d.D = 80, d.rope = ref::RopeMode::half;
  const Direct x(d, {333}, DType::bf16);
  CHECK(max_abs_diff(x.o, x.o_ref) < 2e-6);  // inputs are exact in bf16; f32 accumulation
}

TEST_CASE("sdpa reference: RoPE scores depend on relative position only", "[sdpa]") {
  std::mt19937_64 g(3);
  std::normal_distribution<double> nd;
  for (auto mode : {ref::RopeMode::half, ref::RopeMode::interleaved}) {
    ref::Matrix<double> q(1, 16), k(1, 16);
    for (int i = 0; i < 16; ++i) q(0, i) = nd(g), k(0, i) = nd(g);
    auto score = [&](int64_t m, int64_t n) {
      ref::Matrix<double> a = q, b = k;
      ref::rope_rotate_rows(a, m, mode);
      ref::rope_rotate_rows(b, n, mode);
      return a.row(0).dot(b.row(0));
    };
    CHECK(score(7, 3) == Approx(score(107, 103)).epsilon(1e-12));
    CHECK(score(0, 0) == Approx(q.row(0).dot(k.row(0))).epsilon(1e-12));
    CHECK(std::abs(score(7, 3) - score(3, 7)) > 1e-6);  // the rotation does something
  }
  // Interleaved on dims permuted (i, i + D/2) → (2i, 2i + 1) equals half-split.
  ref::Matrix<double> x(3, 8), y(3, 8);
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 8; ++i) x(r, i) = nd(g);
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 4; ++i) y(r, 2 * i) = x(r, i), y(r, 2 * i + 1) = x(r, i + 4);
  ref::rope_rotate_rows(x, 5, ref::RopeMode::half);
  ref::rope_rotate_rows(y, 5, ref::RopeMode::interleaved);
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 4; ++i) {
      CHECK(y(r, 2 * i) == Approx(x(r, i)).epsilon(1e-14));
      CHECK(y(r, 2 * i + 1) == Approx(x(r, i + 4)).epsilon(1e-14));
    }
}

TEST_CASE("sdpa cuda math: key limits match the reference mask", "[sdpa][cuda-math]") {
  for (bool causal : {false, true})
    for (int64_t Nq : {1, 5, 9})
      for (int64_t Nkv : {1, 4, 9})
        for (int64_t len : {int64_t(0), int64_t(2), Nkv, Nkv + 3}) {
          ref::SdpaDims d;
          d.Nq = Nq, d.Nkv = Nkv, d.causal = causal;
          for (int64_t i = 0; i < Nq; ++i) {
            const int64_t lim = sdpa_math::row_limit(i, Nq, Nkv, len, causal);
            for (int64_t j = 0; j < Nkv; ++j) REQUIRE((j < lim) == ref::sdpa_allowed(d, i, j, len));
            if (i > 0) REQUIRE(lim >= sdpa_math::row_limit(i - 1, Nq, Nkv, len, causal));  // tiles rely on it
          }
        }
}

TEST_CASE("sdpa cuda math: RoPE pairing and rotation match the reference", "[sdpa][cuda-math]") {
  std::mt19937_64 g(5);
  std::normal_distribution<double> nd;
  const int D = 12;
  for (auto mode : {ref::RopeMode::half, ref::RopeMode::interleaved}) {
    const int m = mode == ref::RopeMode::half ? 1 : 2;
    REQUIRE(m == int(mode == ref::RopeMode::half ? SdpaRope::half : SdpaRope::interleaved));
    for (int64_t pos : {int64_t(-7), int64_t(0), int64_t(3), int64_t(4000)}) {
      ref::Matrix<double> x(1, D);
      for (int i = 0; i < D; ++i) x(0, i) = nd(g);
      ref::Matrix<double> want = x;
      ref::rope_rotate_rows(want, pos, mode);
      for (int d = 0; d < D; ++d) {
        const sdpa_math::RopePair pr = sdpa_math::rope_pair(m, D, d);
        REQUIRE(pr.freq < D / 2);
        REQUIRE(sdpa_math::rope_pair(m, D, pr.partner).partner == d);
        REQUIRE(sdpa_math::rope_pair(m, D, pr.partner).second != pr.second);
        const double angle = sdpa_math::rope_angle(pos, pr.freq, D);
        const float got = sdpa_math::rope_rotate(float(x(0, d)), float(x(0, pr.partner)), float(std::cos(angle)),
                                                 float(std::sin(angle)), pr.second);
        CHECK(got == Approx(want(0, d)).margin(1e-5));
      }
    }
  }
}

TEST_CASE("sdpa cuda math: tiled online softmax equals the softmax, empty rows give zeros", "[sdpa][cuda-math]") {
  std::mt19937_64 g(7);
  std::normal_distribution<double> nd;
  const float ninf = -std::numeric_limits<float>::infinity();
  // Rows: random scores with masked runs, a fully masked row, a row masked
  // in its first tiles only.
  for (int variant = 0; variant < 3; ++variant) {
    const int n = 37, tile = 8;
    std::vector<float> s(n), v(n);
    for (int j = 0; j < n; ++j) {
      s[j] = float(3 * nd(g));
      v[j] = float(nd(g));
      if (variant == 0 && j % 5 == 1) s[j] = ninf;
      if (variant == 1) s[j] = ninf;
      if (variant == 2 && j < 2 * tile + 3) s[j] = ninf;
    }
    float m = ninf, l = 0, acc = 0;
    for (int j0 = 0; j0 < n; j0 += tile) {
      float tmax = ninf;
      for (int j = j0; j < std::min(n, j0 + tile); ++j) tmax = std::max(tmax, s[j]);
      const float m_new = sdpa_math::softmax_new_max(m, tmax);
      const float alpha = sdpa_math::softmax_alpha(m, m_new);
      float sum = 0, pv = 0;
      for (int j = j0; j < std::min(n, j0 + tile); ++j) {
        const float p = sdpa_math::softmax_prob(s[j], m_new);
        REQUIRE(std::isfinite(p));
        sum += p;
        pv += p * v[j];
      }
      l = alpha * l + sum;
      acc = alpha * acc + pv;
      m = m_new;
      REQUIRE(std::isfinite(acc));
    }
    const float got = sdpa_math::softmax_finish(acc, l);
    // Direct softmax in double, base 2 like the kernel.
    double mx = -INFINITY;
    for (float x : s) mx = std::max(mx, double(x));
    double den = 0, num = 0;
    if (mx != -INFINITY)
      for (int j = 0; j < n; ++j) {
        const double p = s[j] == ninf ? 0.0 : std::exp2(double(s[j]) - mx);
        den += p;
        num += p * v[j];
      }
    const double want = den > 0 ? num / den : 0.0;
    CHECK(got == Approx(want).margin(1e-5));
    if (variant == 1) CHECK(got == 0.0f);
  }
}

TEST_CASE("sdpa cuda math: 16-bit widening is exact", "[sdpa][cuda-math]") {
  for (float x : {0.0f, -1.5f, 3.140625f, 65504.0f, 6.1e-5f, 1e-7f, -2.5e38f}) {
    const bf16_t b = to_bf16(x);
    CHECK(sdpa_math::bf16_bits_to_float(b.bits) == to_float(b));
    const f16_t h = to_f16(x);
    CHECK(sdpa_math::f16_bits_to_float(h.bits) == to_float(h));
    CHECK(sdpa_math::Elem<DType::bf16>::to_f32(b.bits) == to_float(b));
  }
}

TEST_CASE("sdpa cuda: matches the reference on a device", "[sdpa][cuda]") {
  if (!cuda_usable()) {
    WARN("sdpa cuda test skipped: " << cuda_unusable_reason());
    return;
  }
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    require_passes("cuda", dt, {{"B", 2}, {"H", 6}, {"Hkv", 2}, {"N", 77}, {"D", 48}});
    require_passes("cuda", dt, {{"H", 2}, {"Nq", 37}, {"Nkv", 300}, {"D", 64}, {"causal", true}, {"rope", "half"}});
    require_passes("cuda", dt, {{"H", 2}, {"Nq", 300}, {"Nkv", 37}, {"D", 128}, {"causal", true}});
    require_passes("cuda", dt,
                   {{"B", 4},
                    {"H", 2},
                    {"N", 130},
                    {"D", 200},
                    {"padding", true},
                    {"need_weights", true},
                    {"rope", "interleaved"}});
  }
}

TEST_CASE("sdpa cpu: explicit strides (B, N, H, D) layout give the dense result", "[sdpa]") {
  // q, k, v, o stored token-major (B, N, heads, D) as many frameworks keep them.
  const int64_t B = 2, H = 4, Hkv = 2, Nq = 45, Nkv = 70, D = 32;
  std::mt19937_64 g(11);
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t(B * H * Nq * D)), k(size_t(B * Hkv * Nkv * D)), v(k.size());
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = nd(g);
  std::vector<int32_t> kv_len{70, 33};
  auto run = [&](bool token_major) {
    // Same logical tensors, two layouts: copy into the token-major order when asked.
    auto relayout = [&](const std::vector<float>& x, int64_t heads, int64_t n) {
      std::vector<float> y(x.size());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t i = 0; i < n; ++i)
            for (int64_t d = 0; d < D; ++d)
              y[size_t(((b * n + i) * heads + h) * D + d)] = x[size_t(((b * heads + h) * n + i) * D + d)];
      return y;
    };
    const auto qs = token_major ? relayout(q, H, Nq) : q;
    const auto ks = token_major ? relayout(k, Hkv, Nkv) : k;
    const auto vs = token_major ? relayout(v, Hkv, Nkv) : v;
    auto strides = [&](int64_t heads, int64_t n) {
      return token_major ? SdpaStrides{n * heads * D, D, heads * D} : sdpa_dense_strides(heads, n, D);
    };
    std::vector<float> o(q.size(), std::numeric_limits<float>::quiet_NaN());
    SdpaParams p;
    p.B = B, p.H = H, p.Hkv = Hkv, p.Nq = Nq, p.Nkv = Nkv, p.D = D;
    p.causal = true;
    p.rope = SdpaRope::half;
    p.q = qs.data(), p.k = ks.data(), p.v = vs.data(), p.o = o.data(), p.kv_len = kv_len.data();
    p.q_strides = p.o_strides = strides(H, Nq);
    p.k_strides = p.v_strides = strides(Hkv, Nkv);
    std::vector<float> scratch(cpu::sdpa_forward_fused_scratch_bytes(p, 2) / sizeof(float) + 16);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    cpu::sdpa_forward_fused(p, aligned, 2);
    // Back to (B, H, Nq, D) for comparison.
    std::vector<float> dense(o.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Nq; ++i)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t src = token_major ? ((b * Nq + i) * H + h) * D + d : ((b * H + h) * Nq + i) * D + d;
            dense[size_t(((b * H + h) * Nq + i) * D + d)] = o[size_t(src)];
          }
    return dense;
  };
  const auto dense = run(false), strided = run(true);
  for (size_t i = 0; i < dense.size(); ++i) {
    REQUIRE(std::isfinite(dense[i]));
    REQUIRE(strided[i] == dense[i]);  // same arithmetic, only the addressing differs
  }
}

// ---- Backward -----------------------------------------------------------------------

namespace {

/// A small problem run directly through the CPU forward (saving lse) and backward.
struct DirectBackward {
  ref::SdpaDims d;
  std::vector<int32_t> kv_len;
  std::vector<double> q, k, v, dout;
  std::vector<float> o, lse, dq, dk, dv;
  std::vector<double> dq_ref, dk_ref, dv_ref;

  DirectBackward(ref::SdpaDims dims, std::vector<int32_t> lens, int threads = 2) : d(dims), kv_len(std::move(lens)) {
    std::mt19937_64 g(17);
    std::normal_distribution<double> nd;
    auto fill = [&](std::vector<double>& x, int64_t n) {
      x.resize(size_t(n));
      for (auto& e : x) e = double(float(nd(g)));
    };
    const int64_t nq = d.B * d.H * d.Nq * d.D, nkv = d.B * d.Hkv * d.Nkv * d.D;
    fill(q, nq), fill(k, nkv), fill(v, nkv), fill(dout, nq);
    dq_ref.resize(size_t(nq)), dk_ref.resize(size_t(nkv)), dv_ref.resize(size_t(nkv));
    ref::sdpa_backward_reference<double>(d, DType::f64, dq_ref.data(), dk_ref.data(), dv_ref.data(), q.data(),
                                         k.data(), v.data(), kv_len.data(), dout.data());
    const std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end()),
        gf(dout.begin(), dout.end());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    o.assign(size_t(nq), nan), lse.assign(size_t(d.B * d.H * d.Nq), nan);
    dq.assign(size_t(nq), nan), dk.assign(size_t(nkv), nan), dv.assign(size_t(nkv), nan);
    SdpaBackwardParams b;
    SdpaParams& p = b.fwd;
    p.B = d.B, p.H = d.H, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nkv = d.Nkv, p.D = d.D, p.causal = d.causal;
    p.rope = d.rope == ref::RopeMode::half          ? SdpaRope::half
             : d.rope == ref::RopeMode::interleaved ? SdpaRope::interleaved
                                                    : SdpaRope::none;
    p.q = qf.data(), p.k = kf.data(), p.v = vf.data(), p.o = o.data(), p.lse = lse.data(), p.kv_len = kv_len.data();
    p.q_strides = p.o_strides = sdpa_dense_strides(d.H, d.Nq, d.D);
    p.k_strides = p.v_strides = sdpa_dense_strides(d.Hkv, d.Nkv, d.D);
    b.dout = gf.data(), b.dq = dq.data(), b.dk = dk.data(), b.dv = dv.data();
    b.do_strides = b.dq_strides = p.q_strides;
    b.dk_strides = b.dv_strides = p.k_strides;
    const size_t bytes =
        std::max(cpu::sdpa_forward_fused_scratch_bytes(p, threads), cpu::sdpa_backward_fused_scratch_bytes(b, threads));
    std::vector<float> scratch(bytes / sizeof(float) + 16, nan);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    cpu::sdpa_forward_fused(p, aligned, threads);
    cpu::sdpa_backward_fused(b, aligned, threads);
  }
};

double max_abs_of(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

}  // namespace

TEST_CASE("sdpa reference backward equals central finite differences of the forward", "[sdpa][backward]") {
  for (const Params& given : std::vector<Params>{
           {{"B", 1}, {"H", 2}, {"N", 5}, {"D", 4}},
           {{"B", 2}, {"H", 4}, {"Hkv", 2}, {"Nq", 6}, {"Nkv", 9}, {"D", 6}, {"causal", true}, {"padding", true}},
           {{"B", 1}, {"H", 2}, {"Hkv", 1}, {"Nq", 7}, {"Nkv", 4}, {"D", 8}, {"causal", true}, {"rope", "half"}},
           {{"B", 1}, {"H", 1}, {"N", 6}, {"D", 6}, {"rope", "interleaved"}, {"need_weights", true}},
       })
    test::check_reference_gradients_fd(sdpa(), given);
}

TEST_CASE("sdpa cpu backward matches the f64 reference on odd shapes", "[sdpa][backward]") {
  // N = 1 is the next test: with one key per row dq and dk are exactly zero and the rule's floor with them.
  const std::vector<Params> shapes = {
      {{"B", 1}, {"H", 2}, {"N", 17}, {"D", 40}},
      {{"B", 1}, {"H", 2}, {"N", 129}, {"D", 59}},
      {{"B", 1}, {"H", 1}, {"N", 1000}, {"D", 80}, {"causal", true}},
      {{"B", 1}, {"H", 2}, {"Hkv", 1}, {"N", 300}, {"D", 128}, {"rope", "half"}},
      {{"B", 2}, {"H", 6}, {"Hkv", 2}, {"N", 77}, {"D", 48}, {"rope", "interleaved"}},
      {{"B", 1}, {"H", 2}, {"Nq", 37}, {"Nkv", 300}, {"D", 64}, {"causal", true}},
      {{"B", 1}, {"H", 4}, {"Hkv", 2}, {"Nq", 300}, {"Nkv", 37}, {"D", 40}, {"causal", true}, {"rope", "half"}},
      {{"B", 4}, {"H", 2}, {"Hkv", 1}, {"N", 65}, {"D", 16}, {"padding", true}, {"need_weights", true}},
  };
  for (const Params& s : shapes)
    for (DType dt : {DType::f32, DType::bf16}) test::require_pass_ok(sdpa(), "cpu", dt, s, Pass::bwd);
  // Decode (one query row): nothing accumulates, so the f32 reference's error is ~1 ulp and the
  // bound ~ the 8-ulp floor, while every P of the row carries the rounding of the f32 scores (in
  // log2 units) and of the stored f32 lse (ulp(lse)/2 ≈ 2.4e-7 relative at lse ≈ 5.6): 3 of 20
  // seeds land 1–9 % above an 8-ulp floor in f32 (tests/sdpa_test.cpp history; docs/sdpa.md).
  for (DType dt : {DType::f32, DType::bf16})
    test::require_pass_ok(sdpa(), "cpu", dt, {{"B", 1}, {"H", 2}, {"Nq", 1}, {"Nkv", 129}, {"D", 64}, {"causal", true}},
                          Pass::bwd, 3, 16.0);
}

TEST_CASE("sdpa cpu backward at N = 1: dv = dO, dq and dk are exactly 0", "[sdpa][backward]") {
  // One key per row: P = 1, O = v bitwise, so dS = P ∘ (dP − Δ) is 0 in exact arithmetic — and in
  // the kernel too, because Δ = dO·O is formed by the same MulAdd chain as dP = dO·vᵀ
  // (attention-inl.h, PackQueryRow). With a lane-parallel Δ this failed ci.json's rule on AVX2
  // (dq 1.9e-6 against a floor of 1.7e-6; the ratio rule's naive f32 reference gets exactly 0).
  for (DType dt : {DType::f32, DType::bf16})
    for (const Params& given : std::vector<Params>{{{"B", 2}, {"H", 4}, {"Hkv", 2}, {"N", 1}, {"D", 64}},
                                                   {{"B", 1}, {"H", 2}, {"N", 1}, {"D", 59}}}) {
      const Params p = complete(given);
      const TensorMap in = sdpa().cast_inputs(p, test::inputs_with_cotangents(sdpa(), p, 3), dt);
      const TensorMap out = test::run_pass(sdpa(), "cpu", p, dt, in, Pass::bwd);
      INFO(p.dump() << " " << dtype_name(dt));
      CHECK(test::max_abs(out.at("dq")) == 0.0);
      CHECK(test::max_abs(out.at("dk")) == 0.0);
      // dv = Σ p dO with the single p = 1: the cotangent summed over the query heads of each kv head.
      const Tensor& dv = out.at("dv");
      const int64_t kv_heads = dv.dim(1), group = in.at("do").dim(1) / kv_heads, D = dv.dim(3);
      for (int64_t i = 0; i < dv.numel(); ++i) {
        const int64_t b = i / (kv_heads * D), hk = i / D % kv_heads, d = i % D;
        double want = 0;
        for (int64_t g = 0; g < group; ++g) want += in.at("do").get(((b * kv_heads + hk) * group + g) * D + d);
        REQUIRE(dv.get(i) == Approx(want).margin(1e-6));
      }
    }
}

TEST_CASE("sdpa cpu fwd_bwd checks outputs and gradients, and the reference runs every pass", "[sdpa][backward]") {
  for (DType dt : {DType::f32, DType::bf16}) {
    test::require_pass_ok(sdpa(), "cpu", dt, {{"B", 2}, {"H", 4}, {"Hkv", 2}, {"N", 129}, {"D", 40}, {"causal", true}},
                          Pass::fwd_bwd);
    test::require_pass_ok(sdpa(), "cpu", dt,
                          {{"B", 3}, {"H", 2}, {"Nq", 129}, {"Nkv", 17}, {"D", 64}, {"causal", true}, {"padding", true},
                           {"need_weights", true}},
                          Pass::fwd_bwd);
  }
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    test::require_pass_ok(sdpa(), "reference", dt, {{"H", 2}, {"Nq", 20}, {"Nkv", 33}, {"D", 24}, {"causal", true}},
                          Pass::bwd, 1);
  const auto cpu = sdpa().find_impl("cpu");
  REQUIRE(cpu);
  CHECK(cpu->passes == std::vector<Pass>{Pass::fwd, Pass::bwd, Pass::fwd_bwd});
  CHECK(sdpa().differentiable() == std::vector<std::string>{"q", "k", "v"});
  CHECK(sdpa().cotangents(complete({{"need_weights", true}})) == std::vector<std::string>{"o"});
  CHECK(sdpa().pass_flops(complete(Params::object()), Pass::fwd_bwd) == 3.5 * sdpa().flops(complete(Params::object())));
}

TEST_CASE("sdpa cpu backward: rows without keys get zero gradients, masked keys too", "[sdpa][backward]") {
  // kv_len 0 empties batch 0; causal with Nq > Nkv empties the first Nq − Nkv rows;
  // keys ≥ kv_len[b] are seen by no query.
  ref::SdpaDims d;
  d.B = 3, d.H = 4, d.Hkv = 2, d.Nq = 150, d.Nkv = 130, d.D = 24, d.causal = true, d.rope = ref::RopeMode::half;
  const DirectBackward x(d, {0, 37, 130});
  auto err = [](const std::vector<float>& a, const std::vector<double>& b) { return max_abs_diff(a, b) / max_abs_of(b); };
  CHECK(err(x.dq, x.dq_ref) < 1e-5);
  CHECK(err(x.dk, x.dk_ref) < 1e-5);
  CHECK(err(x.dv, x.dv_ref) < 1e-5);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.H; ++h)
      for (int64_t i = 0; i < d.Nq; ++i) {
        bool empty = true;
        for (int64_t j = 0; j < d.Nkv; ++j) empty = empty && !ref::sdpa_allowed(d, i, j, x.kv_len[size_t(b)]);
        CHECK(std::isfinite(x.lse[size_t((b * d.H + h) * d.Nq + i)]) == !empty);
        for (int64_t c = 0; c < d.D; ++c) {
          const float g = x.dq[size_t(((b * d.H + h) * d.Nq + i) * d.D + c)];
          REQUIRE(std::isfinite(g));
          if (empty) REQUIRE(g == 0.0f);
        }
      }
    for (int64_t hk = 0; hk < d.Hkv; ++hk)
      for (int64_t j = x.kv_len[size_t(b)]; j < d.Nkv; ++j)
        for (int64_t c = 0; c < d.D; ++c) {
          REQUIRE(x.dk[size_t(((b * d.Hkv + hk) * d.Nkv + j) * d.D + c)] == 0.0f);
          REQUIRE(x.dv[size_t(((b * d.Hkv + hk) * d.Nkv + j) * d.D + c)] == 0.0f);
        }
  }
  // One thread, and more threads than kv heads (the key tiles of a head split among tasks): the same gradients.
  d.B = 1, d.H = 2, d.Hkv = 1, d.Nq = 300, d.Nkv = 700;
  for (int threads : {1, 3}) {
    const DirectBackward y(d, {650}, threads);
    CHECK(err(y.dq, y.dq_ref) < 1e-5);
    CHECK(err(y.dk, y.dk_ref) < 1e-5);
    CHECK(err(y.dv, y.dv_ref) < 1e-5);
  }
}

TEST_CASE("sdpa cpu backward: explicit strides give the dense gradients", "[sdpa][backward]") {
  // q, k, v, dout, dq, dk, dv stored token-major (B, N, heads, D) against dense (B, heads, N, D).
  const int64_t B = 2, H = 4, Hkv = 2, Nq = 45, Nkv = 70, D = 32;
  std::mt19937_64 g(23);
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t(B * H * Nq * D)), k(size_t(B * Hkv * Nkv * D)), v(k.size()), dout(q.size());
  for (auto* x : {&q, &k, &v, &dout})
    for (auto& e : *x) e = nd(g);
  std::vector<int32_t> kv_len{70, 33};
  auto relayout = [&](const std::vector<float>& x, int64_t heads, int64_t n, bool to_token_major) {
    std::vector<float> y(x.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t d = 0; d < D; ++d) {
            const size_t dense = size_t(((b * heads + h) * n + i) * D + d), tok = size_t(((b * n + i) * heads + h) * D + d);
            if (to_token_major)
              y[tok] = x[dense];
            else
              y[dense] = x[tok];
          }
    return y;
  };
  auto run = [&](bool token_major) {
    auto lay = [&](const std::vector<float>& x, int64_t heads, int64_t n) {
      return token_major ? relayout(x, heads, n, true) : x;
    };
    const auto qs = lay(q, H, Nq), ks = lay(k, Hkv, Nkv), vs = lay(v, Hkv, Nkv), gs = lay(dout, H, Nq);
    auto strides = [&](int64_t heads, int64_t n) {
      return token_major ? SdpaStrides{n * heads * D, D, heads * D} : sdpa_dense_strides(heads, n, D);
    };
    std::vector<float> o(q.size()), lse(size_t(B * H * Nq)), dq(q.size()), dk(k.size()), dv(k.size());
    SdpaBackwardParams b;
    SdpaParams& p = b.fwd;
    p.B = B, p.H = H, p.Hkv = Hkv, p.Nq = Nq, p.Nkv = Nkv, p.D = D, p.causal = true, p.rope = SdpaRope::interleaved;
    p.q = qs.data(), p.k = ks.data(), p.v = vs.data(), p.o = o.data(), p.lse = lse.data(), p.kv_len = kv_len.data();
    p.q_strides = p.o_strides = strides(H, Nq);
    p.k_strides = p.v_strides = strides(Hkv, Nkv);
    b.dout = gs.data(), b.dq = dq.data(), b.dk = dk.data(), b.dv = dv.data();
    b.do_strides = b.dq_strides = strides(H, Nq);
    b.dk_strides = b.dv_strides = strides(Hkv, Nkv);
    const size_t bytes = std::max(cpu::sdpa_forward_fused_scratch_bytes(p, 2), cpu::sdpa_backward_fused_scratch_bytes(b, 2));
    std::vector<float> scratch(bytes / sizeof(float) + 16);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    cpu::sdpa_forward_fused(p, aligned, 2);
    cpu::sdpa_backward_fused(b, aligned, 2);
    if (token_major) dq = relayout(dq, H, Nq, false), dk = relayout(dk, Hkv, Nkv, false), dv = relayout(dv, Hkv, Nkv, false);
    return std::vector<std::vector<float>>{dq, dk, dv};
  };
  const auto dense = run(false), strided = run(true);
  for (size_t t = 0; t < 3; ++t)
    for (size_t i = 0; i < dense[t].size(); ++i) {
      REQUIRE(std::isfinite(dense[t][i]));
      REQUIRE(strided[t][i] == dense[t][i]);
    }
}

TEST_CASE("sdpa cpu backward: missing saved tensors are an error, not a crash", "[sdpa][backward]") {
  SdpaBackwardParams b;
  CHECK_THROWS_WITH(cpu::sdpa_backward_fused(b, nullptr, 1), Catch::Contains("o, lse, dout, dq, dk and dv"));
}
