#include "harness/workspace.hpp"

#include <omp.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>

namespace attnbench {

// ---- the memory limit (run --max-memory) ----------------------------------
namespace {
std::atomic<int64_t> g_limit_in_use{0};  // bytes the limit counts
std::atomic<int64_t> g_limit{0};         // 0: none; else the most g_limit_in_use may reach
std::atomic<int64_t> g_budget{0};
thread_local bool t_limited = false;     // the thread that opened the scope

/// Counts n more bytes; throws (uncounted again) when that passes the limit.
void limit_add(size_t n) {
  const int64_t now = g_limit_in_use.fetch_add(int64_t(n), std::memory_order_relaxed) + int64_t(n);
  const int64_t limit = g_limit.load(std::memory_order_relaxed);
  if (limit > 0 && now > limit && t_limited && !omp_in_parallel()) {
    g_limit_in_use.fetch_sub(int64_t(n), std::memory_order_relaxed);
    throw MemoryLimitExceeded(n, now - int64_t(n) - (limit - g_budget.load()), g_budget.load());
  }
}
void limit_sub(size_t n) { g_limit_in_use.fetch_sub(int64_t(n), std::memory_order_relaxed); }
}  // namespace

MemoryLimitExceeded::MemoryLimitExceeded(size_t request, int64_t in_use, int64_t budget) {
  std::snprintf(msg_, sizeof msg_,
                "--max-memory: the case would use more than its %.3f GiB (%.3f GiB in use, %.3f GiB more requested)",
                double(budget) / double(1ll << 30), double(in_use) / double(1ll << 30),
                double(request) / double(1ll << 30));
}

MemoryLimitScope::MemoryLimitScope(int64_t budget_bytes) {
  if (budget_bytes <= 0) return;
  active_ = true;
  t_limited = true;
  g_budget = budget_bytes;
  g_limit = g_limit_in_use.load() + budget_bytes;
}

MemoryLimitScope::~MemoryLimitScope() {
  if (!active_) return;
  g_limit = 0;
  t_limited = false;
}

int64_t MemoryLimitScope::counted_bytes() { return g_limit_in_use.load(); }

void* limited_aligned_alloc(size_t bytes) {
  const size_t rounded = bytes ? (bytes + 63) / 64 * 64 : 64;
  limit_add(rounded);
  void* p = std::aligned_alloc(64, rounded);
  if (!p) limit_sub(rounded);
  return p;
}

void limited_free(void* p, size_t bytes) {
  if (!p) return;
  limit_sub(bytes ? (bytes + 63) / 64 * 64 : 64);
  std::free(p);
}

Workspace::~Workspace() { release(); }

void* Workspace::allocate(size_t bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = limited_aligned_alloc(rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(mu_);
  blocks_.emplace_back(p, rounded);
  current_ += rounded;
  if (current_ > peak_) peak_ = current_;
  return p;
}

void Workspace::release() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [p, n] : blocks_) limited_free(p, n ? n : 64);
  blocks_.clear();
  current_ = 0;
}

// ---- process-wide counting allocator -------------------------------------
// Replaces global operator new/delete. A size header in front of every block
// lets delete know how many bytes leave.

namespace {
std::atomic<int64_t> g_allocs{0};
std::atomic<int64_t> g_in_use{0};
std::atomic<int64_t> g_peak{0};
// AddressSanitizer brings its own operator new; a second replacement would
// free its blocks with our header arithmetic. Sanitizer builds count nothing.
#if !ATTNBENCH_ASAN
constexpr size_t kHeader = 16;  // keeps the default 16-byte alignment

void* counted_alloc(size_t n) {
  limit_add(n);
  void* base = std::malloc(n + kHeader);
  if (!base) {
    limit_sub(n);
    throw std::bad_alloc();
  }
  *static_cast<size_t*>(base) = n;
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  int64_t now = g_in_use.fetch_add(int64_t(n), std::memory_order_relaxed) + int64_t(n);
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  return static_cast<char*>(base) + kHeader;
}

void counted_free(void* p) {
  if (!p) return;
  void* base = static_cast<char*>(p) - kHeader;
  g_in_use.fetch_sub(int64_t(*static_cast<size_t*>(base)), std::memory_order_relaxed);
  limit_sub(*static_cast<size_t*>(base));
  std::free(base);
}
#endif
}  // namespace

AllocCounter::Snapshot AllocCounter::snapshot() {
  return {g_allocs.load(), g_in_use.load(), g_peak.load()};
}

void AllocCounter::reset_peak() { g_peak.store(g_in_use.load()); }

}  // namespace attnbench

#if !ATTNBENCH_ASAN
void* operator new(size_t n) { return attnbench::counted_alloc(n); }
void* operator new[](size_t n) { return attnbench::counted_alloc(n); }
void operator delete(void* p) noexcept { attnbench::counted_free(p); }
void operator delete[](void* p) noexcept { attnbench::counted_free(p); }
void operator delete(void* p, size_t) noexcept { attnbench::counted_free(p); }
void operator delete[](void* p, size_t) noexcept { attnbench::counted_free(p); }
#endif
