// The Pairformer's transition (AF3 Alg. 11, Boltz `Transition`): the reference against a literal
// per-row transcription of Boltz's module (so the reference and the kernel cannot share a
// misread weight layout); the reference backward against finite differences beyond the test
// shapes; the CPU forward and backward through the runner on odd shapes, both tracks, f32, bf16
// and f16, and at Boltz's dims; a case-file round trip and the errors for disagreeing shapes.
#include "reference/transition.hpp"

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

const Variant& transition() { return find_variant("transition", "transition_test"); }

Params shape(int64_t N, int64_t c, int64_t hidden, const char* track) {
  return {{"N", N}, {"c", c}, {"hidden", hidden}, {"track", track}};
}

/// Boltz's Transition.forward as written, one row at a time: x = norm(x);
/// fc3(silu(fc1(x)) * fc2(x)).
std::vector<double> literal_boltz(const Params& p, const TensorMap& in) {
  const int64_t c = p["c"], h = p["hidden"];
  const int64_t rows = in.at("x").numel() / c;
  auto w = [&](const char* name, int64_t o, int64_t i) { return in.at(name).get(o * in.at(name).shape()[1] + i); };
  std::vector<double> out(static_cast<size_t>(rows * c));
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> x(static_cast<size_t>(c));
    double mean = 0, var = 0;
    for (int64_t k = 0; k < c; ++k) mean += x[size_t(k)] = in.at("x").get(r * c + k);
    mean /= double(c);
    for (double e : x) var += (e - mean) * (e - mean);
    var /= double(c);
    for (int64_t k = 0; k < c; ++k)
      x[size_t(k)] =
          (x[size_t(k)] - mean) / std::sqrt(var + 1e-5) * in.at("norm.weight").get(k) + in.at("norm.bias").get(k);
    std::vector<double> hid(static_cast<size_t>(h));
    for (int64_t j = 0; j < h; ++j) {
      double a = 0, b = 0;
      for (int64_t k = 0; k < c; ++k)
        a += w("fc1.weight", j, k) * x[size_t(k)], b += w("fc2.weight", j, k) * x[size_t(k)];
      hid[size_t(j)] = a / (1.0 + std::exp(-a)) * b;
    }
    for (int64_t o = 0; o < c; ++o) {
      double s = 0;
      for (int64_t j = 0; j < h; ++j) s += w("fc3.weight", o, j) * hid[size_t(j)];
      out[size_t(r * c + o)] = s;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("transition reference equals a literal transcription of Boltz's Transition", "[transition]") {
  for (const char* track : {"pair", "single"}) {
    const Params p = transition().complete(shape(6, 7, 11, track), "transition_test");
    const TensorMap in = transition().make_inputs(p, 3, "literal");
    const std::vector<double> want = literal_boltz(p, in);
    const Tensor got = transition().reference(p, in, DType::f64).at("output");
    REQUIRE(got.numel() == int64_t(want.size()));
    double err = 0, mag = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
      mag = std::max(mag, std::abs(want[size_t(i)]));
    }
    INFO(track << ": max abs difference " << err << " at magnitude " << mag);
    CHECK(mag > 0.1);
    CHECK(err <= 1e-12 * mag);
  }
}

TEST_CASE("transition reference backward equals finite differences beyond the test shapes", "[transition][gradient]") {
  test::check_reference_gradients_fd(transition(), shape(3, 6, 10, "pair"));
  test::check_reference_gradients_fd(transition(), shape(11, 5, 3, "single"));
}

TEST_CASE("transition cpu forward and backward hold the rule on odd shapes, both tracks, bf16, f16", "[transition]") {
  const std::vector<Params> shapes = {shape(1, 8, 5, "pair"), shape(7, 12, 48, "pair"), shape(33, 9, 13, "single"),
                                      shape(1, 3, 1, "single"), shape(13, 40, 59, "pair")};
  for (const Params& s : shapes)
    for (DType d : {DType::f32, DType::bf16, DType::f16}) {
      RunOptions o;
      o.bench = false;
      o.check_seeds = 2;
      const auto rec =
          run_case(CaseSpec{&transition(), "cpu", d, transition().complete(s, "transition_test"), Pass::fwd}, o);
      INFO(dtype_name(d) << " " << s.dump() << ": " << rec.dump());
      REQUIRE(rec["status"] == "ok");
      for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
      for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) test::require_pass_ok(transition(), "cpu", d, s, pass);
    }
}

TEST_CASE("transition at Boltz's dims (pair c 128, single c 384, hidden 4c) holds the rule, gradients included",
          "[transition]") {
  test::require_pass_ok(transition(), "cpu", DType::f32, shape(17, 128, 512, "pair"), Pass::fwd_bwd, 1);
  test::require_pass_ok(transition(), "cpu", DType::bf16, shape(37, 384, 1536, "single"), Pass::fwd_bwd, 1);
}

TEST_CASE("transition case files: export and verify round trip, and disagreeing shapes name the tensors",
          "[transition][cli]") {
  const auto dir = std::filesystem::temp_directory_path() / ("transition_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (const char* track : {"pair", "single"}) {
    const std::string file = (dir / (std::string(track) + ".safetensors")).string();
    auto o = test::run_attnbench(std::string("export transition --shape N=9,c=10,hidden=21,track=") + track +
                                 " --out " + file);
    INFO(o.text);
    REQUIRE(o.code == 0);
    o = test::run_attnbench("verify transition " + file + " --impl cpu");
    INFO(o.text);
    CHECK(o.code == 0);
  }
  std::filesystem::remove_all(dir);
  // Without shape metadata the tensors give every parameter, the track from x's rank.
  const Params p = transition().complete(shape(4, 6, 10, "single"), "transition_test");
  const Params inferred = transition().params_from_tensors(transition().make_inputs(p, 1, "infer"));
  CHECK(inferred["N"] == 4);
  CHECK(inferred["c"] == 6);
  CHECK(inferred["hidden"] == 10);
  CHECK(inferred["track"] == "single");
  TensorMap bad = transition().make_inputs(p, 1, "infer");
  bad.at("fc3.weight") = Tensor(DType::f64, {6, 9});
  try {
    transition().params_from_tensors(bad);
    FAIL("disagreeing weight shapes must be rejected");
  } catch (const InputError& e) {
    const std::string m = e.what();
    CHECK(m.find("fc3.weight") != std::string::npos);
    CHECK(m.find("fc1.weight") != std::string::npos);
  }
  bad = transition().make_inputs(p, 1, "infer");
  bad.at("x") = Tensor(DType::f64, {4, 5, 6});
  CHECK_THROWS_AS(transition().params_from_tensors(bad), InputError);
}
