// Attention with pair bias (Boltz AttentionPairBias): the reference against a literal
// transcription of Boltz's forward with its additive −10⁶ mask (so the reference and the kernel
// cannot share a misread layout); the mask semantics (a masked key changes nothing, a fully
// masked sequence equals the unmasked one); the reference backward against finite differences
// beyond the test shapes; the CPU forward and backward through the runner on odd shapes, tile
// edges, masks and every dtype, and at Boltz's dims; a case-file round trip and the errors.
#include "reference/pairbias.hpp"

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

const Variant& apb() { return find_variant("attention_pair_bias", "pairbias_test"); }

Params shape(int64_t N, int64_t c_s, int64_t c_z, int64_t H, double mask) {
  return {{"N", N}, {"c_s", c_s}, {"c_z", c_z}, {"H", H}, {"mask_fraction", mask}};
}

/// Boltz's AttentionPairBias.forward as written, in double, one token and head at a time,
/// with its additive mask −10⁶·(1 − m_j).
std::vector<double> literal_boltz(const Params& p, const TensorMap& in) {
  const int64_t N = p["N"], cs = p["c_s"], cz = p["c_z"], H = p["H"], dh = cs / H;
  auto at = [&](const char* name, int64_t i) { return in.at(name).get(i); };
  auto ln = [](std::vector<double> x, const std::vector<double>& g, const std::vector<double>& b) {
    double mean = 0, var = 0;
    for (double e : x) mean += e;
    mean /= double(x.size());
    for (double e : x) var += (e - mean) * (e - mean);
    var /= double(x.size());
    for (size_t k = 0; k < x.size(); ++k) x[k] = (x[k] - mean) / std::sqrt(var + 1e-5) * g[k] + b[k];
    return x;
  };
  auto vec = [&](const char* name, int64_t n, int64_t off) {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) v[size_t(k)] = at(name, off + k);
    return v;
  };
  auto linear = [&](const char* name, const std::vector<double>& x, int64_t outs) {
    std::vector<double> y(static_cast<size_t>(outs), 0.0);
    for (int64_t o = 0; o < outs; ++o)
      for (size_t i = 0; i < x.size(); ++i) y[size_t(o)] += at(name, o * int64_t(x.size()) + int64_t(i)) * x[i];
    return y;
  };
  const auto n = static_cast<size_t>(N);
  std::vector<std::vector<double>> q(n), k(n), v(n), g(n);
  for (int64_t i = 0; i < N; ++i) {
    const auto sh = ln(vec("s", cs, i * cs), vec("norm_s.weight", cs, 0), vec("norm_s.bias", cs, 0));
    q[size_t(i)] = linear("proj_q.weight", sh, cs);
    for (int64_t e = 0; e < cs; ++e) q[size_t(i)][size_t(e)] += at("proj_q.bias", e);
    k[size_t(i)] = linear("proj_k.weight", sh, cs);
    v[size_t(i)] = linear("proj_v.weight", sh, cs);
    g[size_t(i)] = linear("proj_g.weight", sh, cs);
  }
  std::vector<double> out(static_cast<size_t>(N * cs), 0.0);
  for (int64_t i = 0; i < N; ++i) {
    std::vector<double> y(static_cast<size_t>(cs), 0.0);
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> a(static_cast<size_t>(N));
      double mx = -1e300;
      for (int64_t j = 0; j < N; ++j) {
        const auto zh = ln(vec("z", cz, (i * N + j) * cz), vec("proj_z.0.weight", cz, 0), vec("proj_z.0.bias", cz, 0));
        double b = 0, dot = 0;
        for (int64_t e = 0; e < cz; ++e) b += at("proj_z.1.weight", h * cz + e) * zh[size_t(e)];
        for (int64_t e = 0; e < dh; ++e) dot += q[size_t(i)][size_t(h * dh + e)] * k[size_t(j)][size_t(h * dh + e)];
        a[size_t(j)] = dot / std::sqrt(double(dh)) + b + (1.0 - at("mask", j)) * -1e6;
        mx = std::max(mx, a[size_t(j)]);
      }
      double sum = 0;
      for (double& e : a) sum += e = std::exp(e - mx);
      for (int64_t e = 0; e < dh; ++e) {
        double o = 0;
        for (int64_t j = 0; j < N; ++j) o += a[size_t(j)] / sum * v[size_t(j)][size_t(h * dh + e)];
        y[size_t(h * dh + e)] = 1.0 / (1.0 + std::exp(-g[size_t(i)][size_t(h * dh + e)])) * o;
      }
    }
    const auto o = linear("proj_o.weight", y, cs);
    for (int64_t e = 0; e < cs; ++e) out[size_t(i * cs + e)] = o[size_t(e)];
  }
  return out;
}

double max_diff(const Tensor& got, const std::vector<double>& want, double& mag) {
  double err = 0;
  mag = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
    mag = std::max(mag, std::abs(want[size_t(i)]));
  }
  return err;
}

}  // namespace

TEST_CASE("attention_pair_bias reference equals a literal transcription of Boltz's AttentionPairBias", "[pairbias]") {
  for (double mask : {0.0, 0.4}) {
    const Params p = apb().complete(shape(6, 12, 5, 3, mask), "pairbias_test");
    const TensorMap in = apb().make_inputs(p, 3, "literal");
    const std::vector<double> want = literal_boltz(p, in);
    const Tensor got = apb().reference(p, in, DType::f64).at("output");
    REQUIRE(got.numel() == int64_t(want.size()));
    double mag = 0;
    const double err = max_diff(got, want, mag);
    INFO("mask " << mask << ": max abs difference " << err << " at magnitude " << mag);
    CHECK(mag > 0.1);
    CHECK(err <= 1e-12 * mag);
  }
}

TEST_CASE("attention_pair_bias masks keys: a masked key's values change nothing, and all masked = none masked",
          "[pairbias]") {
  const Params p = apb().complete(shape(9, 8, 4, 2, 0.0), "pairbias_test");
  TensorMap in = apb().make_inputs(p, 5, "mask");
  const Tensor unmasked = apb().reference(p, in, DType::f64).at("output");
  for (int64_t j = 0; j < 9; ++j) in.at("mask").set(j, 0.0);
  CHECK(test::max_abs_diff(apb().reference(p, in, DType::f64).at("output"), unmasked) < 1e-14);
  // Key 4 masked: the pair entries (i, 4) only bias key 4, so replacing them changes nothing.
  for (int64_t j = 0; j < 9; ++j) in.at("mask").set(j, j == 4 ? 0.0 : 1.0);
  const Tensor before = apb().reference(p, in, DType::f64).at("output");
  for (int64_t i = 0; i < 9; ++i)
    for (int64_t e = 0; e < 4; ++e) in.at("z").set((i * 9 + 4) * 4 + e, 7.0 * double(e + 1));
  const Tensor after = apb().reference(p, in, DType::f64).at("output");
  CHECK(test::max_abs_diff(after, before) < 1e-14);
  // ... and masking key 4 did change the output (the checks above are not vacuous).
  CHECK(test::max_abs_diff(after, unmasked) > 1e-3);
}

TEST_CASE("attention_pair_bias reference backward equals finite differences beyond the test shapes",
          "[pairbias][gradient]") {
  test::check_reference_gradients_fd(apb(), shape(5, 6, 3, 2, 0.2));
  test::check_reference_gradients_fd(apb(), shape(4, 4, 3, 4, 1.0));
}

TEST_CASE("attention_pair_bias cpu forward and backward hold the rule: odd shapes, tile edges, masks, every dtype",
          "[pairbias]") {
  const std::vector<Params> shapes = {shape(1, 8, 4, 2, 0.0),   shape(7, 12, 5, 3, 0.3),  shape(64, 10, 7, 5, 0.0),
                                      shape(65, 24, 9, 3, 0.5), shape(130, 6, 3, 1, 1.0), shape(33, 40, 16, 8, 0.1)};
  for (const Params& s : shapes)
    for (DType d : {DType::f32, DType::bf16, DType::f16}) {
      RunOptions o;
      o.bench = false;
      o.check_seeds = 2;
      const auto rec = run_case(CaseSpec{&apb(), "cpu", d, apb().complete(s, "pairbias_test"), Pass::fwd}, o);
      INFO(dtype_name(d) << " " << s.dump() << ": " << rec.dump());
      REQUIRE(rec["status"] == "ok");
      for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
      for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) test::require_pass_ok(apb(), "cpu", d, s, pass);
    }
}

TEST_CASE("attention_pair_bias at Boltz's dims (c_s 384, c_z 128, 16 heads of 24) holds the rule, gradients included",
          "[pairbias]") {
  test::require_pass_ok(apb(), "cpu", DType::f32, shape(37, 384, 128, 16, 0.1), Pass::fwd_bwd, 1);
  test::require_pass_ok(apb(), "cpu", DType::bf16, shape(21, 384, 128, 16, 0.0), Pass::fwd_bwd, 1);
}

TEST_CASE("attention_pair_bias case files: export and verify round trip, and disagreeing shapes name the tensors",
          "[pairbias][cli]") {
  const auto dir = std::filesystem::temp_directory_path() / ("pairbias_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string file = (dir / "apb.safetensors").string();
  auto o =
      test::run_attnbench("export attention_pair_bias --shape N=9,c_s=12,c_z=5,H=3,mask_fraction=0.3 --out " + file);
  INFO(o.text);
  REQUIRE(o.code == 0);
  o = test::run_attnbench("verify attention_pair_bias " + file + " --impl cpu");
  INFO(o.text);
  CHECK(o.code == 0);
  std::filesystem::remove_all(dir);
  const Params p = apb().complete(shape(4, 6, 3, 2, 0.0), "pairbias_test");
  const Params inferred = apb().params_from_tensors(apb().make_inputs(p, 1, "infer"));
  CHECK(inferred["N"] == 4);
  CHECK(inferred["c_s"] == 6);
  CHECK(inferred["c_z"] == 3);
  CHECK(inferred["H"] == 2);
  TensorMap bad = apb().make_inputs(p, 1, "infer");
  bad.at("proj_k.weight") = Tensor(DType::f64, {6, 5});
  try {
    apb().params_from_tensors(bad);
    FAIL("disagreeing weight shapes must be rejected");
  } catch (const InputError& e) {
    const std::string m = e.what();
    CHECK(m.find("proj_k.weight") != std::string::npos);
    CHECK(m.find("from 's'") != std::string::npos);
  }
  bad = apb().make_inputs(p, 1, "infer");
  bad.at("proj_z.1.weight") = Tensor(DType::f64, {4, 3});  // 4 heads do not divide c_s = 6
  CHECK_THROWS_AS(apb().params_from_tensors(bad), InputError);
  try {
    apb().complete(shape(4, 6, 3, 4, 0.0), "suite.json: groups[0]");
    FAIL("heads that do not divide c_s must be rejected");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("H: expected a divisor of c_s = 6") != std::string::npos);
  }
}
