// Scratch memory for implementations, with peak accounting.
//
// Implementations take every temporary buffer from the Workspace they are given
// (call `alloc` outside OpenMP regions, e.g. one slab per thread). The harness
// reports the peak as the implementation's working memory beyond inputs and
// outputs. Anything allocated behind the workspace's back is still seen by the
// process-wide counting allocator (AllocCounter), which the benchmark reports too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <vector>

// 1 in AddressSanitizer builds: GCC defines __SANITIZE_ADDRESS__, clang only
// answers __has_feature(address_sanitizer). The counting operator new is off there.
#if defined(__SANITIZE_ADDRESS__)
#define ATTNBENCH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTNBENCH_ASAN 1
#endif
#endif
#ifndef ATTNBENCH_ASAN
#define ATTNBENCH_ASAN 0
#endif

namespace attnbench {

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();

  /// `bytes` of uninitialized memory aligned to 64 bytes, valid until release().
  void* allocate(size_t bytes);
  template <class T>
  T* alloc(size_t n) {
    return static_cast<T*>(allocate(n * sizeof(T)));
  }
  /// Frees everything allocated so far; the peak is kept.
  void release();

  size_t current_bytes() const { return current_; }
  size_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = current_; }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t current_ = 0;
  size_t peak_ = 0;
};

/// `run --max-memory`, enforced: while a MemoryLimitScope is open, an
/// allocation that would take the bytes in use past the scope's start plus its
/// budget throws MemoryLimitExceeded (a std::bad_alloc) instead, so the case
/// fails with that message and the run goes on. Counted: tensors and
/// workspaces (every build) and, where the counting operator new is on (not
/// in sanitizer builds), every operator new. Not counted: Eigen's and the C
/// library's malloc (the references' matrices), device memory. Only the thread
/// that opened the scope is limited, and never inside an OpenMP parallel
/// region (an exception there would terminate the process): the next
/// allocation outside it throws.
class MemoryLimitExceeded : public std::bad_alloc {
 public:
  MemoryLimitExceeded(size_t request, int64_t in_use, int64_t budget);
  const char* what() const noexcept override { return msg_; }

 private:
  char msg_[256];
};

class MemoryLimitScope {
 public:
  explicit MemoryLimitScope(int64_t budget_bytes);  // 0: no limit
  ~MemoryLimitScope();
  MemoryLimitScope(const MemoryLimitScope&) = delete;
  MemoryLimitScope& operator=(const MemoryLimitScope&) = delete;
  /// Bytes the limit counts as in use now (process-wide).
  static int64_t counted_bytes();

 private:
  bool active_ = false;
};

/// 64-byte aligned memory counted by the memory limit (tensors, workspaces):
/// null when the system has none, MemoryLimitExceeded past the limit.
void* limited_aligned_alloc(size_t bytes);
void limited_free(void* p, size_t bytes);

/// Process-wide counts from the replaced global operator new/delete
/// (all zero in AddressSanitizer builds, which keep ASan's operator new).
struct AllocCounter {
  struct Snapshot {
    int64_t allocs;
    int64_t bytes_in_use;
    int64_t peak_bytes;  // since the last reset_peak()
  };
  static Snapshot snapshot();
  static void reset_peak();
};

}  // namespace attnbench
