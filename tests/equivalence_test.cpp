// The registry-driven equivalence test (ggml's test-backend-ops idea): every
// variant × implementation × dtype on the variant's odd test shapes, through
// the same runner `attnbench run` uses (NaN-filled outputs, input hashes,
// several seeds, the correctness rule, the variant's properties).
#include <catch2/catch.hpp>

#include <algorithm>

#include "harness/runner.hpp"
#include "harness/variant.hpp"

using namespace attnbench;

TEST_CASE("every implementation matches its reference on odd shapes", "[equivalence]") {
  RunOptions o;
  o.bench = false;
  o.check_seeds = 2;
  REQUIRE_FALSE(variants().empty());
  for (const Variant* v : variants()) {
    for (const Params& given : v->test_shapes()) {
      const Params p = v->complete(given, v->name() + " test shape");
      CaseRunner runner(o);
      // dtype outer, impl inner: the runner shares one oracle per (shape, dtype).
      for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
        for (const Impl& impl : v->impls()) {
          if (std::find(impl.dtypes.begin(), impl.dtypes.end(), d) == impl.dtypes.end()) continue;
          const auto rec = runner.run(CaseSpec{v, impl.name, d, p});
          INFO(v->name() << " " << impl.name << " " << dtype_name(d) << " " << p.dump() << ": " << rec.dump());
          if (rec["status"] == "skipped") {
            // Only a shape the implementation declares it cannot run, or CUDA where no device is usable.
            const bool declared = impl.unsupported && !impl.unsupported(p).empty();
            CHECK((declared || (impl.device == Device::cuda && !cuda_usable())));
            continue;
          }
          CHECK(rec["status"] == "ok");
          CHECK(rec["checks"].size() >= 1);
        }
      }
    }
  }
}
