// FMA peak: 12 independent FMA chains per thread (more than latency × ports
// on every x86 core of the last decade), vector width of the best Highway
// target, all threads busy. Bandwidth: STREAM triad a = b + s·c over arrays
// far larger than the last-level cache.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "harness/roofline.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace attnbench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Returns the FLOPs executed; the result is stored so the loop is not removed.
double FmaChains(int64_t iterations, float* sink) {
  const hn::ScalableTag<float> d;
  auto m = hn::Set(d, 0.999999f);
  auto a = hn::Set(d, 1e-7f);
  // Distinct starting values: identical chains would be merged by the compiler.
  auto c0 = hn::Set(d, 1.0f), c1 = hn::Set(d, 1.01f), c2 = hn::Set(d, 1.02f), c3 = hn::Set(d, 1.03f);
  auto c4 = hn::Set(d, 1.04f), c5 = hn::Set(d, 1.05f), c6 = hn::Set(d, 1.06f), c7 = hn::Set(d, 1.07f);
  auto c8 = hn::Set(d, 1.08f), c9 = hn::Set(d, 1.09f), c10 = hn::Set(d, 1.10f), c11 = hn::Set(d, 1.11f);
  for (int64_t i = 0; i < iterations; ++i) {
    c0 = hn::MulAdd(c0, m, a); c1 = hn::MulAdd(c1, m, a); c2 = hn::MulAdd(c2, m, a);
    c3 = hn::MulAdd(c3, m, a); c4 = hn::MulAdd(c4, m, a); c5 = hn::MulAdd(c5, m, a);
    c6 = hn::MulAdd(c6, m, a); c7 = hn::MulAdd(c7, m, a); c8 = hn::MulAdd(c8, m, a);
    c9 = hn::MulAdd(c9, m, a); c10 = hn::MulAdd(c10, m, a); c11 = hn::MulAdd(c11, m, a);
  }
  auto s = hn::Add(hn::Add(hn::Add(c0, c1), hn::Add(c2, c3)), hn::Add(hn::Add(c4, c5), hn::Add(c6, c7)));
  s = hn::Add(s, hn::Add(hn::Add(c8, c9), hn::Add(c10, c11)));
  *sink = hn::GetLane(hn::SumOfLanes(d, s));
  return 2.0 * 12.0 * double(hn::Lanes(d)) * double(iterations);
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace attnbench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "harness/roofline.hpp"
#include "harness/system.hpp"
#include "impls/cpu/bf16_kernels.hpp"
#include "impls/cpu/cpu_features.hpp"

namespace attnbench {

HWY_EXPORT(FmaChains);
HWY_EXPORT(TargetName);

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::filesystem::path cache_file() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  std::filesystem::path dir = xdg && *xdg ? std::filesystem::path(xdg) : std::filesystem::path(home ? home : "/tmp") / ".cache";
  return dir / "attnbench" / "roofline.json";
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

/// Best rate over `reps` runs of `probe` (FLOPs per thread call) on all threads.
template <class Probe>
double best_rate(int threads, int reps, Probe&& probe) {
  double best = 0;
  std::vector<float> sink(size_t(threads) * 16);
  for (int rep = 0; rep < reps; ++rep) {
    double flops = 0;
    const double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += probe(&sink[size_t(omp_get_thread_num()) * 16]);
    best = std::max(best, flops / (now_s() - t0) / 1e9);
  }
  return best;
}

double cpu_mhz() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("cpu MHz", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return std::atof(line.c_str() + colon + 1);
    }
  return 0;
}

/// A cached peak this far below the theoretical rate was measured on a busy machine.
constexpr double kPlausibleFraction = 0.3;
}  // namespace

double Roofline::peak_for(const std::string& path) const {
  if (path == "amx-bf16" && amx_bf16_gflops > 0) return amx_bf16_gflops;
  if (path == "avx512bf16" && bf16_dot_gflops > 0) return bf16_dot_gflops;
  return peak_gflops;
}

double theoretical_gflops(const std::string& path, int threads) {
  const double ghz = cpu_mhz() / 1000.0;
  if (ghz <= 0) return 0;
  double per_cycle;  // FLOPs per cycle per core
  if (path == "amx-bf16")
    per_cycle = 1024;  // one 16×16×32 TDPBF16PS every 16 cycles
  else if (path == "avx512bf16")
    per_cycle = 64;    // one 512-bit VDPBF16PS per cycle
  else if (path == "avx512-f32")
    per_cycle = 64;    // two 512-bit FMAs per cycle (one on single-FMA-port cores: half)
  else
    per_cycle = 32;    // two 256-bit FMAs
  return per_cycle * ghz * threads;
}

double measure_fma_peak_gflops(int threads) {
  const int64_t iters = 10'000'000;
  return best_rate(threads, 7, [&](float* sink) { return HWY_DYNAMIC_DISPATCH(FmaChains)(iters, sink); });
}

double measure_bf16_dot_gflops(int threads) {
  if (!cpu::cpu_features().bf16_usable()) return 0;
  const int64_t iters = 2'000'000;
  return best_rate(threads, 7, [&](float* sink) { return cpu::bf16k::dpbf16_probe(iters, sink); });
}

double measure_amx_bf16_gflops(int threads) {
  if (!cpu::cpu_features().amx_usable()) return 0;
  const int64_t iters = 500'000;
  return best_rate(threads, 7, [&](float* sink) { return cpu::bf16k::amx_probe(iters, sink); });
}

double measure_triad_bandwidth_gbs(int threads) {
  const size_t n = size_t(1) << 25;  // 3 arrays × 256 MiB
  std::vector<double> a(n), b(n, 1.0), c(n, 2.0);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_s();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; ++i) a[i] = b[i] + 3.0 * c[i];
    best = std::max(best, 3.0 * 8.0 * double(n) / (now_s() - t0) / 1e9);
  }
  return best + 0.0 * a[n / 2];
}

namespace {
std::string cache_key(int threads) {
  return cpu_model() + "|" + std::to_string(threads) + "|" + HWY_DYNAMIC_DISPATCH(TargetName)();
}

nlohmann::json read_cache() {
  nlohmann::json cache = nlohmann::json::object();
  if (std::ifstream f(cache_file()); f) {
    try {
      f >> cache;
    } catch (...) {
      cache = nlohmann::json::object();  // a corrupt cache is remeasured
    }
  }
  return cache.is_object() ? cache : nlohmann::json::object();
}

void write_cache(int threads, const Roofline& r) {
  nlohmann::json cache = read_cache();
  cache[cache_key(threads)] = {{"peak_gflops", r.peak_gflops},         {"bf16_dot_gflops", r.bf16_dot_gflops},
                               {"amx_bf16_gflops", r.amx_bf16_gflops}, {"bandwidth_gbs", r.bandwidth_gbs},
                               {"simd", r.simd},                       {"load_average", r.load_average},
                               {"measured_at", r.measured_at}};
  const auto path = cache_file();
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  if (std::ofstream f(path); f) f << cache.dump(1) << '\n';  // best effort: an unwritable cache only costs time
}

Roofline measure_all(int threads) {
  Roofline r;
  r.threads = threads;
  r.load_average = load_average().m1;
  r.measured_at = utc_now();
  r.peak_gflops = measure_fma_peak_gflops(threads);
  r.bf16_dot_gflops = measure_bf16_dot_gflops(threads);
  r.amx_bf16_gflops = measure_amx_bf16_gflops(threads);
  r.bandwidth_gbs = measure_triad_bandwidth_gbs(threads);
  r.simd = HWY_DYNAMIC_DISPATCH(TargetName)();
  return r;
}

void warn(Roofline& r, const std::string& what) {
  r.warnings.push_back(what);
  std::fprintf(stderr, "attnbench: warning: %s\n", what.c_str());
}
}  // namespace

Roofline roofline(int threads, bool remeasure) {
  const nlohmann::json cache = read_cache();
  const std::string key = cache_key(threads);
  if (remeasure || !cache.contains(key)) {
    Roofline r = measure_all(threads);
    write_cache(threads, r);
    return r;
  }
  const auto& e = cache[key];
  Roofline r;
  r.threads = threads;
  r.cached = true;
  r.peak_gflops = e.value("peak_gflops", 0.0);
  r.bandwidth_gbs = e.value("bandwidth_gbs", 0.0);
  r.simd = e.value("simd", "");
  r.bf16_dot_gflops = e.value("bf16_dot_gflops", -1.0);
  r.amx_bf16_gflops = e.value("amx_bf16_gflops", -1.0);
  r.load_average = e.value("load_average", -1.0);
  r.measured_at = e.value("measured_at", "");
  bool dirty = false;
  // Older caches: the per-path peaks are missing; measure what this machine has.
  if (r.bf16_dot_gflops < 0) r.bf16_dot_gflops = measure_bf16_dot_gflops(threads), dirty = true;
  if (r.amx_bf16_gflops < 0) r.amx_bf16_gflops = measure_amx_bf16_gflops(threads), dirty = true;
  // Plausibility: a cached peak far below its path's theoretical rate is re-measured.
  const std::string f32_path = cpu::f32_kernel_path();
  auto check = [&](double& value, const std::string& path, double (*measure)(int)) {
    const double theory = theoretical_gflops(path, threads);
    if (value <= 0 || theory <= 0 || value >= kPlausibleFraction * theory) return;
    const double fresh = measure(threads);
    warn(r, fmt::format("cached {} peak {:.0f} GFLOP/s is below {:.0f}% of the theoretical {:.0f} (measured under "
                        "load {}?): re-measured {:.0f}",
                        path, value, 100 * kPlausibleFraction, theory, r.load_average, fresh));
    if (fresh > value) value = fresh, dirty = true;
  };
  check(r.peak_gflops, f32_path, measure_fma_peak_gflops);
  check(r.bf16_dot_gflops, "avx512bf16", measure_bf16_dot_gflops);
  check(r.amx_bf16_gflops, "amx-bf16", measure_amx_bf16_gflops);
  if (dirty) {
    r.load_average = load_average().m1;
    r.measured_at = utc_now();
    write_cache(threads, r);
  }
  return r;
}

Roofline remeasure_after(int threads, const std::string& path, double achieved) {
  const Roofline old = roofline(threads);
  Roofline r = measure_all(threads);
  // Keep the better of the two per path: a busy machine only ever lowers a measurement.
  r.peak_gflops = std::max(r.peak_gflops, old.peak_gflops);
  r.bf16_dot_gflops = std::max(r.bf16_dot_gflops, old.bf16_dot_gflops);
  r.amx_bf16_gflops = std::max(r.amx_bf16_gflops, old.amx_bf16_gflops);
  r.bandwidth_gbs = std::max(r.bandwidth_gbs, old.bandwidth_gbs);
  warn(r, fmt::format("a {} record reached {:.0f} GFLOP/s, above the cached peak {:.0f} of its path: re-measured "
                      "{:.0f} (load {:.1f})",
                      path, achieved, old.peak_for(path), r.peak_for(path), r.load_average));
  write_cache(threads, r);
  return r;
}

}  // namespace attnbench
#endif  // HWY_ONCE
