// Selective attention: the fused exact form and the materialized CPU algorithm
// against the f64 reference (outputs and gradients, through the same runner as
// `attnbench run`: NaN-filled outputs, input hashes, 2 seeds, the correctness
// rule), the hand-written reference backward against central finite
// differences, fused vs materialized directly, and the RoPE-off identity (the
// A q_i block of W_k cancels in the softmax: zero gradient).
#include "reference/selective.hpp"

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>

#include "harness/errors.hpp"
#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "support.hpp"

using namespace attnbench;

namespace {

const Variant& selective() { return find_variant("selective", "selective_test"); }

Params complete(const Params& given) { return selective().complete(given, "selective_test"); }

void require_passes(const std::string& impl, DType dtype, Pass pass, const Params& given) {
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  const auto rec = run_case(CaseSpec{&selective(), impl, dtype, complete(given), pass}, o);
  INFO(impl << " " << dtype_name(dtype) << " " << pass_name(pass) << " " << given.dump() << ": " << rec.dump());
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

/// Odd T (1, 7, 33, 130), d_head 8 / 16 / 40, heads 1 / 2, RoPE on / off.
std::vector<Params> shapes() {
  return {
      {{"B", 1}, {"T", 1}, {"d", 16}, {"H", 2}, {"rope", true}},
      {{"B", 2}, {"T", 7}, {"d", 40}, {"H", 1}, {"rope", true}},
      {{"B", 1}, {"T", 33}, {"d", 32}, {"H", 2}, {"rope", true}},
      {{"B", 1}, {"T", 33}, {"d", 32}, {"H", 2}, {"rope", false}},
      {{"B", 1}, {"T", 33}, {"d", 80}, {"H", 2}, {"rope", true}},
      {{"B", 1}, {"T", 130}, {"d", 16}, {"H", 2}, {"rope", true}},
  };
}

/// Inputs and a cotangent for a direct call, in f64.
TensorMap inputs_with_cotangent(const Params& p, uint64_t seed) {
  TensorMap in = selective().make_inputs(p, seed, "selective_test");
  Tensor g(DType::f64, {p["B"].get<int64_t>(), p["T"].get<int64_t>(), p["d"].get<int64_t>()});
  std::mt19937_64 rng(seed + 17);
  std::normal_distribution<double> nd;
  for (int64_t i = 0; i < g.numel(); ++i) g.data<double>()[i] = nd(rng);
  in.emplace("do", std::move(g));
  return in;
}

/// Runs `impl` in f32 for fwd_bwd on f64 inputs cast to f32.
TensorMap run_fwd_bwd(const std::string& impl, const Params& p, const TensorMap& in64) {
  TensorMap in;
  for (const auto& [name, t] : in64) in.emplace(name, t.to(DType::f32));
  TensorMap out;
  for (const auto& o : selective().outputs(p, DType::f32)) out.emplace(o.name, Tensor(o.dtype, o.shape));
  for (const auto& x : selective().differentiable()) out.emplace("d" + x, Tensor(DType::f32, in.at(x).shape()));
  for (auto& [name, t] : out) t.fill_nan();
  Workspace ws;
  const ImplArgs args{p, DType::f32, in, out, ws, Pass::fwd_bwd};
  auto inst = selective().find_impl(impl)->make(args);
  inst->run();
  inst->finish();
  return out;
}

}  // namespace

TEST_CASE("selective: bad shapes are one-line input errors", "[selective]") {
  CHECK_THAT(input_error({{"d", 30}, {"H", 4}}), Catch::Contains("not a multiple of H"));
  CHECK_THAT(input_error({{"d", 6}, {"H", 2}, {"rope", true}}), Catch::Contains("even d_head"));
  CHECK(input_error({{"d", 6}, {"H", 2}, {"rope", false}}).empty());
  CHECK_THAT(input_error({{"T", 0}}), Catch::Contains("T: expected >= 1"));
}

TEST_CASE(
    "selective: fused and materialized CPU match the f64 reference, "
    "outputs and gradients",
    "[selective]") {
  for (const Params& given : shapes())
    for (const char* impl : {"cpu", "cpu_materialized"}) {
      require_passes(impl, DType::f32, Pass::fwd_bwd, given);  // checks o and the gradients
    }
}

TEST_CASE("selective: bf16 inputs, the bwd pass, and the reference in bf16", "[selective]") {
  const Params a = {{"B", 2}, {"T", 33}, {"d", 32}, {"H", 2}, {"rope", true}};
  const Params b = {{"B", 1}, {"T", 7}, {"d", 80}, {"H", 2}, {"rope", false}};
  for (const char* impl : {"cpu", "cpu_materialized"}) {
    require_passes(impl, DType::bf16, Pass::fwd_bwd, a);
    require_passes(impl, DType::bf16, Pass::fwd_bwd, b);
    require_passes(impl, DType::f32, Pass::bwd, a);
  }
  require_passes("reference", DType::bf16, Pass::fwd_bwd, a);
  require_passes("reference", DType::f32, Pass::fwd_bwd, b);
}

TEST_CASE(
    "selective: the reference backward matches central finite "
    "differences (f64)",
    "[selective]") {
  for (bool rope : {true, false}) {
    const Params p = complete({{"B", 2}, {"T", 5}, {"d", 8}, {"H", 2}, {"rope", rope}});
    TensorMap in = inputs_with_cotangent(p, 3);
    const TensorMap grads = selective().reference_backward(p, in, DType::f64);
    const Tensor& dout = in.at("do");
    auto loss = [&]() {
      const Tensor o = selective().reference(p, in, DType::f64).at("o");
      double s = 0;
      for (int64_t i = 0; i < o.numel(); ++i) s += o.get(i) * dout.get(i);
      return s;
    };
    for (const char* x : {"x", "wq", "wk", "wv"}) {
      Tensor& t = in.at(x);
      const Tensor& g = grads.at(std::string("d") + x);
      double worst = 0, scale = 0;
      for (int64_t i = 0; i < t.numel(); ++i) {
        const double h = 1e-5, x0 = t.data<double>()[i];
        t.data<double>()[i] = x0 + h;
        const double lp = loss();
        t.data<double>()[i] = x0 - h;
        const double lm = loss();
        t.data<double>()[i] = x0;
        worst = std::max(worst, std::abs((lp - lm) / (2 * h) - g.get(i)));
        scale = std::max(scale, std::abs(g.get(i)));
      }
      INFO(x << " rope=" << rope << " worst " << worst << " scale " << scale);
      CHECK(scale > 0);
      CHECK(worst <= 1e-7 * std::max(1.0, scale));
    }
  }
}

TEST_CASE(
    "selective: fused equals materialized on the same f32 inputs, and the "
    "no-RoPE A block has zero gradient",
    "[selective]") {
  for (bool rope : {true, false}) {
    const Params p = complete({{"B", 2}, {"T", 65}, {"d", 64}, {"H", 4}, {"rope", rope}});
    const TensorMap in = inputs_with_cotangent(p, 11);
    const TensorMap f = run_fwd_bwd("cpu", p, in);
    const TensorMap m = run_fwd_bwd("cpu_materialized", p, in);
    for (const char* name : {"o", "dx", "dwq", "dwk", "dwv"}) {
      INFO(name << " rope=" << rope);
      REQUIRE(test::all_finite(f.at(name)));
      REQUIRE(test::all_finite(m.at(name)));
      CHECK(test::max_abs_diff(f.at(name), m.at(name)) <= 1e-4 * std::max(1.0, test::max_abs(m.at(name))));
    }
    // The A q_i part of the key (W_k's first d columns) is constant in j
    // without RoPE, so it cancels in the softmax; with RoPE it must matter.
    const Tensor& dwk = f.at("dwk");
    const int64_t d = p["d"].get<int64_t>();
    double a_block = 0;
    for (int64_t o = 0; o < d; ++o)
      for (int64_t c = 0; c < d; ++c) a_block = std::max(a_block, std::abs(dwk.get(o * 2 * d + c)));
    INFO("max |dW_k[:, :d]| = " << a_block << " rope=" << rope);
    if (rope)
      CHECK(a_block > 1e-3);
    else
      CHECK(a_block == 0.0);
  }
}
