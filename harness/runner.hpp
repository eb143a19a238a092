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
  double peak_gflops = 0;  // for pct_peak; 0 = unknown (FP32 FMA: the f32 paths)
  double bf16_dot_gflops = 0;  // the avx512bf16 path's peak (0: FP32's)
  double amx_bf16_gflops = 0;  // the amx-bf16 path's peak (0: FP32's)
  /// The peak pct_peak of a record on kernel path `path` is computed against.
  double peak_for(const std::string& path) const {
    if (path == "amx-bf16" && amx_bf16_gflops > 0) return amx_bf16_gflops;
    if (path == "avx512bf16" && bf16_dot_gflops > 0) return bf16_dot_gflops;
    return peak_gflops;
  }
};

/// Runs cases, keeping the oracle of the last (inputs, dtype) so that the
/// implementations of one shape share it (the suite runner orders cases so).
class CaseRunner {
 public:
  explicit CaseRunner(RunOptions o) : o_(std::move(o)) {}
  /// New peaks for pct_peak (a re-measured roofline).
  void set_peaks(double f32, double bf16_dot, double amx) {
    o_.peak_gflops = f32, o_.bf16_dot_gflops = bf16_dot, o_.amx_bf16_gflops = amx;
  }
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
