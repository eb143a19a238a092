#include "harness/system.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "harness/errors.hpp"
#include "impls/cpu/cpu_features.hpp"

namespace attnbench {

namespace {
int64_t meminfo_kib(const std::string& key) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream s(line.substr(key.size() + 1));
      int64_t kib = 0;
      s >> kib;
      return kib;
    }
  }
  return 0;
}
}  // namespace

namespace {
std::atomic<int64_t> g_memory_limit{0};
}  // namespace

void set_memory_limit(int64_t bytes) { g_memory_limit = bytes; }
int64_t memory_limit() { return g_memory_limit; }

int64_t available_memory_bytes() {
  const int64_t free = meminfo_kib("MemAvailable") * 1024, limit = g_memory_limit;
  return limit > 0 ? std::min(free, limit) : free;
}
int64_t total_memory_bytes() { return meminfo_kib("MemTotal") * 1024; }

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto pos = line.find(':');
      return pos == std::string::npos ? line : line.substr(pos + 2);
    }
  }
  return "unknown";
}

std::string host_name() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0)); }

int core_count() {
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? int(n) : 1;
}

int resolve_threads(int requested, const std::string& flag) {
  if (requested == 0) return omp_get_max_threads();
  const int cores = core_count(), most = 4 * cores;
  if (requested < 0 || requested > most)
    throw InputError(fmt::format("{}: expected 1 to {} threads (4 per core, {} cores here), got {}", flag, most, cores,
                                 requested));
  if (requested > cores)
    std::fprintf(stderr, "attnbench: warning: %s %d is more than the %d cores here; timings will be unreliable\n",
                 flag.c_str(), requested, cores);
  return requested;
}

void apply_cpu_path(const std::string& flag_value) {
  const char* env = std::getenv("ATTNBENCH_CPU_PATH");
  const bool from_flag = !flag_value.empty();
  const std::string value = from_flag ? flag_value : (env ? std::string(env) : std::string());
  try {
    cpu::set_cpu_path_limit(value);
  } catch (const std::invalid_argument& e) {
    throw InputError(std::string(from_flag ? "--cpu-path" : "ATTNBENCH_CPU_PATH") + ": " + e.what());
  }
}

LoadAverage load_average() {
  LoadAverage l;
  std::ifstream f("/proc/loadavg");
  if (!(f >> l.m1 >> l.m5 >> l.m15)) l = LoadAverage{};
  return l;
}

}  // namespace attnbench
