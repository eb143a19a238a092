// The `std` shape parameter (issue 10, item 7): every variant's generated
// activations scale with it (trifast's tests use std 1 and 2), weights do not,
// the scale is not part of the input streams' key (std = 2 gives exactly twice
// the std = 1 values), and impossible values are refused naming the field.
#include <catch2/catch.hpp>

#include <cmath>

#include "harness/runner.hpp"
#include "harness/variant.hpp"

using namespace attnbench;

TEST_CASE("std scales every variant's activations and nothing else", "[inputs][std]") {
  for (const Variant* v : variants()) {
    INFO(v->name());
    const Params p1 = v->complete(v->test_shapes().front(), "test");
    Params p2 = p1;
    p2["std"] = 2.0;
    p2 = v->complete(p2, "test");
    REQUIRE(input_std(p1) == 1.0);
    REQUIRE(input_std(p2) == 2.0);
    const TensorMap a = v->make_inputs(p1, 5, case_key(*v, p1));
    const TensorMap b = v->make_inputs(p2, 5, case_key(*v, p2));
    REQUIRE(a.size() == b.size());
    int scaled = 0;
    for (const auto& [name, ta] : a) {
      INFO(name);
      const Tensor& tb = b.at(name);
      REQUIRE(ta.numel() == tb.numel());
      // Either unchanged or every element times one factor (2, or √2 for each of two factors).
      double factor = 0;
      bool same = true, proportional = true;
      for (int64_t i = 0; i < ta.numel(); ++i) {
        const double x = ta.get(i), y = tb.get(i);
        same = same && x == y;
        if (x != 0 && factor == 0) factor = y / x;
        proportional = proportional && std::fabs(y - factor * x) <= 1e-12 * std::fabs(y);
      }
      if (same) continue;
      CHECK(proportional);
      CHECK((std::fabs(factor - 2.0) < 1e-12 || std::fabs(factor - std::sqrt(2.0)) < 1e-12));
      ++scaled;
    }
    CHECK(scaled > 0);
  }
}

TEST_CASE("std: impossible values are refused naming the field", "[inputs][std]") {
  const Variant& v = find_variant("sdpa", "test");
  for (double bad : {0.0, -1.0})
    CHECK_THROWS_WITH(v.complete({{"std", bad}}, "suite"), Catch::Contains("suite.std: expected a finite number > 0"));
  CHECK_THROWS_WITH(v.complete({{"std", "2"}}, "suite"), Catch::Contains("suite.std: expected a number"));
}
