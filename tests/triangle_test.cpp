// Triangle attention: reference vs a direct loop evaluation of OpenFold's formula, ending node =
// starting node on the transposed input, fully masked rows, OpenFold's own output, fused CPU vs
// reference, the per-element helpers shared with the CUDA kernels, CUDA where usable.
#include "impls/cpu/triangle.hpp"

#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <vector>

#include "harness/check.hpp"
#include "harness/errors.hpp"
#include "harness/runner.hpp"
#include "harness/safetensors.hpp"
#include "harness/variant.hpp"
#include "impls/cuda/triangle_math.hpp"
#include "reference/triangle.hpp"
#include "tests/backward_support.hpp"
#include "tests/support.hpp"

using namespace attnbench;
using namespace attnbench::test;

namespace {

const Variant& tri_variant() { return find_variant("triangle_attention", "triangle_test"); }

Params tri_params(int64_t N, bool starting, double mask_fraction, int64_t c_z = 13, int64_t c = 5, int64_t H = 3) {
  return tri_variant().complete(
      {{"N", N}, {"c_z", c_z}, {"c", c}, {"H", H}, {"starting", starting}, {"mask_fraction", mask_fraction}},
      "triangle_test");
}

/// Triangle attention (starting node) written out in plain loops from OpenFold's forward (no
/// Eigen, no code shared with the reference), with OpenFold's literal mask bias 1e9·(m_ik − 1).
std::vector<double> triangle_direct(const ref::TriangleDims& d, const TensorMap& in) {
  auto at = [&](const char* n, int64_t i) { return require(in, n, "direct").get(i); };
  const int64_t N = d.N, H = d.H, c = d.c, cz = d.c_z, Hc = H * c;
  std::vector<double> x(size_t(N * N * cz));
  for (int64_t p = 0; p < N * N; ++p) {
    double mean = 0, var = 0;
    for (int64_t k = 0; k < cz; ++k) mean += at("z", p * cz + k);
    mean /= double(cz);
    for (int64_t k = 0; k < cz; ++k) var += (at("z", p * cz + k) - mean) * (at("z", p * cz + k) - mean);
    var /= double(cz);
    for (int64_t k = 0; k < cz; ++k)
      x[size_t(p * cz + k)] =
          (at("z", p * cz + k) - mean) / std::sqrt(var + 1e-5) * at("layer_norm.weight", k) + at("layer_norm.bias", k);
  }
  auto lin = [&](const char* w, int64_t p, int64_t o) {
    double y = 0;
    for (int64_t k = 0; k < cz; ++k) y += at(w, o * cz + k) * x[size_t(p * cz + k)];
    return y;
  };
  std::vector<double> o(size_t(N * N * Hc)), out(size_t(N * N * cz));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t h = 0; h < H; ++h) {
        std::vector<double> a(static_cast<size_t>(N));
        double mx = -1e300;
        for (int64_t k = 0; k < N; ++k) {
          double qk = 0;
          for (int64_t e = 0; e < c; ++e)
            qk += lin("mha.linear_q.weight", i * N + j, h * c + e) / std::sqrt(double(c)) *
                  lin("mha.linear_k.weight", i * N + k, h * c + e);
          a[size_t(k)] = qk + lin("linear.weight", j * N + k, h) + 1e9 * (at("mask", i * N + k) - 1.0);
          mx = std::max(mx, a[size_t(k)]);
        }
        double sum = 0;
        for (double& v : a) sum += (v = std::exp(v - mx));
        for (int64_t e = 0; e < c; ++e) {
          double acc = 0;
          for (int64_t k = 0; k < N; ++k) acc += a[size_t(k)] / sum * lin("mha.linear_v.weight", i * N + k, h * c + e);
          const double g = lin("mha.linear_g.weight", i * N + j, h * c + e) + at("mha.linear_g.bias", h * c + e);
          o[size_t((i * N + j) * Hc + h * c + e)] = acc / (1.0 + std::exp(-g));
        }
      }
  for (int64_t p = 0; p < N * N; ++p)
    for (int64_t k = 0; k < cz; ++k) {
      double y = at("mha.linear_o.bias", k);
      for (int64_t e = 0; e < Hc; ++e) y += at("mha.linear_o.weight", k * Hc + e) * o[size_t(p * Hc + e)];
      out[size_t(p * cz + k)] = y;
    }
  return out;
}

/// z and mask transposed (pairs (i, j) ↔ (j, i)).
TensorMap transposed(const TensorMap& in) {
  TensorMap t = in;
  const Tensor& z = in.at("z");
  const int64_t N = z.dim(0), cz = z.dim(2);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t k = 0; k < cz; ++k) t.at("z").set((j * N + i) * cz + k, z.get((i * N + j) * cz + k));
      t.at("mask").set(j * N + i, in.at("mask").get(i * N + j));
    }
  return t;
}

}  // namespace

TEST_CASE("triangle reference equals a direct loop evaluation of OpenFold's formula", "[triangle]") {
  const Variant& v = tri_variant();
  for (double mf : {0.0, 0.3}) {
    const Params p = tri_params(6, true, mf, 7, 3, 2);
    const TensorMap in = v.make_inputs(p, 11, case_key(v, p));
    const Tensor got = v.reference(p, in, DType::f64).at("output");
    const std::vector<double> want = triangle_direct(ref::triangle_dims_from_tensors(in), in);
    double err = 0, mag = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
      mag = std::max(mag, std::abs(want[size_t(i)]));
    }
    INFO("mask_fraction " << mf << " max_abs " << err << " max|out| " << mag);
    CHECK(mag > 0.1);
    CHECK(err <= 1e-12 * mag);
  }
}

TEST_CASE("triangle ending node equals the starting node on the transposed input", "[triangle]") {
  const Variant& v = tri_variant();
  const Params start = tri_params(9, true, 0.25), end = tri_params(9, false, 0.25);
  const TensorMap in = v.make_inputs(end, 4, case_key(v, end));
  const TensorMap in_t = transposed(in);
  const Tensor out_end = v.reference(end, in, DType::f64).at("output");
  const Tensor out_start_t = v.reference(start, in_t, DType::f64).at("output");
  // Ending on z == transpose(starting on zᵀ).
  const int64_t N = 9, cz = 13;
  double err = 0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < cz; ++k)
        err = std::max(err, std::abs(out_end.get((i * N + j) * cz + k) - out_start_t.get((j * N + i) * cz + k)));
  CHECK(err == 0.0);
  // And the two differ (the test can fail): starting on z is another function.
  CHECK(max_abs_diff(v.reference(start, in, DType::f64).at("output"), out_end) > 1e-3);
  // The fused CPU kernel follows the same mapping.
  for (DType dt : {DType::f32, DType::bf16}) {
    const TensorMap cast = v.cast_inputs(end, in, dt);
    const TensorMap inr = to_f64(cast);
    const CheckResult r =
        check_equivalence(run_impl(v, "cpu", end, dt, cast).at("output"),
                          v.reference(end, inr, DType::f64).at("output"), v.reference(end, inr, dt).at("output"), dt);
    INFO(dtype_name(dt) << " max_abs " << r.max_abs << " naive " << r.naive_max_abs << " bound " << r.bound);
    CHECK(r.passed);
  }
}

TEST_CASE("triangle fused CPU matches the reference on odd shapes", "[triangle]") {
  const Variant& v = tri_variant();
  for (int64_t N : {1, 2, 17, 49, 65, 130}) {
    for (bool starting : {true, false}) {
      const Params p = N == 130 ? tri_params(N, starting, 0.1, 32, 16, 2) : tri_params(N, starting, N > 2 ? 0.2 : 0.0);
      const TensorMap in64 = v.make_inputs(p, 3, case_key(v, p));
      for (DType dt : {DType::f32, DType::bf16}) {
        const TensorMap in = v.cast_inputs(p, in64, dt);
        const TensorMap inr = to_f64(in);
        const Tensor oracle = v.reference(p, inr, DType::f64).at("output");
        const CheckResult r = check_equivalence(run_impl(v, "cpu", p, dt, in).at("output"), oracle,
                                                v.reference(p, inr, dt).at("output"), dt);
        INFO("N " << N << " starting " << starting << " " << dtype_name(dt) << " max_abs " << r.max_abs << " naive "
                  << r.naive_max_abs << " bound " << r.bound << " " << r.detail);
        CHECK(r.passed);
        // bf16 here is bf16 z with f32 arithmetic: hold it to the f32 rule too.
        CHECK(r.max_abs <= 2 * r.naive_max_abs + 16 * dtype_eps(DType::f32) * max_abs(oracle));
      }
    }
  }
}

TEST_CASE("triangle fully masked rows: finite, and the same as no mask", "[triangle]") {
  // inf·(m_ik − max_k m_ik) vanishes on a row whose keys are all masked: OpenFold's −1e9 offset
  // is a constant there and cancels in the softmax, so the row attends as if unmasked.
  const Variant& v = tri_variant();
  const Params all = tri_params(11, true, 1.0), none = tri_params(11, true, 0.0);
  const TensorMap in_all = v.make_inputs(all, 7, case_key(v, none));
  const TensorMap in_none = v.make_inputs(none, 7, case_key(v, none));
  for (int64_t i = 0; i < 121; ++i) {
    REQUIRE(in_all.at("mask").get(i) == 0.0);
    REQUIRE(in_none.at("mask").get(i) == 1.0);
  }
  const Tensor ref_all = v.reference(all, in_all, DType::f64).at("output");
  const Tensor ref_none = v.reference(none, in_none, DType::f64).at("output");
  CHECK(all_finite(ref_all));
  CHECK(max_abs_diff(ref_all, ref_none) <= 1e-12 * max_abs(ref_none));
  for (DType dt : {DType::f32, DType::bf16}) {
    const Tensor cpu_all = run_impl(v, "cpu", all, dt, v.cast_inputs(all, in_all, dt)).at("output");
    const Tensor ref_t = v.reference(none, to_f64(v.cast_inputs(none, in_none, dt)), DType::f64).at("output");
    CHECK(all_finite(cpu_all));
    CHECK(max_abs_diff(cpu_all, ref_t) <= 1e-5 * max_abs(ref_t));
  }
  // One fully masked row among partially masked ones: that row is the unmasked row; others
  // ignore their masked keys.
  TensorMap mixed = v.make_inputs(tri_params(11, true, 0.3), 7, case_key(v, none));
  for (int64_t k = 0; k < 11; ++k) mixed.at("mask").set(3 * 11 + k, 0.0);
  const Params pm = tri_params(11, true, 0.3);
  const Tensor ref_mixed = v.reference(pm, mixed, DType::f64).at("output");
  CHECK(all_finite(ref_mixed));
  const Tensor cpu_mixed = run_impl(v, "cpu", pm, DType::f32, v.cast_inputs(pm, mixed, DType::f32)).at("output");
  CHECK(all_finite(cpu_mixed));
  CHECK(max_abs_diff(cpu_mixed, ref_mixed) <= 1e-5 * max_abs(ref_mixed));
  // Row 3 of the output (pairs (3, j)) equals the unmasked computation of row 3.
  TensorMap unmasked_row = mixed;
  for (int64_t k = 0; k < 11; ++k) unmasked_row.at("mask").set(3 * 11 + k, 1.0);
  const Tensor ref_row = v.reference(pm, unmasked_row, DType::f64).at("output");
  double err = 0;
  for (int64_t e = 3 * 11 * 13; e < 4 * 11 * 13; ++e) err = std::max(err, std::abs(ref_mixed.get(e) - ref_row.get(e)));
  CHECK(err <= 1e-12 * max_abs(ref_row));
}

TEST_CASE("triangle reference reproduces OpenFold's own output", "[triangle][case-file]") {
  const std::string path = std::string(ATTNBENCH_SHARED_DIR) + "/cases/openfold_triangle_start_N17.safetensors";
  if (!std::filesystem::exists(path)) {
    WARN("skipped: " << path << " not found");
    return;
  }
  const Variant& v = tri_variant();
  const TensorMap file = to_f64(read_safetensors(path).tensors);
  const Params p = v.complete(v.params_from_tensors(file), "openfold case");
  CHECK(p["N"] == 17);
  CHECK(p["c_z"] == 128);
  CHECK(p["c"] == 32);
  CHECK(p["H"] == 4);
  CHECK(p["starting"] == true);
  const Tensor& want = file.at("output");
  const double mag = max_abs(want);
  const Tensor got = v.reference(p, file, DType::f64).at("output");
  INFO("f64 reference max_abs " << max_abs_diff(got, want) << " of " << mag);
  CHECK(max_abs_diff(got, want) <= 1e-12 * mag);
  TensorMap in = file;
  in.erase("output");
  const Tensor cpu = run_impl(v, "cpu", p, DType::f32, v.cast_inputs(p, in, DType::f32)).at("output");
  INFO("cpu f32 max_abs " << max_abs_diff(cpu, want));
  CHECK(max_abs_diff(cpu, want) <= 1e-5 * mag);
}

TEST_CASE("triangle params from tensors and corrupt weights", "[triangle][case-file]") {
  const Variant& v = tri_variant();
  const Params p = tri_params(9, true, 0.2);
  const TensorMap in = v.make_inputs(p, 1, case_key(v, p));
  const Params q = v.complete(v.params_from_tensors(in), "t");
  for (const char* k : {"N", "c_z", "c", "H"}) CHECK(q[k] == p[k]);
  CHECK(q["starting"] == true);
  SECTION("a weight with the wrong shape names the tensor") {
    TensorMap bad = in;
    bad.at("mha.linear_k.weight") = Tensor(DType::f64, {7, 13});
    CHECK_THROWS_AS(v.params_from_tensors(bad), InputError);
    CHECK_THROWS_WITH(v.params_from_tensors(bad), Catch::Contains("mha.linear_k.weight"));
  }
  SECTION("a missing tensor is named") {
    TensorMap bad = in;
    bad.erase("mha.linear_g.bias");
    CHECK_THROWS_WITH(v.params_from_tensors(bad), Catch::Contains("mha.linear_g.bias"));
  }
  SECTION("q rows not a multiple of H") {
    TensorMap bad = in;
    bad.at("mha.linear_q.weight") = Tensor(DType::f64, {16, 13});
    CHECK_THROWS_AS(v.params_from_tensors(bad), InputError);
  }
  SECTION("invalid params name the parameter") {
    CHECK_THROWS_WITH(v.complete({{"N", 0}}, "t"), Catch::Contains("N: expected"));
    CHECK_THROWS_WITH(v.complete({{"mask_fraction", 2.0}}, "t"), Catch::Contains("mask_fraction: expected"));
  }
}

TEST_CASE("triangle fused CPU scratch is O(N²·H), not O(N³)", "[triangle][memory]") {
  // (H + 1) floats per pair against z's c_z = 128, plus O(N) per thread.
  for (int64_t N : {1024, 2048}) {
    const triangle::TriangleShape s{N, 128, 32, 4, true};
    const double z_bytes = double(N) * double(N) * 128.0 * 4.0;
    const double scratch = double(triangle_attention_forward_fused_scratch_bytes(s, 2));
    INFO("N " << N << " scratch " << scratch << " z " << z_bytes);
    CHECK(scratch <= 0.06 * z_bytes);
  }
  const Variant& v = tri_variant();
  const Params p = tri_params(20, true, 0.0);
  const TensorMap in = v.cast_inputs(p, v.make_inputs(p, 1, case_key(v, p)), DType::f32);
  TensorMap out;
  out.emplace("output", Tensor(DType::f32, {20, 20, 13}));
  Workspace ws;
  v.find_impl("cpu")->make(ImplArgs{p, DType::f32, in, out, ws})->run();
  CHECK(ws.peak_bytes() == triangle_attention_forward_fused_scratch_bytes({20, 13, 5, 3, true}, omp_get_max_threads()));
}

TEST_CASE("triangle reference backward equals finite differences beyond the test shapes", "[triangle][gradient]") {
  test::check_reference_gradients_fd(tri_variant(), tri_params(5, true, 0.3, 6, 3, 2));
  test::check_reference_gradients_fd(tri_variant(), tri_params(4, false, 0.25, 7, 4, 3));
}

TEST_CASE("triangle cpu backward holds the rule: odd shapes, both nodes, masks, tile edges, every dtype",
          "[triangle][gradient]") {
  // N 70: a key tile of 64 and a partial one, query tiles of 48 and 22; N 130: three of each.
  const std::vector<Params> shapes = {
      tri_params(1, true, 0.0),           tri_params(7, false, 0.25),         tri_params(33, true, 0.3),
      tri_params(70, false, 0.2, 16, 8, 2), tri_params(130, true, 0.1, 8, 5, 1),
      tri_params(33, false, 0.3, 24, 16, 2), tri_params(7, true, 0.2, 16, 24, 3),  // c 16, 24 (c 32: below)
      tri_params(9, true, 1.0),  // every key masked: each row attends as if unmasked (finite gradients)
  };
  for (const Params& s : shapes)
    for (DType d : {DType::f32, DType::bf16, DType::f16})
      for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) test::require_pass_ok(tri_variant(), "cpu", d, s, pass);
}

TEST_CASE("triangle backward at AF2 dims (c_z 128, c 32, H 4) holds the rule", "[triangle][gradient]") {
  test::require_pass_ok(tri_variant(), "cpu", DType::f32, tri_params(21, true, 0.1, 128, 32, 4), Pass::fwd_bwd, 1);
  test::require_pass_ok(tri_variant(), "cpu", DType::bf16, tri_params(21, false, 0.1, 128, 32, 4), Pass::fwd_bwd, 1);
}

TEST_CASE("triangle fused CPU backward scratch is O(N²·H), not O(N³)", "[triangle][memory]") {
  // Per thread H·N² doubles (the pair bias's gradient) and O(N) rows; the forward saves
  // N²·(H·c + H) floats. At AF2 dims and N 512 all of it is far below the 2 GB.
  const auto bytes = [](int64_t N) {
    const triangle::TriangleShape s{N, 128, 32, 4, true};
    const double saved = 4.0 * double(N) * double(N) * (128.0 + 4.0);
    return double(triangle_attention_backward_fused_scratch_bytes(s, 2)) + saved;
  };
  INFO("N 512: " << bytes(512) << " bytes, N 1024: " << bytes(1024));
  CHECK(bytes(512) < 0.2e9);
  CHECK(bytes(1024) < 4.2 * bytes(512));  // quadratic in N (cubic would be 8×)
}

TEST_CASE("triangle per-element helpers (shared with the CUDA kernels)", "[triangle][cuda-math]") {
  const triangle::TriangleShape s{5, 3, 2, 1, true}, e{5, 3, 2, 1, false};
  CHECK(s.pair(1, 3) == 8);
  CHECK(e.pair(1, 3) == 16);
  CHECK(s.hidden() == 2);
  // Values 1, 2, 3, 6: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, variance 3.5.
  const float mean = 3.f, inv = triangle::layer_norm_inv_std(14.f, 4);
  CHECK(inv == Approx(1.0 / std::sqrt(3.5 + 1e-5)).epsilon(1e-6));
  CHECK(triangle::layer_norm_apply(6.f, mean, inv, 2.f, 0.5f) == Approx(2.0 * 3.0 / std::sqrt(3.5 + 1e-5) + 0.5));
  CHECK(triangle::mask_bias(1.f, 1.f) == 0.f);
  CHECK(triangle::mask_bias(0.f, 1.f) == -1e9f);
  CHECK(triangle::mask_bias(0.f, 0.f) == 0.f);
  CHECK(triangle::sigmoid(0.f) == 0.5f);
  CHECK(triangle::sigmoid(2.f) == Approx(1.0 / (1.0 + std::exp(-2.0))));

  Rng rng(5);
  std::vector<float> xs, vs;
  for (int j = 0; j < 77; ++j) {
    xs.push_back(float(3 * rng.normal()));
    vs.push_back(float(rng.normal()));
  }
  double mx = -1e30, sum = 0, dot = 0;
  for (float xv : xs) mx = std::max(mx, double(xv));
  for (size_t j = 0; j < xs.size(); ++j) {
    sum += std::exp(xs[j] - mx);
    dot += std::exp(xs[j] - mx) * vs[j];
  }
  triangle::OnlineSoftmax st;
  float acc = 0;
  for (size_t j0 = 0; j0 < xs.size(); j0 += 32) {
    float bmax = -INFINITY;
    for (size_t j = j0; j < std::min(xs.size(), j0 + 32); ++j) bmax = std::max(bmax, xs[j]);
    acc *= triangle::online_softmax_rescale(st, bmax);
    for (size_t j = j0; j < std::min(xs.size(), j0 + 32); ++j) {
      const float ex = std::exp(xs[j] - st.m);
      st.l += ex;
      acc += ex * vs[j];
    }
  }
  CHECK(acc * triangle::online_softmax_inv_sum(st) == Approx(dot / sum).epsilon(1e-5));
  CHECK(triangle::online_softmax_inv_sum(triangle::OnlineSoftmax{}) == 0.f);
}

TEST_CASE("triangle CUDA matches the reference", "[triangle][cuda]") {
  if (!cuda_usable()) {
    WARN("skipped: " << cuda_unusable_reason());
    return;
  }
  const Variant& v = tri_variant();
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  for (const Params& p :
       {tri_params(17, true, 0.25), tri_params(33, false, 0.1), v.complete({{"N", 70}, {"mask_fraction", 0.1}}, "t")})
    for (DType dt : {DType::f32, DType::bf16}) {
      const auto rec = run_case(CaseSpec{&v, "cuda", dt, p}, o);
      INFO(rec.dump());
      CHECK(rec["status"] == "ok");
    }
}
