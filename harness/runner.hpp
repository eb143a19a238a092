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
};

struct RunOptions {
  bool check = true;
  bool bench = true;
  int check_seeds = 3;
  uint64_t seed = 0;
  double floor_ulps = 8.0;
  BenchSettings bench_settings;
  nlohmann::json property_options = nlohmann::json::object();  // name -> options
  double peak_gflops = 0;  // for pct_peak; 0 = unknown
};

/// The record for one case; never throws for a failing implementation (the
/// record says `failed` with a reason) but throws InputError for bad specs.
nlohmann::json run_case(const CaseSpec& c, const RunOptions& o);

/// "B=1,H=8,N=17": a stable key for the case's inputs (independent of impl/dtype).
std::string case_key(const Variant& v, const Params& p);

}  // namespace attnbench
