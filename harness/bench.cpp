#include "harness/bench.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cmath>
#include <mutex>
#include <numeric>
#include <stdexcept>

#include <benchmark/benchmark.h>

#include "harness/workspace.hpp"

namespace attnbench {

namespace {

/// Collects per-repetition results instead of printing them.
class CollectingReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration) continue;
      if (r.error_occurred) throw std::runtime_error("benchmark error: " + r.error_message);
      if (r.iterations > 0) samples.push_back(r.real_accumulated_time / double(r.iterations));
      iterations = r.iterations;
      // Only the pointer is tested: Google Benchmark 1.7.1 leaves it dangling
      // (the peak comes from our own memory manager instead).
      if (r.memory_result) allocs_per_call = r.allocs_per_iter;
    }
  }
  std::vector<double> samples;
  int64_t iterations = 0;
  double allocs_per_call = 0;
};

/// "VmRSS" or "VmHWM" of this process in bytes (0 if unreadable).
int64_t proc_status_bytes(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  int64_t kib = 0;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, key, n) == 0 && line[n] == ':') kib = std::atoll(line + n + 1);
  std::fclose(f);
  return kib * 1024;
}

/// Resets the resident-set high-water mark (Linux: "5" > /proc/self/clear_refs).
bool reset_rss_peak() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (!f) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return (std::fclose(f) == 0) && ok;
}

/// Google Benchmark's memory hook: operator new counts from the counting
/// allocator, and the growth of the resident set over the run, which also sees
/// what bypasses operator new (Eigen's and the C library's malloc).
class CountingMemoryManager : public benchmark::MemoryManager {
 public:
  void Start() override {
    AllocCounter::reset_peak();
    start_ = AllocCounter::snapshot();
    rss_ok_ = reset_rss_peak();
    rss_start_ = proc_status_bytes("VmRSS");
  }
  void Stop(Result& r) override {
    auto now = AllocCounter::snapshot();
    r.num_allocs = now.allocs - start_.allocs;
    r.max_bytes_used = now.peak_bytes - start_.bytes_in_use;
    r.net_heap_growth = now.bytes_in_use - start_.bytes_in_use;
    rss_growth = rss_ok_ ? std::max<int64_t>(0, proc_status_bytes("VmHWM") - rss_start_) : -1;
    heap_peak = r.max_bytes_used;
  }
  void Stop(Result* r) override { Stop(*r); }
  int64_t rss_growth = -1;  // of the last Start/Stop, -1 when unavailable
  int64_t heap_peak = 0;    // of the last Start/Stop

 private:
  AllocCounter::Snapshot start_{};
  bool rss_ok_ = false;
  int64_t rss_start_ = 0;
};

CountingMemoryManager& memory_manager() {
  static CountingMemoryManager mm;
  return mm;
}

void initialize_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    int argc = 1;
    char name[] = "attnbench";
    char* argv[] = {name, nullptr};
    benchmark::Initialize(&argc, argv);
    benchmark::RegisterMemoryManager(&memory_manager());
  });
}

}  // namespace

namespace {

/// Number of orderings of n1 + n2 samples with U statistic = u, for all u.
std::vector<double> u_distribution(int n1, int n2) {
  // f[n1][n2][u] via the recursion f(a,b,u) = f(a−1,b,u−b) + f(a,b−1,u).
  std::vector<std::vector<std::vector<double>>> f(n1 + 1, std::vector<std::vector<double>>(n2 + 1));
  for (int a = 0; a <= n1; ++a)
    for (int b = 0; b <= n2; ++b) {
      f[a][b].assign(size_t(a * b + 1), 0.0);
      if (a == 0 || b == 0) {
        f[a][b][0] = 1;
        continue;
      }
      for (int u = 0; u <= a * b; ++u)
        f[a][b][size_t(u)] = (u - b >= 0 && u - b <= (a - 1) * b ? f[a - 1][b][size_t(u - b)] : 0.0) +
                             (u <= a * (b - 1) ? f[a][b - 1][size_t(u)] : 0.0);
    }
  return f[n1][n2];
}

}  // namespace

double mann_whitney_p(const std::vector<double>& x, const std::vector<double>& y) {
  const int n1 = int(x.size()), n2 = int(y.size());
  if (n1 == 0 || n2 == 0) return 1.0;
  double u = 0;
  for (double a : x)
    for (double b : y) u += a > b ? 1.0 : (a == b ? 0.5 : 0.0);
  const double mean = n1 * n2 / 2.0;
  const double dev = std::abs(u - mean);
  if (n1 * n2 <= 400) {
    const auto dist = u_distribution(n1, n2);
    double total = 0, tail = 0;
    for (size_t k = 0; k < dist.size(); ++k) {
      total += dist[k];
      if (std::abs(double(k) - mean) >= dev - 1e-9) tail += dist[k];
    }
    return tail / total;
  }
  const double sd = std::sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0);
  return std::erfc((dev - 0.5) / sd / std::sqrt(2.0));
}


double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Timing time_instance(const std::string& name, Instance& instance, const BenchSettings& settings) {
  initialize_once();
  instance.run();  // warm-up; also tells whether the instance is device-timed
  const bool manual = instance.device_seconds() >= 0;

  auto* b = benchmark::RegisterBenchmark(name.c_str(), [&instance, manual](benchmark::State& st) {
    for (auto _ : st) {
      instance.run();
      if (manual) st.SetIterationTime(instance.device_seconds());
    }
  });
  b->Repetitions(std::max(1, settings.repetitions))->MinTime(settings.min_time_s)->Unit(benchmark::kSecond);
  if (manual)
    b->UseManualTime();
  else
    b->UseRealTime();

  CollectingReporter reporter;
  try {
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } catch (...) {
    benchmark::ClearRegisteredBenchmarks();
    throw;
  }
  benchmark::ClearRegisteredBenchmarks();
  if (reporter.samples.empty()) throw std::runtime_error("benchmark produced no samples");

  Timing t;
  t.samples_s = reporter.samples;
  t.repetitions = int(t.samples_s.size());
  t.iterations = reporter.iterations;
  t.median_s = median(t.samples_s);
  t.min_s = *std::min_element(t.samples_s.begin(), t.samples_s.end());
  t.mean_s = std::accumulate(t.samples_s.begin(), t.samples_s.end(), 0.0) / t.repetitions;
  double var = 0;
  for (double s : t.samples_s) var += (s - t.mean_s) * (s - t.mean_s);
  t.cv = t.repetitions > 1 ? std::sqrt(var / (t.repetitions - 1)) / t.mean_s : 0.0;
  t.allocs_per_call = reporter.allocs_per_call;
  t.heap_peak_bytes = memory_manager().heap_peak;
  t.rss_peak_bytes = memory_manager().rss_growth;
  return t;
}

}  // namespace attnbench
