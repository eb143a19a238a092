// The double-attention pair block: the reference against a literal transcription of DESIGN.md's
// equations (gather softmax over all edges per channel, D × D context, distribute softmax over
// channels per edge), one edge and channel at a time; the reference backward against finite
// differences beyond the test shapes; the CPU forward and backward through the runner on odd
// shapes and every dtype and at the seed's dims (D = c_z / 4); a case-file round trip and the
// errors for disagreeing shapes.
#include "reference/doubleattn.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "harness/errors.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "tests/backward_support.hpp"
#include "tests/support.hpp"

using namespace attnbench;

namespace {

const Variant& da() { return find_variant("double_attention", "doubleattn_test"); }

Params shape(int64_t N, int64_t c_z, int64_t D) { return {{"N", N}, {"c_z", c_z}, {"D", D}}; }

std::vector<double> literal(const Params& p, const TensorMap& in) {
  const int64_t N = p["N"], cz = p["c_z"], D = p["D"], E = N * N;
  auto lin = [&](const char* name, int64_t e, int64_t o) {
    const std::string bias = std::string(name) + ".bias";
    double s = in.count(bias) ? in.at(bias).get(o) : 0.0;
    for (int64_t k = 0; k < cz; ++k)
      s += in.at(std::string(name) + ".weight").get(o * cz + k) * in.at("z").get(e * cz + k);
    return s;
  };
  // Gather: A[e][d] = exp(F[e][d]) / Σ_e' exp(F[e'][d]); V[d][d'] = Σ_e A[e][d] G[e][d'].
  std::vector<double> V(static_cast<size_t>(D * D), 0.0);
  for (int64_t d = 0; d < D; ++d) {
    double den = 0;
    for (int64_t e = 0; e < E; ++e) den += std::exp(lin("proj_f", e, d));
    for (int64_t e = 0; e < E; ++e) {
      const double a = std::exp(lin("proj_f", e, d)) / den;
      for (int64_t d2 = 0; d2 < D; ++d2) V[size_t(d * D + d2)] += a * lin("proj_g", e, d2);
    }
  }
  // Distribute: Q[e][d] = softmax_d K[e][d]; out[e] = W_o (Σ_d Q[e][d] V[d]) + b_o.
  std::vector<double> out(static_cast<size_t>(E * cz));
  for (int64_t e = 0; e < E; ++e) {
    std::vector<double> q(static_cast<size_t>(D));
    double den = 0;
    for (int64_t d = 0; d < D; ++d) den += q[size_t(d)] = std::exp(lin("proj_h", e, d));
    std::vector<double> y(static_cast<size_t>(D), 0.0);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t d2 = 0; d2 < D; ++d2) y[size_t(d2)] += q[size_t(d)] / den * V[size_t(d * D + d2)];
    for (int64_t o = 0; o < cz; ++o) {
      double s = in.at("proj_o.bias").get(o);
      for (int64_t d2 = 0; d2 < D; ++d2) s += in.at("proj_o.weight").get(o * D + d2) * y[size_t(d2)];
      out[size_t(e * cz + o)] = s;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("double_attention reference equals a literal transcription of its equations", "[doubleattn]") {
  const Params p = da().complete(shape(5, 7, 3), "doubleattn_test");
  const TensorMap in = da().make_inputs(p, 3, "literal");
  const std::vector<double> want = literal(p, in);
  const Tensor got = da().reference(p, in, DType::f64).at("output");
  REQUIRE(got.numel() == int64_t(want.size()));
  double err = 0, mag = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
    mag = std::max(mag, std::abs(want[size_t(i)]));
  }
  INFO("max abs difference " << err << " at magnitude " << mag);
  CHECK(mag > 0.1);
  CHECK(err <= 1e-12 * mag);
}

TEST_CASE("double_attention reference backward equals finite differences beyond the test shapes",
          "[doubleattn][gradient]") {
  test::check_reference_gradients_fd(da(), shape(4, 6, 2));
  test::check_reference_gradients_fd(da(), shape(3, 5, 7));
}

TEST_CASE("double_attention cpu forward and backward hold the rule on odd shapes and every dtype", "[doubleattn]") {
  const std::vector<Params> shapes = {shape(1, 8, 3), shape(7, 12, 5), shape(33, 16, 4), shape(20, 9, 13),
                                      shape(65, 40, 10)};
  for (const Params& s : shapes)
    for (DType d : {DType::f32, DType::bf16, DType::f16}) {
      RunOptions o;
      o.bench = false;
      o.check_seeds = 2;
      const auto rec = run_case(CaseSpec{&da(), "cpu", d, da().complete(s, "doubleattn_test"), Pass::fwd}, o);
      INFO(dtype_name(d) << " " << s.dump() << ": " << rec.dump());
      REQUIRE(rec["status"] == "ok");
      for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
      for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) test::require_pass_ok(da(), "cpu", d, s, pass);
    }
}

TEST_CASE("double_attention at the seed's dims (c_z 128, D 32) holds the rule, gradients included", "[doubleattn]") {
  test::require_pass_ok(da(), "cpu", DType::f32, shape(24, 128, 32), Pass::fwd_bwd, 1);
  test::require_pass_ok(da(), "cpu", DType::bf16, shape(24, 128, 32), Pass::fwd_bwd, 1);
}

TEST_CASE("double_attention case files: export and verify round trip, and disagreeing shapes name the tensors",
          "[doubleattn][cli]") {
  const auto dir = std::filesystem::temp_directory_path() / ("doubleattn_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string file = (dir / "da.safetensors").string();
  auto o = test::run_attnbench("export double_attention --shape N=9,c_z=10,D=3 --out " + file);
  INFO(o.text);
  REQUIRE(o.code == 0);
  o = test::run_attnbench("verify double_attention " + file + " --impl cpu");
  INFO(o.text);
  CHECK(o.code == 0);
  std::filesystem::remove_all(dir);
  const Params p = da().complete(shape(4, 6, 2), "doubleattn_test");
  const Params inferred = da().params_from_tensors(da().make_inputs(p, 1, "infer"));
  CHECK(inferred["N"] == 4);
  CHECK(inferred["c_z"] == 6);
  CHECK(inferred["D"] == 2);
  TensorMap bad = da().make_inputs(p, 1, "infer");
  bad.at("proj_o.weight") = Tensor(DType::f64, {6, 3});
  try {
    da().params_from_tensors(bad);
    FAIL("disagreeing weight shapes must be rejected");
  } catch (const InputError& e) {
    const std::string m = e.what();
    CHECK(m.find("proj_o.weight") != std::string::npos);
    CHECK(m.find("proj_f.weight") != std::string::npos);
  }
}
