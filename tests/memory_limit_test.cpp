// run --max-memory is enforced, not only modelled (issue 10): while a case
// runs, an allocation past the limit throws MemoryLimitExceeded, the case is
// recorded as failed with that message, and the next case runs. A test-only
// variant whose memory model says 0 bytes and whose implementation allocates
// `mib` MiB shows what the model cannot.
#include <catch2/catch.hpp>
#include <omp.h>

#include <vector>

#include "harness/runner.hpp"
#include "harness/system.hpp"
#include "harness/variant.hpp"
#include "harness/workspace.hpp"

using namespace attnbench;

namespace {

constexpr int64_t kMiB = 1 << 20;

/// o = x; the implementation "greedy" also takes `mib` MiB (a tensor, a
/// workspace block or a std::vector, by `how`) while it runs.
class GreedyVariant final : public Variant {
 public:
  std::string name() const override { return "greedy_test"; }
  std::string summary() const override { return "test only"; }
  std::vector<ParamSpec> params() const override {
    return {{"N", 8, "elements"}, {"mib", 0, "MiB taken by the implementation"}, {"how", "tensor", "tensor, workspace or vector"}};
  }
  std::vector<Impl> impls() const override {
    Impl greedy{"greedy", Device::cpu, {DType::f32}, [](const ImplArgs& a) -> std::unique_ptr<Instance> {
                  const int64_t bytes = a.params.at("mib").get<int64_t>() * kMiB;
                  const std::string how = a.params.at("how").get<std::string>();
                  const Tensor& x = a.inputs.at("x");
                  Tensor& o = a.outputs.at("o");
                  Workspace& ws = a.workspace;
                  return std::make_unique<FunctionInstance>([bytes, how, &x, &o, &ws] {
                    if (how == "tensor") {
                      Tensor big(DType::u8, {bytes});
                      big.data<uint8_t>()[0] = 1;
                    } else if (how == "workspace") {
                      static_cast<char*>(ws.allocate(size_t(bytes)))[0] = 1;
                    } else {
                      std::vector<char> big(size_t(bytes), 1);
                    }
                    for (int64_t i = 0; i < x.numel(); ++i) o.set(i, x.get(i));
                  });
                }};
    return {reference_impl({DType::f32}), greedy};
  }
  void validate(const Params&) const override {}
  TensorMap make_inputs(const Params& p, uint64_t seed, const std::string& key) const override {
    Tensor x(DType::f64, {p.at("N").get<int64_t>()});
    Rng rng(seed, key, "x");
    for (int64_t i = 0; i < x.numel(); ++i) x.set(i, rng.normal());
    TensorMap m;
    m.emplace("x", std::move(x));
    return m;
  }
  std::vector<OutputSpec> outputs(const Params& p, DType dtype) const override {
    return {{"o", dtype == DType::f64 ? DType::f64 : DType::f32, {p.at("N").get<int64_t>()}}};
  }
  TensorMap reference(const Params& p, const TensorMap& in, DType dtype) const override {
    Tensor o(dtype == DType::f64 ? DType::f64 : DType::f32, {p.at("N").get<int64_t>()});
    for (int64_t i = 0; i < o.numel(); ++i) o.set(i, in.at("x").get(i));
    TensorMap m;
    m.emplace("o", std::move(o));
    return m;
  }
  double flops(const Params& p) const override { return double(p.at("N").get<int64_t>()); }
  double memory_bytes(const Params&, const std::string&, DType) const override { return 0; }  // wrong on purpose
  std::vector<Params> test_shapes() const override { return {}; }
};

struct LimitGuard {
  explicit LimitGuard(int64_t bytes) { set_memory_limit(bytes); }
  ~LimitGuard() { set_memory_limit(0); }
};

}  // namespace

TEST_CASE("max-memory: an allocation past the limit fails the case and the next one runs", "[memory_limit]") {
  const GreedyVariant v;
  RunOptions o;
  o.bench = false;
  o.check_seeds = 1;
  const LimitGuard limit(64 * kMiB);
  std::vector<std::string> hows = {"tensor", "workspace"};
  if (!ATTNBENCH_ASAN) hows.push_back("vector");  // operator new is counted outside sanitizer builds
  for (const std::string& how : hows) {
    INFO(how);
    CaseRunner runner(o);
    const auto big = runner.run({&v, "greedy", DType::f32, v.complete({{"mib", 200}, {"how", how}}, "t")});
    CHECK(big["status"] == "failed");
    CHECK_THAT(big["reason"].get<std::string>(), Catch::StartsWith("--max-memory: the case would use more than its 0.06"));
    const auto small = runner.run({&v, "greedy", DType::f32, v.complete({{"mib", 8}, {"how", how}}, "t")});
    CHECK(small["status"] == "ok");
  }
}

TEST_CASE("max-memory: no limit without the flag, none outside a case, none inside a parallel region", "[memory_limit]") {
  const GreedyVariant v;
  RunOptions o;
  o.bench = false;
  o.check_seeds = 1;
  CHECK(run_case({&v, "greedy", DType::f32, v.complete({{"mib", 200}}, "t")}, o)["status"] == "ok");
  {
    const MemoryLimitScope scope(16 * kMiB);
    CHECK_THROWS_AS(Tensor(DType::u8, {32 * kMiB}), MemoryLimitExceeded);
    CHECK_NOTHROW(Tensor(DType::u8, {4 * kMiB}));
    int thrown = 0;
#pragma omp parallel num_threads(2) reduction(+ : thrown)
    {
      try {
        Tensor t(DType::u8, {32 * kMiB});
      } catch (const MemoryLimitExceeded&) {
        ++thrown;
      }
    }
    CHECK(thrown == 0);
  }
  CHECK_NOTHROW(Tensor(DType::u8, {32 * kMiB}));  // the scope is closed
  CHECK(MemoryLimitScope::counted_bytes() >= 0);
}
