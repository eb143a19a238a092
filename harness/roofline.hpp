// This machine's measured FP32 FMA peak and memory bandwidth (DESIGN §4):
// `attnbench roofline` measures them, `run` reads the cached values to report
// pct_peak for every CPU record.
#pragma once

#include <string>

namespace attnbench {

struct Roofline {
  double peak_gflops = 0;    // FP32 FMA, all `threads` threads
  double bandwidth_gbs = 0;  // STREAM triad
  int threads = 0;
  std::string simd;          // Highway target the peak was measured with
  bool cached = false;
};

/// Cached result for (cpu model, threads), measured and cached if absent
/// (or when `remeasure`). Cache: $XDG_CACHE_HOME/attnbench or ~/.cache/attnbench.
Roofline roofline(int threads, bool remeasure = false);

/// Measurements themselves (about a second each).
double measure_fma_peak_gflops(int threads);
double measure_triad_bandwidth_gbs(int threads);

}  // namespace attnbench
