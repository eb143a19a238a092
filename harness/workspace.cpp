#include "harness/workspace.hpp"

#include <atomic>
#include <cstdlib>
#include <new>

namespace attnbench {

Workspace::~Workspace() { release(); }

void* Workspace::allocate(size_t bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(mu_);
  blocks_.emplace_back(p, rounded);
  current_ += rounded;
  if (current_ > peak_) peak_ = current_;
  return p;
}

void Workspace::release() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [p, n] : blocks_) std::free(p);
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
  void* base = std::malloc(n + kHeader);
  if (!base) throw std::bad_alloc();
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
