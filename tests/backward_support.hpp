// Helpers for the backward tests of sdpa and masked: cotangents drawn like
// inputs, a pass run directly with its outputs NaN-filled between setup and
// run (stricter than the runner, which fills them before setup), the runner's
// correctness rule on a pass, and the f64 reference backward against central
// finite differences of the f64 forward on shapes beyond the variants' test
// shapes (tests/gradient_test.cpp covers those).
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "harness/check.hpp"
#include "harness/runner.hpp"
#include "harness/pass.hpp"
#include "harness/rng.hpp"
#include "harness/variant.hpp"
#include "tests/support.hpp"

namespace attnbench::test {

/// The f64 inputs of case p with a standard-normal cotangent "d"+y of every output y in cotangents(p).
inline TensorMap inputs_with_cotangents(const Variant& v, const Params& p, uint64_t seed) {
  const std::string key = "backward-test/" + p.dump();
  TensorMap in = v.make_inputs(p, seed, key);
  for (const std::string& y : v.cotangents(p))
    for (const OutputSpec& spec : v.outputs(p, DType::f64))
      if (spec.name == y) {
        Tensor t(DType::f64, spec.shape);
        Rng rng(seed, key, grad_name(y));
        for (int64_t i = 0; i < t.numel(); ++i) t.set(i, rng.normal());
        in.emplace(grad_name(y), std::move(t));
      }
  return in;
}

/// What a `pass` call writes: the forward outputs and, for a backward, "d"+x of
/// every differentiable x (shaped like x; f32, f64 for the oracle), NaN-filled.
inline TensorMap pass_outputs(const Variant& v, const Params& p, DType dtype, const TensorMap& inputs, Pass pass) {
  TensorMap out;
  for (const auto& o : v.outputs(p, dtype)) out.emplace(o.name, Tensor(o.dtype, o.shape));
  if (runs_backward(pass))
    for (const std::string& x : v.differentiable())
      out.emplace(grad_name(x), Tensor(dtype == DType::f64 ? DType::f64 : DType::f32, inputs.at(x).shape()));
  for (auto& [name, t] : out) t.fill_nan();
  return out;
}

/// Runs implementation `impl` for `pass` on already cast inputs, as the harness
/// would (ImplArgs outlive the instance), and requires the inputs unchanged.
inline TensorMap run_pass(const Variant& v, const std::string& impl, const Params& p, DType dtype,
                          const TensorMap& inputs, Pass pass) {
  std::map<std::string, uint64_t> hashes;
  for (const auto& [name, t] : inputs) hashes[name] = t.hash();
  TensorMap out = pass_outputs(v, p, dtype, inputs, pass);
  Workspace ws;
  const ImplArgs args{p, dtype, inputs, out, ws, pass};
  auto inst = v.find_impl(impl)->make(args);
  for (auto& [name, t] : out) t.fill_nan();  // whatever setup wrote, run() must produce it
  inst->run();
  inst->finish();
  for (const auto& [name, t] : inputs) REQUIRE(t.hash() == hashes[name]);
  return out;
}

/// Checks `pass` of `impl` in `dtype` through the runner (the correctness rule
/// on every gradient and, with fwd_bwd, every output, against the f64 reference
/// in the implementation's precision; `seeds` input seeds), and once more with
/// the outputs NaN-filled between setup and run (run_pass): every tensor finite.
inline void require_pass_ok(const Variant& v, const std::string& impl, DType dtype, const Params& given, Pass pass,
                            int seeds = 2, double floor_ulps = kDefaultFloorUlps) {
  const Params p = v.complete(given, "backward test");
  RunOptions o;
  o.bench = false;
  o.check_seeds = seeds;
  o.floor_ulps = floor_ulps;
  const auto rec = run_case(CaseSpec{&v, impl, dtype, p, pass}, o);
  INFO(v.name() << " " << impl << " " << dtype_name(dtype) << " " << pass_name(pass) << " " << p.dump() << ": "
                << rec.dump());
  REQUIRE(rec["status"] == "ok");
  int grads = 0;
  for (const auto& [name, r] : rec["checks"].items()) {
    grads += name.rfind("gradient/", 0) == 0;
    CHECK(r["passed"].get<bool>());
  }
  CHECK(grads == int(v.differentiable().size()));
  const TensorMap in = v.cast_inputs(p, inputs_with_cotangents(v, p, 9), dtype);
  for (const auto& [name, t] : run_pass(v, impl, p, dtype, in, pass))
    if (runs_forward(pass) || name[0] == 'd') CHECK(all_finite(t));
}

/// Σ_y ⟨dy, y(x)⟩ of the f64 reference forward, the objective of every
/// finite-difference check (here and tests/gradient_test.cpp), with Σ_y Σ|dy ∘ y|,
/// the magnitude its rounding error scales with.
struct Objective {
  double value = 0, magnitude = 0;
};
inline Objective cotangent_objective(const Variant& v, const Params& p, const TensorMap& in) {
  const TensorMap out = v.reference(p, in, DType::f64);
  Objective f;
  for (const std::string& y : v.cotangents(p)) {
    const Tensor& a = out.at(y);
    const Tensor& g = in.at(grad_name(y));
    for (int64_t i = 0; i < a.numel(); ++i) f.value += a.get(i) * g.get(i), f.magnitude += std::abs(a.get(i) * g.get(i));
  }
  return f;
}

/// Checks the directional derivative ⟨dx, u⟩ of the f64 reference backward `g`
/// against the central difference (f(x + εu) − f(x − εu)) / 2ε of the f64 forward,
/// exact to O(ε²) for a smooth f. Tolerance: 1e-6 of Σ|dx ∘ u| (truncation and the
/// backward's own rounding) plus the difference quotient's rounding noise, 16 ulps of
/// the objective's magnitude over 2ε — without it a gradient that is 0 identically
/// (Boltz's proj_z.0.bias in attention_pair_bias) fails on the few ulps by which the
/// two forwards differ (it did in the sanitizer build).
inline void check_directional_derivative(const Variant& v, const Params& p, const TensorMap& in, const Tensor& g,
                                         const std::string& x, const Tensor& u, double eps) {
  double analytic = 0, scale = 0;
  for (int64_t i = 0; i < u.numel(); ++i) analytic += g.get(i) * u.get(i), scale += std::abs(g.get(i) * u.get(i));
  auto shifted = [&](double t) {
    TensorMap m = in;
    Tensor& xt = m.at(x);
    for (int64_t i = 0; i < xt.numel(); ++i) xt.set(i, xt.get(i) + t * u.get(i));
    return cotangent_objective(v, p, m);
  };
  const Objective plus = shifted(eps), minus = shifted(-eps);
  const double numeric = (plus.value - minus.value) / (2 * eps);
  const double noise = 16 * std::numeric_limits<double>::epsilon() * std::max(plus.magnitude, minus.magnitude) / (2 * eps);
  INFO(v.name() << " " << p.dump() << " d" << x << ": analytic " << analytic << " numeric " << numeric << " scale "
                << scale << " noise " << noise);
  REQUIRE(std::isfinite(analytic));
  CHECK(std::abs(analytic - numeric) <= 1e-6 * scale + noise);
}

/// The f64 reference backward against central differences of the f64 forward:
/// for each differentiable input x, one random direction u on it.
inline void check_reference_gradients_fd(const Variant& v, const Params& given, uint64_t seed = 7, double eps = 1e-5) {
  const Params p = v.complete(given, "finite differences");
  const TensorMap in = inputs_with_cotangents(v, p, seed);
  const TensorMap grads = v.reference_backward(p, in, DType::f64);
  for (const std::string& x : v.differentiable()) {
    const Tensor& g = grads.at(grad_name(x));
    REQUIRE(g.shape() == in.at(x).shape());
    Tensor u(DType::f64, g.shape());
    Rng rng(seed, "fd-direction/" + p.dump(), x);
    for (int64_t i = 0; i < u.numel(); ++i) u.set(i, rng.normal());
    check_directional_derivative(v, p, in, g, x, u, eps);
  }
}

}  // namespace attnbench::test
