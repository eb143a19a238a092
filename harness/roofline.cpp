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
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/roofline.hpp"
#include "harness/system.hpp"

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
}  // namespace

double measure_fma_peak_gflops(int threads) {
  const int64_t iters = 20'000'000;
  double best = 0;
  std::vector<float> sink(size_t(threads) * 16);
  for (int rep = 0; rep < 3; ++rep) {
    double flops = 0;
    const double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += HWY_DYNAMIC_DISPATCH(FmaChains)(iters, &sink[size_t(omp_get_thread_num()) * 16]);
    best = std::max(best, flops / (now_s() - t0) / 1e9);
  }
  return best;
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

Roofline roofline(int threads, bool remeasure) {
  const auto path = cache_file();
  const std::string key = cpu_model() + "|" + std::to_string(threads) + "|" + HWY_DYNAMIC_DISPATCH(TargetName)();
  nlohmann::json cache = nlohmann::json::object();
  if (std::ifstream f(path); f) {
    try {
      f >> cache;
    } catch (...) {
      cache = nlohmann::json::object();  // a corrupt cache is remeasured
    }
  }
  if (!remeasure && cache.is_object() && cache.contains(key)) {
    const auto& e = cache[key];
    return {e.value("peak_gflops", 0.0), e.value("bandwidth_gbs", 0.0), threads, e.value("simd", ""), true};
  }
  Roofline r{measure_fma_peak_gflops(threads), measure_triad_bandwidth_gbs(threads), threads,
             HWY_DYNAMIC_DISPATCH(TargetName)(), false};
  if (!cache.is_object()) cache = nlohmann::json::object();
  cache[key] = {{"peak_gflops", r.peak_gflops}, {"bandwidth_gbs", r.bandwidth_gbs}, {"simd", r.simd}};
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  if (std::ofstream f(path); f) f << cache.dump(1) << '\n';  // best effort: an unwritable cache only costs time
  return r;
}

}  // namespace attnbench
#endif  // HWY_ONCE
