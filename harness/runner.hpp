// Runs one case: build inputs → oracle → implementation → checks → timing →
// one results record (DESIGN §2). The suite runner and the tests both use it.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "harness/variant.hpp"

namespace attnbench {

struct BenchSettings {
  double min_time_s = 0.2;   // per repetition
  int repetitions = 5;
  bool memory = true;
};

struct CaseSpec {
  const Variant* variant = nullptr;
  std::string impl;
  DType dtype = DType::f32;
  Params params;  // complete (Variant::complete)
  Pass pass = Pass::fwd;
};

struct RunOptions {
  bool check = true;
  bool bench = true;
  int check_seeds = 3;
  uint64_t seed = 0;
  double floor_ulps = 8.0;
  double max_oracle_gflop = 0;  // > 0: skip checks (with a reason) for cases costing more
  BenchSettings bench_settings;
  nlohmann::json property_options = nlohmann::json::object();  // name -> options
  double peak_gflops = 0;  // for pct_peak; 0 = unknown
};

/// Runs cases, keeping the oracle of the last (inputs, dtype) so that the
/// implementations of one shape share it (the suite runner orders cases so).
class CaseRunner {
 public:
  explicit CaseRunner(RunOptions o) : o_(std::move(o)) {}
  /// The record for one case; never throws for a failing implementation (the
  /// record says `failed` with a reason) but throws InputError for bad specs.
  nlohmann::json run(const CaseSpec& c);
  const RunOptions& options() const { return o_; }

 private:
  struct Oracle {
    TensorMap inputs;                 // in the case's dtype (cotangents included for backward passes)
    TensorMap wide;                   // the same widened to f64: what the references read
    TensorMap oracle;                 // f64 outputs (and gradients for backward passes)
    std::map<DType, TensorMap> naive;  // the reference in each precision an implementation computes in
  };
  Oracle& oracle(const CaseSpec& c, int seed_index);
  /// The naive baseline of the correctness rule for an implementation computing in `precision`.
  const TensorMap& naive(const CaseSpec& c, Oracle& o, DType precision);
  nlohmann::json check(const CaseSpec& c, const Impl& impl);
  nlohmann::json bench(const CaseSpec& c, const Impl& impl);

  RunOptions o_;
  std::string cached_key_;
  std::vector<Oracle> cached_;
};

/// Convenience for tests: a fresh CaseRunner's record.
nlohmann::json run_case(const CaseSpec& c, const RunOptions& o);

/// "B=1,H=8,N=17": a stable key for the case's inputs (independent of impl/dtype).
std::string case_key(const Variant& v, const Params& p);

}  // namespace attnbench
