// Timing through Google Benchmark: one runtime-registered benchmark per case,
// real time (threaded CPU code) or manual time (CUDA events), repetitions,
// median and cv, allocation counts from the counting allocator.
#pragma once

#include <string>
#include <vector>

#include "harness/runner.hpp"
#include "harness/variant.hpp"

namespace attnbench {

struct Timing {
  double median_s = 0, min_s = 0, mean_s = 0, cv = 0;
  int repetitions = 0;
  int64_t iterations = 0;          // per repetition (the last one)
  std::vector<double> samples_s;   // per-repetition mean time of one call
  double allocs_per_call = 0;
  int64_t heap_peak_bytes = 0;     // peak operator-new growth during a call
  int64_t rss_peak_bytes = -1;     // peak resident-set growth during the memory run (-1: unavailable)
};

/// Times `instance.run()`. Uses CUDA-event time when the instance reports it.
Timing time_instance(const std::string& name, Instance& instance, const BenchSettings& settings);

/// Two-sided p-value of the Mann–Whitney U test (exact up to 400 sample
/// pairs, normal approximation with continuity correction above).
double mann_whitney_p(const std::vector<double>& x, const std::vector<double>& y);

/// Median of a non-empty sample.
double median(std::vector<double> v);

}  // namespace attnbench
