// This machine's measured peaks per CPU path and memory bandwidth (DESIGN §4,
// issue 13 item 2): `attnbench roofline` measures them, `run` reads the cached
// values to report pct_peak for every CPU record against the peak of the path
// the record used (bench.kernel_path).
#pragma once

#include <string>
#include <vector>

namespace attnbench {

struct Roofline {
  double peak_gflops = 0;         // FP32 FMA, all `threads` threads (the f32 paths' peak)
  double bf16_dot_gflops = 0;     // VDPBF16PS (avx512bf16 path); 0 where the machine lacks it
  double amx_bf16_gflops = 0;     // AMX TDPBF16PS (amx-bf16 path); 0 where the machine lacks it
  double bandwidth_gbs = 0;       // STREAM triad
  int threads = 0;
  std::string simd;               // Highway target the FP32 peak was measured with
  double load_average = -1;       // 1-minute load average when measured (-1 unknown: older caches)
  std::string measured_at;        // UTC time of the measurement ("" unknown)
  bool cached = false;
  std::vector<std::string> warnings;  // implausible cached values found (and re-measured)
  /// The peak of a kernel path (bench.kernel_path): amx-bf16, avx512bf16, else FP32.
  double peak_for(const std::string& path) const;
};

/// Cached result for (cpu model, threads), measured and cached if absent
/// (or when `remeasure`). Cache: $XDG_CACHE_HOME/attnbench or ~/.cache/attnbench.
/// Entries of older versions (FP32 peak and bandwidth only) stay readable: the
/// per-path peaks they lack are measured and added. A cached peak far below the
/// path's theoretical rate (measured on a busy machine) is re-measured, with a warning.
Roofline roofline(int threads, bool remeasure = false);

/// Re-measures and caches after a record beat the cached peak of its path
/// (`achieved` GFLOP/s on `path`); returns the new values with a warning.
Roofline remeasure_after(int threads, const std::string& path, double achieved);

/// Measurements themselves: the best of several short runs (a fraction of a second each).
double measure_fma_peak_gflops(int threads);
double measure_bf16_dot_gflops(int threads);   // 0 without AVX512-BF16
double measure_amx_bf16_gflops(int threads);   // 0 without usable AMX
double measure_triad_bandwidth_gbs(int threads);

/// The theoretical rate the plausibility check compares with: lanes × 2 FLOP ×
/// instructions per cycle × the clock (cpu MHz of /proc/cpuinfo) × threads;
/// 0 where the clock is unknown.
double theoretical_gflops(const std::string& path, int threads);

}  // namespace attnbench
