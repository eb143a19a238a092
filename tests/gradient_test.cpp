// The registry-driven gradient test: every variant with a backward has its f64
// reference backward checked against central finite differences of its f64
// forward, and every implementation's bwd and fwd_bwd passes checked against
// that reference through the runner (the correctness rule, NaN-filled
// gradients, input hashes) — a new variant's backward is covered without new
// test code. DESIGN §3 "Gradients".
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "harness/runner.hpp"
#include "harness/variant.hpp"
#include "tests/backward_support.hpp"

using namespace attnbench;

namespace {

/// Test shapes small enough for finite differences (two forwards per direction).
bool small_enough(const Variant& v, const Params& p) {
  int64_t n = 0;
  for (const auto& [name, t] : v.make_inputs(p, 0, "size")) n += t.numel();
  return n <= 40000;
}


}  // namespace

TEST_CASE("every reference backward equals finite differences of its forward", "[gradient]") {
  int checked = 0;
  for (const Variant* v : variants()) {
    if (!v->has_backward()) continue;
    for (const Params& given : v->test_shapes()) {
      const Params p = v->complete(given, v->name() + " test shape");
      if (!small_enough(*v, p)) continue;
      // L(x) = Σ_y ⟨cotangent_y, y(x)⟩ (test::cotangent_objective) over the outputs with a cotangent.
      const TensorMap in = test::inputs_with_cotangents(*v, p, 7);
      const TensorMap grads = v->reference_backward(p, in, DType::f64);
      for (const auto& x : v->differentiable()) {
        const Tensor& g = grads.at(grad_name(x));
        REQUIRE(g.shape() == in.at(x).shape());
        for (int dir = 0; dir < 2; ++dir) {
          // A random direction u: the directional derivative ⟨dx, u⟩ against
          // (L(x + εu) − L(x − εu)) / 2ε.
          Tensor u(DType::f64, g.shape());
          Rng rng(11, x, std::to_string(dir));
          for (int64_t i = 0; i < u.numel(); ++i) u.data<double>()[i] = rng.normal();
          test::check_directional_derivative(*v, p, in, g, x, u, 1e-6);
          ++checked;
        }
      }
    }
  }
  INFO("variants with a backward must have at least one small test shape");
  CHECK(checked > 0);
}

TEST_CASE("every backward implementation matches the reference backward on odd shapes", "[gradient][equivalence]") {
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  int checked = 0;
  for (const Variant* v : variants()) {
    if (!v->has_backward()) continue;
    for (const Params& given : v->test_shapes()) {
      const Params p = v->complete(given, v->name() + " test shape");
      for (Pass pass : {Pass::bwd, Pass::fwd_bwd}) {
        CaseRunner runner(o);
        for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
          for (const Impl& impl : v->impls()) {
            if (std::find(impl.dtypes.begin(), impl.dtypes.end(), d) == impl.dtypes.end()) continue;
            if (std::find(impl.passes.begin(), impl.passes.end(), pass) == impl.passes.end()) continue;
            const auto rec = runner.run(CaseSpec{v, impl.name, d, p, pass});
            INFO(v->name() << " " << impl.name << " " << dtype_name(d) << " " << pass_name(pass) << " " << p.dump()
                           << ": " << rec.dump());
            if (rec["status"] == "skipped") {
              // Only a shape the implementation declares it cannot run, or CUDA where no device is usable.
              const bool declared = impl.unsupported && !impl.unsupported(p).empty();
              CHECK((declared || (impl.device == Device::cuda && !cuda_usable())));
              continue;
            }
            CHECK(rec["status"] == "ok");
            int grads = 0;
            for (const auto& [name, c] : rec["checks"].items()) grads += name.rfind("gradient/", 0) == 0;
            CHECK(grads == int(v->differentiable().size()));
            ++checked;
          }
        }
      }
    }
  }
  CHECK(checked > 0);
}
