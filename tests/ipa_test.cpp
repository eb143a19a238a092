// Invariant Point Attention: reference vs a direct loop evaluation of the formula, fused CPU
// (and CUDA where usable) vs reference, masks, SE(3) invariance, OpenFold's own output, the
// per-pair helpers shared with the CUDA kernel, case files.
#include <catch2/catch.hpp>

#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "harness/check.hpp"
#include "harness/errors.hpp"
#include "harness/runner.hpp"
#include "harness/safetensors.hpp"
#include "harness/variant.hpp"
#include "impls/cpu/ipa.hpp"
#include "impls/cuda/ipa_math.hpp"
#include "reference/ipa.hpp"
#include "tests/support.hpp"

using namespace attnbench;
using namespace attnbench::test;

namespace {

const Variant& ipa_variant() { return find_variant("ipa", "ipa_test"); }

Params odd_params(int64_t N, double mask_fraction = 0.0) {
  return ipa_variant().complete({{"N", N}, {"c_s", 13}, {"c_z", 17}, {"c", 19}, {"H", 5}, {"P", 7}, {"P_v", 11},
                                 {"mask_fraction", mask_fraction}},
                                "ipa_test");
}

/// IPA written out in plain loops from OpenFold's forward (no Eigen, no shared code with the
/// reference), including OpenFold's literal mask inf · (m_i m_j − 1) and f32 frames.
std::vector<double> ipa_direct(const ref::IpaDims& d, const TensorMap& in) {
  auto at = [&](const char* n, int64_t i) { return require(in, n, "direct").get(i); };
  auto lin = [&](const std::string& n, int64_t i, int64_t o, int64_t in_dim, const char* x) {
    double y = at((n + ".bias").c_str(), o);
    for (int64_t k = 0; k < in_dim; ++k) y += at((n + ".weight").c_str(), o * in_dim + k) * at(x, i * in_dim + k);
    return y;
  };
  const int64_t N = d.N, H = d.H, c = d.c, P = d.P, Pv = d.Pv, PP = P + Pv, cz = d.c_z;
  auto R = [&](int64_t i, int a, int b) { return double(float(at("rotations", i * 9 + a * 3 + b))); };
  auto t = [&](int64_t i, int a) { return double(float(at("translations", i * 3 + a))); };
  // Global points: local = (x block, y block, z block) of the linear's output.
  auto point = [&](const std::string& n, int64_t i, int64_t idx, int64_t count, int a) {
    double loc[3];
    for (int e = 0; e < 3; ++e) loc[e] = lin(n, i, e * count + idx, d.c_s, "s");
    return R(i, a, 0) * loc[0] + R(i, a, 1) * loc[1] + R(i, a, 2) * loc[2] + t(i, a);
  };
  std::vector<double> q(N * H * c), k(N * H * c), v(N * H * c), qp(N * H * P * 3), kvp(N * H * PP * 3);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < c; ++e) {
        q[(i * H + h) * c + e] = lin("linear_q", i, h * c + e, d.c_s, "s");
        k[(i * H + h) * c + e] = lin("linear_kv", i, h * 2 * c + e, d.c_s, "s");
        v[(i * H + h) * c + e] = lin("linear_kv", i, h * 2 * c + c + e, d.c_s, "s");
      }
    for (int64_t n = 0; n < H * P; ++n)
      for (int a = 0; a < 3; ++a) qp[(i * H * P + n) * 3 + a] = point("linear_q_points.linear", i, n, H * P, a);
    for (int64_t n = 0; n < H * PP; ++n)
      for (int a = 0; a < 3; ++a) kvp[(i * H * PP + n) * 3 + a] = point("linear_kv_points.linear", i, n, H * PP, a);
  }
  const int64_t F = d.concat_dim();
  std::vector<double> feat(N * F, 0.0), out(N * d.c_s);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const double w = at("head_weights", h);
      const double gamma = std::log1p(std::exp(w)) * std::sqrt(1.0 / (3.0 * (double(P) * 9.0 / 2.0)));
      std::vector<double> logit(N);
      double mx = -1e300;
      for (int64_t j = 0; j < N; ++j) {
        double qk = 0, b = at("linear_b.bias", h), d2 = 0;
        for (int64_t e = 0; e < c; ++e) qk += q[(i * H + h) * c + e] * k[(j * H + h) * c + e];
        for (int64_t e = 0; e < cz; ++e) b += at("linear_b.weight", h * cz + e) * at("z", (i * N + j) * cz + e);
        for (int64_t p = 0; p < P; ++p)
          for (int a = 0; a < 3; ++a) {
            const double diff = qp[((i * H + h) * P + p) * 3 + a] - kvp[((j * H + h) * PP + p) * 3 + a];
            d2 += diff * diff;
          }
        logit[j] = std::sqrt(1.0 / (3.0 * c)) * qk + std::sqrt(1.0 / 3.0) * b - 0.5 * gamma * d2 +
                   1e5 * (at("mask", i) * at("mask", j) - 1.0);
        mx = std::max(mx, logit[j]);
      }
      double sum = 0;
      for (double& x : logit) sum += (x = std::exp(x - mx));
      for (double& x : logit) x /= sum;
      for (int64_t j = 0; j < N; ++j) {
        const double a = logit[j];
        for (int64_t e = 0; e < c; ++e) feat[i * F + h * c + e] += a * v[(j * H + h) * c + e];
        for (int64_t e = 0; e < cz; ++e) feat[i * F + H * (c + 4 * Pv) + h * cz + e] += a * at("z", (i * N + j) * cz + e);
      }
      for (int64_t p = 0; p < Pv; ++p) {
        double g[3] = {0, 0, 0};
        for (int64_t j = 0; j < N; ++j)
          for (int a = 0; a < 3; ++a) g[a] += logit[j] * kvp[((j * H + h) * PP + P + p) * 3 + a];
        double l[3], n2 = 0;
        for (int a = 0; a < 3; ++a) {
          l[a] = 0;
          for (int b = 0; b < 3; ++b) l[a] += R(i, b, a) * (g[b] - t(i, b));
          n2 += l[a] * l[a];
          feat[i * F + H * c + a * H * Pv + h * Pv + p] = l[a];
        }
        feat[i * F + H * (c + 3 * Pv) + h * Pv + p] = std::sqrt(n2 + 1e-8);
      }
    }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t o = 0; o < d.c_s; ++o) {
      double y = at("linear_out.bias", o);
      for (int64_t e = 0; e < F; ++e) y += at("linear_out.weight", o * F + e) * feat[i * F + e];
      out[i * d.c_s + o] = y;
    }
  return out;
}

}  // namespace

TEST_CASE("ipa reference equals a direct loop evaluation of OpenFold's formula", "[ipa]") {
  const Variant& v = ipa_variant();
  for (double mf : {0.0, 0.4}) {
    const Params p = v.complete({{"N", 6}, {"c_s", 5}, {"c_z", 3}, {"c", 2}, {"H", 3}, {"P", 2}, {"P_v", 3},
                                 {"mask_fraction", mf}},
                                "t");
    const TensorMap in = v.make_inputs(p, 11, case_key(v, p));
    const Tensor got = v.reference(p, in, DType::f64).at("output");
    const std::vector<double> want = ipa_direct(ref::ipa_dims_from_tensors(in), in);
    double err = 0, mag = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
      mag = std::max(mag, std::abs(want[size_t(i)]));
    }
    INFO("mask_fraction " << mf << " max_abs " << err << " max|out| " << mag);
    CHECK(err <= 1e-9 * mag);  // OpenFold's literal −1e5 mask offset costs ~1e-11 in f64
  }
}

TEST_CASE("ipa fused CPU matches the reference on odd shapes and dtypes", "[ipa]") {
  const Variant& v = ipa_variant();
  for (int64_t N : {1, 2, 13, 64, 65, 130}) {
    const Params p = odd_params(N, N > 2 ? 0.2 : 0.0);
    const TensorMap in64 = v.make_inputs(p, 3, case_key(v, p));
    for (DType dt : {DType::f32, DType::bf16}) {
      const TensorMap in = v.cast_inputs(p, in64, dt);
      const TensorMap inr = to_f64(in);  // the oracle sees the dtype-rounded inputs
      const Tensor oracle = v.reference(p, inr, DType::f64).at("output");
      const Tensor naive = v.reference(p, inr, dt).at("output");
      const Tensor got = run_impl(v, "cpu", p, dt, in).at("output");
      const CheckResult r = check_equivalence(got, oracle, naive, dt);
      INFO("N " << N << " " << dtype_name(dt) << " max_abs " << r.max_abs << " naive " << r.naive_max_abs << " bound "
                << r.bound << " " << r.detail);
      CHECK(r.passed);
      // The rule's bf16 floor is loose (8 ulps of bf16); IPA's bf16 is bf16 z with f32 arithmetic,
      // so hold it to the f32 rule as well.
      CHECK(r.max_abs <= 2 * r.naive_max_abs + 8 * dtype_eps(DType::f32) * max_abs(oracle));
    }
  }
}

TEST_CASE("ipa AF2 dims: fused CPU within the rule at N = 97", "[ipa]") {
  const Variant& v = ipa_variant();
  const Params p = v.complete({{"N", 97}, {"mask_fraction", 0.1}}, "t");
  const TensorMap in = v.cast_inputs(p, v.make_inputs(p, 5, case_key(v, p)), DType::f32);
  const TensorMap inr = to_f64(in);
  const CheckResult r = check_equivalence(run_impl(v, "cpu", p, DType::f32, in).at("output"),
                                          v.reference(p, inr, DType::f64).at("output"),
                                          v.reference(p, inr, DType::f32).at("output"), DType::f32);
  INFO("max_abs " << r.max_abs << " naive " << r.naive_max_abs << " bound " << r.bound);
  CHECK(r.passed);
}

TEST_CASE("ipa fully masked residues: finite, and the same as no mask", "[ipa]") {
  // inf · m_i (m_j − 1) vanishes when every m is 0, so a fully masked input equals an unmasked
  // one (OpenFold: the constant −inf shift cancels in the softmax). Never NaN.
  const Variant& v = ipa_variant();
  const Params all = odd_params(23, 1.0), none = odd_params(23, 0.0);
  const TensorMap in_all = v.make_inputs(all, 7, case_key(v, none));
  const TensorMap in_none = v.make_inputs(none, 7, case_key(v, none));
  for (int64_t i = 0; i < 23; ++i) {
    REQUIRE(in_all.at("mask").get(i) == 0.0);
    REQUIRE(in_none.at("mask").get(i) == 1.0);
  }
  const Tensor ref_all = v.reference(all, in_all, DType::f64).at("output");
  const Tensor ref_none = v.reference(none, in_none, DType::f64).at("output");
  CHECK(all_finite(ref_all));
  CHECK(max_abs_diff(ref_all, ref_none) <= 1e-12 * max_abs(ref_none));
  for (DType dt : {DType::f32, DType::bf16}) {
    const Tensor cpu_all = run_impl(v, "cpu", all, dt, v.cast_inputs(all, in_all, dt)).at("output");
    const Tensor ref_none_t = v.reference(none, to_f64(v.cast_inputs(none, in_none, dt)), DType::f64).at("output");
    CHECK(all_finite(cpu_all));
    CHECK(max_abs_diff(cpu_all, ref_none_t) <= 1e-5 * max_abs(ref_none_t));
  }
  // Half masked: masked queries attend like unmasked ones; masked keys get weight ~e^−1e5.
  const Params half = odd_params(23, 0.5);
  const TensorMap in_half = v.make_inputs(half, 7, case_key(v, none));
  const Tensor ref_half = v.reference(half, in_half, DType::f64).at("output");
  const Tensor cpu_half = run_impl(v, "cpu", half, DType::f32, v.cast_inputs(half, in_half, DType::f32)).at("output");
  CHECK(all_finite(cpu_half));
  CHECK(max_abs_diff(cpu_half, ref_half) <= 1e-5 * max_abs(ref_half));
}

TEST_CASE("ipa SE(3) invariance at 1, 10, 100, 1000 Å", "[ipa]") {
  const Variant& v = ipa_variant();
  const auto props = v.properties();
  REQUIRE(props.size() == 1);
  REQUIRE(props[0].name == "se3_invariance");
  for (const auto& [impl, dt] : std::vector<std::pair<std::string, DType>>{
           {"reference", DType::f64}, {"cpu", DType::f32}, {"cpu", DType::bf16}}) {
    const Params p = impl == "reference" ? odd_params(19, 0.2) : v.complete({{"N", 70}, {"mask_fraction", 0.1}}, "t");
    const TensorMap in = v.cast_inputs(p, v.make_inputs(p, 9, case_key(v, p)), dt);
    RunOn run = [&](const TensorMap& x) { return run_impl(v, impl, p, dt, x); };
    Rng rng(42);
    const auto results = props[0].check(p, dt, in, run, rng, nlohmann::json::object());
    REQUIRE(results.size() == 4);
    const char* names[] = {"se3_t1", "se3_t10", "se3_t100", "se3_t1000"};
    for (size_t k = 0; k < 4; ++k) {
      const auto& [name, r] = results[k];
      CHECK(name == names[k]);
      CHECK(r.extra["property"] == "se3_invariance");
      INFO(impl << " " << dtype_name(dt) << " " << name << " max_abs " << r.max_abs << " max_rel " << r.max_rel
                << " bound " << r.bound);
      CHECK(r.passed);
      if (name == "se3_t10" && dt != DType::f64) CHECK(r.max_rel <= 1e-5);  // the target
    }
  }
}

TEST_CASE("ipa reference reproduces OpenFold's own output", "[ipa][case-file]") {
  const std::string path = std::string(ATTNBENCH_SHARED_DIR) + "/cases/openfold_ipa_N23.safetensors";
  if (!std::filesystem::exists(path)) {
    WARN("skipped: " << path << " not found");
    return;
  }
  const Variant& v = ipa_variant();
  const TensorMap file = to_f64(read_safetensors(path).tensors);
  const Params p = v.complete(v.params_from_tensors(file), "openfold case");
  CHECK(p["N"] == 23);
  CHECK(p["c_s"] == 384);
  CHECK(p["c_z"] == 128);
  CHECK(p["H"] == 12);
  CHECK(p["P"] == 4);
  CHECK(p["P_v"] == 8);
  const Tensor& want = file.at("output");
  const double mag = max_abs(want);
  const Tensor got = v.reference(p, file, DType::f64).at("output");
  INFO("f64 reference max_abs " << max_abs_diff(got, want) << " of " << mag);
  CHECK(max_abs_diff(got, want) <= 1e-10 * mag);
  TensorMap in = file;
  in.erase("output");
  const Tensor cpu = run_impl(v, "cpu", p, DType::f32, v.cast_inputs(p, in, DType::f32)).at("output");
  INFO("cpu f32 max_abs " << max_abs_diff(cpu, want));
  CHECK(max_abs_diff(cpu, want) <= 1e-5 * mag);
}

TEST_CASE("ipa case file round trip and corrupt weights", "[ipa][case-file]") {
  const Variant& v = ipa_variant();
  const Params p = odd_params(9, 0.2);
  TensorMap in = v.make_inputs(p, 1, case_key(v, p));
  TensorMap file = in;
  file.emplace("output", v.reference(p, in, DType::f64).at("output"));
  const std::string path =
      (std::filesystem::temp_directory_path() / ("ipa_case_" + std::to_string(::getpid()) + ".safetensors")).string();
  write_safetensors(path, file, {{"source", "ipa_test"}});
  const TensorMap back = to_f64(read_safetensors(path).tensors);
  std::filesystem::remove(path);
  const Params q = v.complete(v.params_from_tensors(back), "round trip");
  for (const char* k : {"N", "c_s", "c_z", "c", "H", "P", "P_v"}) CHECK(q[k] == p[k]);
  CHECK(max_abs_diff(v.reference(q, back, DType::f64).at("output"), back.at("output")) == 0.0);

  SECTION("a weight with the wrong shape names the tensor") {
    TensorMap bad = back;
    bad.at("linear_kv.weight") = Tensor(DType::f64, {7, 13});
    CHECK_THROWS_AS(v.params_from_tensors(bad), InputError);
    CHECK_THROWS_WITH(v.params_from_tensors(bad), Catch::Contains("linear_kv.weight"));
  }
  SECTION("a missing tensor is named") {
    TensorMap bad = back;
    bad.erase("linear_b.bias");
    CHECK_THROWS_WITH(v.params_from_tensors(bad), Catch::Contains("linear_b.bias"));
  }
  SECTION("point weights that are not a multiple of 3·H") {
    TensorMap bad = back;
    bad.at("linear_q_points.linear.weight") = Tensor(DType::f64, {3 * 5 * 7 + 1, 13});
    CHECK_THROWS_AS(v.params_from_tensors(bad), InputError);
  }
}

TEST_CASE("ipa fused CPU scratch stays within 5% of z for N >= 1024", "[ipa][memory]") {
  for (int64_t N : {1024, 2048, 4096}) {
    const ipa::IpaShape s{N, 384, 128, 16, 12, 4, 8};
    const double z_bytes = double(N) * double(N) * 128.0 * 4.0;
    const double scratch = double(ipa_forward_fused_scratch_bytes(s, omp_get_max_threads()));
    INFO("N " << N << " scratch " << scratch << " z " << z_bytes);
    CHECK(scratch <= 0.05 * z_bytes);
  }
  // And what the Workspace records for a real call matches the model.
  const Variant& v = ipa_variant();
  const Params p = v.complete({{"N", 70}}, "t");
  const TensorMap in = v.cast_inputs(p, v.make_inputs(p, 1, case_key(v, p)), DType::f32);
  TensorMap out;
  out.emplace("output", Tensor(DType::f32, {70, 384}));
  Workspace ws;
  v.find_impl("cpu")->make(ImplArgs{p, DType::f32, in, out, ws})->run();
  CHECK(ws.peak_bytes() == ipa_forward_fused_scratch_bytes({70, 384, 128, 16, 12, 4, 8}, omp_get_max_threads()));
}

TEST_CASE("ipa per-pair helpers (shared with the CUDA kernel)", "[ipa][cuda-math]") {
  Rng rng(3);
  const Eigen::Matrix3d Rd = ref::haar_rotation(rng);
  CHECK((Rd * Rd.transpose() - Eigen::Matrix3d::Identity()).norm() < 1e-12);
  CHECK(Rd.determinant() == Approx(1.0).margin(1e-12));
  float R[9], t[3] = {1.5f, -2.f, 0.25f}, x[3] = {0.3f, -0.7f, 2.f};
  for (int a = 0; a < 9; ++a) R[a] = float(Rd(a / 3, a % 3));
  float g[3], back[3];
  ipa::frame_apply(R, t, x, g);
  for (int a = 0; a < 3; ++a) {
    const double want = Rd(a, 0) * x[0] + Rd(a, 1) * x[1] + Rd(a, 2) * x[2] + t[a];
    CHECK(g[a] == Approx(want).margin(1e-5));
  }
  ipa::frame_invert_apply(R, t, g, back);
  for (int a = 0; a < 3; ++a) CHECK(back[a] == Approx(x[a]).margin(1e-5));

  const float qp[6] = {1, 2, 3, -1, 0, 4}, kp[6] = {0, 2, 1, -1, 3, 4};
  CHECK(ipa::point_sqdist(qp, kp, 2) == Approx(1 + 0 + 4 + 0 + 9 + 0));
  CHECK(ipa::softplus(0.541324854612918f) == Approx(1.0f).epsilon(1e-6));
  CHECK(ipa::point_weight(0.f, 4) == Approx(std::log(2.0) * std::sqrt(1.0 / 54.0)).epsilon(1e-6));
  CHECK(ipa::logit(0.5f, 0.25f, 2.f, 0.1f, 1.f, 0.f) == Approx(0.5 + 0.25 - 0.1 - 1e5));
  CHECK(ipa::logit(0.5f, 0.25f, 2.f, 0.1f, 0.f, 0.f) == Approx(0.5 + 0.25 - 0.1));
  CHECK(ipa::point_norm(x) == Approx(std::sqrt(0.09 + 0.49 + 4.0 + 1e-8)));

  // Online softmax over blocks equals the plain softmax-weighted sum.
  std::vector<float> xs, vs;
  for (int j = 0; j < 100; ++j) {
    xs.push_back(float(3 * rng.normal()));
    vs.push_back(float(rng.normal()));
  }
  double mx = -1e30, sum = 0, dot = 0;
  for (float xv : xs) mx = std::max(mx, double(xv));
  for (size_t j = 0; j < xs.size(); ++j) {
    sum += std::exp(xs[j] - mx);
    dot += std::exp(xs[j] - mx) * vs[j];
  }
  ipa::OnlineSoftmax st;
  float acc = 0;
  for (size_t j0 = 0; j0 < xs.size(); j0 += 32) {
    float bmax = -INFINITY;
    for (size_t j = j0; j < std::min(xs.size(), j0 + 32); ++j) bmax = std::max(bmax, xs[j]);
    acc *= ipa::online_softmax_rescale(st, bmax);
    for (size_t j = j0; j < std::min(xs.size(), j0 + 32); ++j) {
      const float e = std::exp(xs[j] - st.m);
      st.l += e;
      acc += e * vs[j];
    }
  }
  CHECK(acc * ipa::online_softmax_inv_sum(st) == Approx(dot / sum).epsilon(1e-5));
  CHECK(ipa::online_softmax_inv_sum(ipa::OnlineSoftmax{}) == 0.f);
}

TEST_CASE("ipa CUDA matches the reference", "[ipa][cuda]") {
  if (!cuda_usable()) {
    WARN("skipped: " << cuda_unusable_reason());
    return;
  }
  const Variant& v = ipa_variant();
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  for (const Params& p : {odd_params(67, 0.25), v.complete({{"N", 130}, {"mask_fraction", 0.1}}, "t")})
    for (DType dt : {DType::f32, DType::bf16}) {
      const auto rec = run_case(CaseSpec{&v, "cuda", dt, p}, o);
      INFO(rec.dump());
      CHECK(rec["status"] == "ok");
    }
}

TEST_CASE("ipa_factorized: fused CPU matches its reference, SE(3) invariant, O(N) scratch", "[ipa]") {
  const Variant& v = find_variant("ipa_factorized", "ipa_test");
  for (const Params& given : v.test_shapes()) {
    const Params p = v.complete(given, "t");
    const TensorMap in = v.cast_inputs(p, v.make_inputs(p, 2, case_key(v, p)), DType::f32);
    const TensorMap inr = to_f64(in);
    const Tensor got = run_impl(v, "cpu", p, DType::f32, in).at("output");
    const CheckResult r = check_equivalence(got, v.reference(p, inr, DType::f64).at("output"),
                                            v.reference(p, inr, DType::f32).at("output"), DType::f32);
    INFO(p.dump() << " max_abs " << r.max_abs << " naive " << r.naive_max_abs << " bound " << r.bound);
    CHECK(r.passed);
    RunOn run = [&](const TensorMap& x) { return run_impl(v, "cpu", p, DType::f32, x); };
    Rng rng(1);
    for (const auto& [name, cr] : v.properties().at(0).check(p, DType::f32, in, run, rng, nlohmann::json::object())) {
      INFO(name << " max_rel " << cr.max_rel);
      CHECK(cr.passed);
    }
  }
  // Scratch at AF2 dims, N = 4096, rank 2, c_z 32: far below what one z would take.
  const ipa::IpaShape s{4096, 384, 32, 16, 12, 4, 8};
  CHECK(double(ipa_forward_fused_scratch_bytes(s, 2, 2)) <= 0.05 * 4096.0 * 4096.0 * 32.0 * 4.0);
}
