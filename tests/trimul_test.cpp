// Triangle multiplicative update (trimul: AF2/OpenFold names and biases; trimul_af3: AF3/Boltz,
// no biases): the CPU forward and backward against the f64 reference through the runner (the
// correctness rule, NaN-filled outputs, input hashes, 2 seeds) on odd shapes (N 1, 7, 33;
// c_hidden 5, 7, 13), both directions, masks (a fully masked z included), f32 and bf16; the
// reference against a literal loop transcription of AF2 Alg. 11/12 (so the reference and the
// kernel cannot share a misread index); the reference backward against finite differences on
// shapes beyond the test shapes; a case-file round trip; the direction a case file cannot tell.
#include "reference/trimul.hpp"

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

const Variant& af2() { return find_variant("trimul", "trimul_test"); }
const Variant& af3() { return find_variant("trimul_af3", "trimul_test"); }

Params shape(int64_t N, int64_t c_z, int64_t c_h, const char* dir, double mask) {
  return {{"N", N}, {"c_z", c_z}, {"c_hidden", c_h}, {"direction", dir}, {"mask_fraction", mask}};
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

/// AF2 Alg. 11/12 as written, one pair and one channel at a time (OpenFold names).
std::vector<double> literal_af2(const Params& p, const TensorMap& in) {
  const int64_t N = p["N"], cz = p["c_z"], ch = p["c_hidden"];
  const bool outgoing = p["direction"] == "outgoing";
  auto w = [&](const std::string& name, int64_t o, int64_t i) { return in.at(name).get(o * in.at(name).shape()[1] + i); };
  auto v = [&](const std::string& name, int64_t i) { return in.at(name).get(i); };
  auto ln = [](std::vector<double> x, const std::vector<double>& g, const std::vector<double>& b) {
    double mean = 0, var = 0;
    for (double e : x) mean += e;
    mean /= double(x.size());
    for (double e : x) var += (e - mean) * (e - mean);
    var /= double(x.size());
    for (size_t k = 0; k < x.size(); ++k) x[k] = (x[k] - mean) / std::sqrt(var + 1e-5) * g[k] + b[k];
    return x;
  };
  std::vector<double> g_in(static_cast<size_t>(cz)), b_in(static_cast<size_t>(cz)), g_out(static_cast<size_t>(ch)),
      b_out(static_cast<size_t>(ch));
  for (int64_t k = 0; k < cz; ++k) g_in[size_t(k)] = v("layer_norm_in.weight", k), b_in[size_t(k)] = v("layer_norm_in.bias", k);
  for (int64_t k = 0; k < ch; ++k)
    g_out[size_t(k)] = v("layer_norm_out.weight", k), b_out[size_t(k)] = v("layer_norm_out.bias", k);
  std::vector<std::vector<double>> x(static_cast<size_t>(N * N)), a(static_cast<size_t>(N * N)),
      b(static_cast<size_t>(N * N));
  auto linear = [&](const std::string& name, const std::vector<double>& in_v, int64_t outs) {
    std::vector<double> y(static_cast<size_t>(outs));
    for (int64_t o = 0; o < outs; ++o) {
      double s = v(name + ".bias", o);
      for (size_t i = 0; i < in_v.size(); ++i) s += w(name + ".weight", o, int64_t(i)) * in_v[i];
      y[size_t(o)] = s;
    }
    return y;
  };
  for (int64_t r = 0; r < N * N; ++r) {
    std::vector<double> z(static_cast<size_t>(cz));
    for (int64_t k = 0; k < cz; ++k) z[size_t(k)] = in.at("z").get(r * cz + k);
    x[size_t(r)] = ln(z, g_in, b_in);
    const double m = in.at("mask").get(r);
    const auto ap = linear("linear_a_p", x[size_t(r)], ch), ag = linear("linear_a_g", x[size_t(r)], ch);
    const auto bp = linear("linear_b_p", x[size_t(r)], ch), bg = linear("linear_b_g", x[size_t(r)], ch);
    a[size_t(r)].resize(size_t(ch));
    b[size_t(r)].resize(size_t(ch));
    for (int64_t c = 0; c < ch; ++c) {
      a[size_t(r)][size_t(c)] = m * sigmoid(ag[size_t(c)]) * ap[size_t(c)];
      b[size_t(r)][size_t(c)] = m * sigmoid(bg[size_t(c)]) * bp[size_t(c)];
    }
  }
  std::vector<double> out(static_cast<size_t>(N * N * cz));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      std::vector<double> t(static_cast<size_t>(ch), 0.0);
      for (int64_t c = 0; c < ch; ++c)
        for (int64_t k = 0; k < N; ++k)
          t[size_t(c)] += outgoing ? a[size_t(i * N + k)][size_t(c)] * b[size_t(j * N + k)][size_t(c)]
                                   : a[size_t(k * N + i)][size_t(c)] * b[size_t(k * N + j)][size_t(c)];
      const auto y = linear("linear_z", ln(t, g_out, b_out), cz);
      const auto g = linear("linear_g", x[size_t(i * N + j)], cz);
      for (int64_t o = 0; o < cz; ++o) out[size_t((i * N + j) * cz + o)] = sigmoid(g[size_t(o)]) * y[size_t(o)];
    }
  return out;
}

}  // namespace

TEST_CASE("trimul reference equals a literal transcription of AF2 Alg. 11/12", "[trimul]") {
  for (const char* dir : {"outgoing", "incoming"}) {
    const Params p = af2().complete(shape(6, 7, 5, dir, 0.3), "trimul_test");
    const TensorMap in = af2().make_inputs(p, 3, "literal");
    const std::vector<double> want = literal_af2(p, in);
    const Tensor got = af2().reference(p, in, DType::f64).at("output");
    REQUIRE(got.numel() == int64_t(want.size()));
    double err = 0, mag = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      err = std::max(err, std::abs(got.get(i) - want[size_t(i)]));
      mag = std::max(mag, std::abs(want[size_t(i)]));
    }
    INFO(dir << ": max abs difference " << err << " at magnitude " << mag);
    CHECK(mag > 0.1);
    CHECK(err <= 1e-12 * mag);
  }
}

TEST_CASE("trimul_af3 is trimul with zero biases and the a/b projections stacked", "[trimul]") {
  const Params p2 = af2().complete(shape(5, 6, 4, "incoming", 0.2), "trimul_test");
  TensorMap in2 = af2().make_inputs(p2, 5, "af3");
  TensorMap in3;
  auto stack = [&](const char* top, const char* bottom) {
    const Tensor& a = in2.at(top);
    const Tensor& b = in2.at(bottom);
    Tensor t(DType::f64, {a.shape()[0] * 2, a.shape()[1]});
    for (int64_t i = 0; i < a.numel(); ++i) t.set(i, a.get(i)), t.set(a.numel() + i, b.get(i));
    return t;
  };
  in3.emplace("p_in.weight", stack("linear_a_p.weight", "linear_b_p.weight"));
  in3.emplace("g_in.weight", stack("linear_a_g.weight", "linear_b_g.weight"));
  in3.emplace("g_out.weight", in2.at("linear_g.weight"));
  in3.emplace("p_out.weight", in2.at("linear_z.weight"));
  in3.emplace("norm_in.weight", in2.at("layer_norm_in.weight"));
  in3.emplace("norm_in.bias", in2.at("layer_norm_in.bias"));
  in3.emplace("norm_out.weight", in2.at("layer_norm_out.weight"));
  in3.emplace("norm_out.bias", in2.at("layer_norm_out.bias"));
  in3.emplace("z", in2.at("z"));
  in3.emplace("mask", in2.at("mask"));
  for (auto& [name, t] : in2)
    if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0 && name.find("norm") == std::string::npos)
      for (int64_t i = 0; i < t.numel(); ++i) t.set(i, 0.0);
  const Params p3 = af3().complete(shape(5, 6, 4, "incoming", 0.2), "trimul_test");
  CHECK(test::max_abs_diff(af2().reference(p2, in2, DType::f64).at("output"),
                           af3().reference(p3, in3, DType::f64).at("output")) < 1e-13);
}

TEST_CASE("trimul reference backward equals finite differences beyond the test shapes", "[trimul][gradient]") {
  for (const Variant* v : {&af2(), &af3()}) {
    test::check_reference_gradients_fd(*v, shape(4, 6, 3, "outgoing", 0.25));
    test::check_reference_gradients_fd(*v, shape(5, 5, 9, "incoming", 0.0));
  }
}

TEST_CASE("trimul cpu forward and backward hold the rule on odd shapes, both directions, masks, bf16", "[trimul]") {
  const std::vector<Params> shapes = {
      shape(1, 8, 5, "outgoing", 0.0),   shape(1, 8, 5, "incoming", 0.0),  shape(7, 12, 5, "outgoing", 0.25),
      shape(7, 12, 5, "incoming", 0.25), shape(33, 12, 7, "outgoing", 0.3), shape(33, 9, 13, "incoming", 0.3),
      shape(7, 10, 6, "outgoing", 1.0),  // every pair masked: a = b = 0, t = 0, finite output
  };
  for (const Variant* v : {&af2(), &af3()})
    for (const Params& s : shapes)
      for (DType d : {DType::f32, DType::bf16}) {
        RunOptions o;
        o.bench = false;
        o.check_seeds = 2;
        const auto rec = run_case(CaseSpec{v, "cpu", d, v->complete(s, "trimul_test"), Pass::fwd}, o);
        INFO(v->name() << " " << dtype_name(d) << " " << s.dump() << ": " << rec.dump());
        REQUIRE(rec["status"] == "ok");
        for (const auto& [name, r] : rec["checks"].items()) CHECK(r["passed"].get<bool>());
        for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) test::require_pass_ok(*v, "cpu", d, s, pass);
      }
}

TEST_CASE("trimul at AF2 dims (c_z 128, c_hidden 128) holds the rule, gradients included", "[trimul]") {
  test::require_pass_ok(af2(), "cpu", DType::f32, shape(19, 128, 128, "outgoing", 0.1), Pass::fwd_bwd, 1);
  test::require_pass_ok(af3(), "cpu", DType::bf16, shape(19, 128, 128, "incoming", 0.1), Pass::fwd_bwd, 1);
}

TEST_CASE("trimul case files: export and verify round trip, and the direction is asked for", "[trimul][cli]") {
  const auto dir = std::filesystem::temp_directory_path() / ("trimul_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (const char* variant : {"trimul", "trimul_af3"}) {
    const std::string file = (dir / (std::string(variant) + ".safetensors")).string();
    auto o = test::run_attnbench(std::string("export ") + variant +
                                 " --shape N=9,c_z=10,c_hidden=6,direction=incoming,mask_fraction=0.2 --out " + file);
    INFO(o.text);
    REQUIRE(o.code == 0);
    o = test::run_attnbench(std::string("verify ") + variant + " " + file + " --impl cpu");
    INFO(o.text);
    CHECK(o.code == 0);
    // The other form's names are not in the file: a one-line error naming a missing tensor.
    o = test::run_attnbench(std::string("verify ") + (variant == std::string("trimul") ? "trimul_af3 " : "trimul ") +
                            file);
    CHECK(o.code == 2);
    CHECK(o.text.find("tensor '") != std::string::npos);
  }
  std::filesystem::remove_all(dir);

  // Without shape metadata the tensors give N, c_z, c_hidden but not the direction.
  const Params p = af2().complete(shape(4, 6, 3, "outgoing", 0.0), "trimul_test");
  const Params inferred = af2().params_from_tensors(af2().make_inputs(p, 1, "infer"));
  CHECK(inferred["N"] == 4);
  CHECK(inferred["c_hidden"] == 3);
  try {
    af2().complete(inferred, "file.safetensors: params");
    FAIL("an unknown direction must be asked for");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("direction") != std::string::npos);
    CHECK(std::string(e.what()).find("--shape direction=") != std::string::npos);
  }
  // Weight shapes that disagree: an error naming the tensor.
  TensorMap bad = af2().make_inputs(p, 1, "infer");
  bad.at("linear_b_g.weight") = Tensor(DType::f64, {4, 6});
  try {
    af2().params_from_tensors(bad);
    FAIL("disagreeing weight shapes must be rejected");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("linear_b_g.weight") != std::string::npos);
  }
}

TEST_CASE("trimul bad shape parameters are one-line input errors", "[trimul]") {
  for (const auto& [given, field] : std::vector<std::pair<Params, std::string>>{
           {{{"direction", "sideways"}}, "direction"},
           {{{"c_hidden", 0}}, "c_hidden"},
           {{{"mask_fraction", 1.5}}, "mask_fraction"},
           {{{"N", 0}}, "N"}}) {
    try {
      af2().complete(given, "suite");
      FAIL("accepted " << given.dump());
    } catch (const InputError& e) {
      CHECK(std::string(e.what()).find(field) != std::string::npos);
    }
  }
}
