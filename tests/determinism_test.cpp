// Determinism (issue 10), registry-driven: every CPU implementation of every
// variant, forward and (where it has one) forward + backward, on the variant's
// small test shapes. The same inputs and thread count give bit-identical
// outputs; 1 and 2 threads agree within the correctness rule (the bound the
// runner would hold either run to against the f64 reference).
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <set>

#include "harness/check.hpp"
#include "harness/variant.hpp"
#include "tests/backward_support.hpp"

using namespace attnbench;
using namespace attnbench::test;

namespace {

TensorMap widened(const TensorMap& in) {
  TensorMap out;
  for (const auto& [name, t] : in) out.emplace(name, is_floating(t.dtype()) ? t.to(DType::f64) : t);
  return out;
}

/// Test shapes with at most 100k input elements (the larger ones add time, not coverage).
bool small(const Variant& v, const Params& p) {
  int64_t n = 0;
  for (const auto& [name, t] : v.make_inputs(p, 0, "size")) n += t.numel();
  return n <= 100000;
}

TensorMap run_with_threads(int threads, const Variant& v, const std::string& impl, const Params& p, DType dtype,
                           const TensorMap& in, Pass pass) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  TensorMap out = run_pass(v, impl, p, dtype, in, pass);
  omp_set_num_threads(before);
  return out;
}

}  // namespace

TEST_CASE("CPU implementations are deterministic: bit-identical per thread count, within the rule across", "[determinism]") {
  int compared = 0;
  for (const Variant* v : variants()) {
    for (const Impl& impl : v->impls()) {
      // The reference is the oracle's own code (Eigen, no threads of its own): the kernels are what vary.
      if (impl.device != Device::cpu || impl.name == "reference") continue;
      const DType dtype = std::find(impl.dtypes.begin(), impl.dtypes.end(), DType::f32) != impl.dtypes.end()
                              ? DType::f32
                              : impl.dtypes.front();
      const DType precision = impl.precision.value_or(dtype);
      for (const Pass pass : {Pass::fwd, Pass::fwd_bwd}) {
        if (std::find(impl.passes.begin(), impl.passes.end(), pass) == impl.passes.end()) continue;
        for (const Params& given : v->test_shapes()) {
          const Params p = v->complete(given, "determinism");
          if (!small(*v, p)) continue;
          INFO(v->name() << " " << impl.name << " " << dtype_name(dtype) << " " << pass_name(pass) << " " << p.dump());
          const TensorMap in = v->cast_inputs(p, inputs_with_cotangents(*v, p, 5), dtype);
          const TensorMap a = run_with_threads(2, *v, impl.name, p, dtype, in, pass);
          const TensorMap b = run_with_threads(2, *v, impl.name, p, dtype, in, pass);
          const TensorMap one = run_with_threads(1, *v, impl.name, p, dtype, in, pass);
          // The rule's bound for each tensor, from the f64 reference and the reference in the impl's precision.
          const TensorMap wide = widened(in);
          TensorMap oracle = v->reference(p, wide, DType::f64), naive = v->reference(p, wide, precision);
          if (runs_backward(pass)) {
            oracle.merge(v->reference_backward(p, wide, DType::f64));
            naive.merge(v->reference_backward(p, wide, precision));
          }
          std::set<std::string> grads;
          if (runs_backward(pass))
            for (const std::string& x : v->differentiable()) grads.insert(grad_name(x));
          double grad_mag = 0;  // the runner's floor for gradients: the case's largest gradient
          for (const std::string& g : grads) grad_mag = std::max(grad_mag, max_abs(oracle.at(g)));
          for (const auto& [name, t] : a) {
            INFO(name);
            REQUIRE(b.count(name));
            CHECK(t.hash() == b.at(name).hash());  // bit-identical at the same thread count
            if (!oracle.count(name)) continue;
            const bool gradient = grads.count(name) > 0;
            const CheckResult rule =
                check_equivalence(t, oracle.at(name), naive.at(name), dtype, kDefaultFloorUlps, gradient ? grad_mag : 0);
            CHECK(rule.passed);
            const CheckResult across = check_within(one.at(name), t, rule.bound);
            INFO("1 vs 2 threads: max_abs " << across.max_abs << ", bound " << rule.bound);
            CHECK(across.passed);
            ++compared;
          }
        }
      }
    }
  }
  CHECK(compared > 50);
}
